"""Our FLUX transformer against diffusers' FluxTransformer2DModel with the same random weights."""

import pytest
import torch

from engine.models.attention import AttentionPlan
from engine.models.flux import FluxTransformer2DModel, image_ids, pack, rope, unpack
from engine.models.flux_config import FluxConfig
from engine.tiny import build_diffusers_pipeline


def _pair(arch):
    ref = build_diffusers_pipeline(arch, seed=1).transformer.eval()
    with torch.device("meta"):
        ours = FluxTransformer2DModel(FluxConfig.from_dict(dict(ref.config)))
    missing, unexpected = ours.load_state_dict(ref.state_dict(), assign=True, strict=True)
    assert not missing and not unexpected
    return ref, ours.eval()


@pytest.fixture(scope="module", params=["flux-dev", "flux-schnell"])
def pair(request):
    return request.param, *_pair(request.param)


def _inputs(cfg, b, h=8, w=6, text=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, (h // 2) * (w // 2), cfg.in_channels, generator=g)  # [B, N, 64]
    ctx = torch.randn(b, text, cfg.joint_attention_dim, generator=g)  # [B, L, D]
    pooled = torch.randn(b, cfg.pooled_projection_dim, generator=g)
    return dict(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                img_ids=image_ids(h, w), txt_ids=torch.zeros(text, 3))


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def test_rows_at_different_timesteps_match_diffusers(pair):
    arch, ref, ours = pair
    kw = _inputs(ours.config, 4)
    kw["timestep"] = torch.tensor([1.0, 0.7, 0.25, 0.001])  # every row its own time
    if ours.config.guidance_embeds:
        kw["guidance"] = torch.tensor([3.5, 1.0, 3.5, 7.0])
    with torch.no_grad():
        want = ref(**kw, return_dict=False)[0]
        got = ours(**kw)
    assert got.shape == want.shape
    assert _rel(want, got) <= 1e-5


def test_guidance_is_required_exactly_when_embedded(pair):
    arch, _, ours = pair
    kw = _inputs(ours.config, 1)
    kw["timestep"] = torch.ones(1)
    if ours.config.guidance_embeds:
        with pytest.raises(ValueError, match="pass guidance"):
            ours(**kw)
    else:
        with pytest.raises(ValueError, match="no guidance embedding"):
            ours(**kw, guidance=torch.ones(1))


def test_pack_unpack_and_ids():
    z = torch.randn(2, 16, 8, 6)
    tokens = pack(z)
    assert tokens.shape == (2, 12, 64)
    torch.testing.assert_close(unpack(tokens, 8, 6), z, rtol=0, atol=0)
    ids = image_ids(8, 6)
    assert ids.shape == (12, 3) and ids[4].tolist() == [0, 1, 1]  # token 4: row 1, column 1 of a 4x3 grid
    cos, sin = rope(torch.cat([torch.zeros(5, 3), ids]), (4, 6, 6))
    assert cos.shape == sin.shape == (17, 16)
    torch.testing.assert_close(cos[:5], torch.ones(5, 16), rtol=0, atol=0)  # text tokens sit at position 0


def test_config_errors():
    with pytest.raises(ValueError, match="unknown field 'foo'"):
        FluxConfig.from_dict({"foo": 1})
    with pytest.raises(ValueError, match="patch_size=2"):
        FluxConfig.from_dict({"patch_size": 2})
    with pytest.raises(ValueError, match="must add up to attention_head_dim"):
        FluxConfig.from_dict({"attention_head_dim": 64})


def _explicit_joint(model, kw, layer_index):
    """Run the model with an explicit attention at one layer and return its probabilities [B, H, S, S]."""
    import engine.models.attention as seam

    seen = {}
    real = seam.kernels.attention

    def spy(q, k, v, **args):
        if args.get("store") is not None:
            p = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5, -1)
            seen["p"] = p
        return real(q, k, v, **args)

    seam.kernels.attention = spy
    try:
        text = kw["encoder_hidden_states"].shape[1]
        n = kw["hidden_states"].shape[1]
        buf = torch.zeros(kw["hidden_states"].shape[0], n, text)
        model(**kw, plan=AttentionPlan(store={layer_index: buf}))
    finally:
        seam.kernels.attention = real
    return buf, seen["p"]


@pytest.mark.parametrize("layer", [0, 2])  # a double block's and a single block's attention
def test_store_is_image_queries_by_text_keys(pair, layer):
    arch, _, ours = pair
    kw = _inputs(ours.config, 2)
    kw["timestep"] = torch.tensor([0.9, 0.3])
    if ours.config.guidance_embeds:
        kw["guidance"] = torch.tensor([3.5, 3.5])
    with torch.no_grad():
        buf, p = _explicit_joint(ours, kw, layer)
    text = kw["encoder_hidden_states"].shape[1]
    want = p[:, :, text:, :text].mean(1)  # [B, N, L]: image queries x text keys, softmax over all keys
    torch.testing.assert_close(buf.double(), want, rtol=1e-5, atol=1e-6)


def test_injected_keys_and_values_are_the_sources_image_tokens(pair):
    """Row 1 reads row 0's image keys/values in every layer; its text tokens stay its own. Checked
    against the same model run with an explicit attention that does this by hand."""
    import engine.models.attention as seam

    arch, _, ours = pair
    kw = _inputs(ours.config, 2, seed=3)
    kw["timestep"] = torch.tensor([0.6, 0.6])
    if ours.config.guidance_embeds:
        kw["guidance"] = torch.tensor([3.5, 3.5])
    text = kw["encoder_hidden_states"].shape[1]
    src = torch.tensor([0, 0])
    plan = AttentionPlan(self_inject={"k_from": src, "v_from": src})
    with torch.no_grad():
        got = ours(**kw, plan=plan)
        real = seam.kernels.attention

        def by_hand(q, k, v, **args):
            k2, v2 = k.clone(), v.clone()
            k2[1, :, text:], v2[1, :, text:] = k[0, :, text:], v[0, :, text:]
            p = torch.softmax((q.double() @ k2.double().transpose(-1, -2)) * q.shape[-1] ** -0.5, -1)
            return (p @ v2.double()).to(q.dtype)

        seam.kernels.attention = by_hand
        try:
            want = ours(**kw, plan=AttentionPlan())  # a plan, so every layer goes through the seam's kernel call
        finally:
            seam.kernels.attention = real
        plain = ours(**kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], plain[0], rtol=1e-5, atol=1e-6)  # the source row reads itself
    assert (got[1] - plain[1]).abs().max() > 1e-3  # the target changed


def test_rows_injecting_their_own_keys_and_values_are_bit_identical(pair):
    """Identity injection computes exactly the plain attention; rows that read themselves in a call
    where another row injects are unchanged too."""
    arch, _, ours = pair
    kw = _inputs(ours.config, 3, seed=4)
    kw["timestep"] = torch.tensor([0.6, 0.3, 0.9])
    if ours.config.guidance_embeds:
        kw["guidance"] = torch.tensor([3.5, 3.5, 2.0])
    ident, mixed = torch.arange(3), torch.tensor([0, 0, 2])
    with torch.no_grad():
        plain = ours(**kw)
        same = ours(**kw, plan=AttentionPlan(self_inject={"k_from": ident, "v_from": ident}))
        other = ours(**kw, plan=AttentionPlan(self_inject={"k_from": mixed, "v_from": mixed}))
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    torch.testing.assert_close(other[[0, 2]], plain[[0, 2]], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled Triton kernel)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_half_precision_matches_fp32(pair, dtype):
    """On a GPU, in half precision, through the Triton kernel (with a stored map block): close to
    the CPU fp32 output, and the stored image x text maps close to the fp32 ones."""
    import copy

    arch, _, ours = pair
    kw = _inputs(ours.config, 2)
    kw["timestep"] = torch.tensor([0.8, 0.2])
    if ours.config.guidance_embeds:
        kw["guidance"] = torch.tensor([3.5, 3.5])
    n, text = kw["hidden_states"].shape[1], kw["encoder_hidden_states"].shape[1]
    want_maps = torch.zeros(2, n, text)
    with torch.no_grad():
        want = ours(**kw, plan=AttentionPlan(store={1: want_maps}))
        gpu = copy.deepcopy(ours).to("cuda", dtype)
        maps = torch.zeros(2, n, text, device="cuda")
        got = gpu(**{k: v.cuda() for k, v in kw.items()}, plan=AttentionPlan(store={1: maps}))
    assert _rel(want, got.float().cpu()) <= 3e-2
    torch.testing.assert_close(maps.cpu(), want_maps, rtol=0, atol=2e-2)
