"""Feature injection through the plan (engine.models.features) and key-masked attention."""

import pytest
import torch
import torch.nn.functional as F

from engine.models.attention import AttentionPlan, AttnLayer, KeyMask, attention, masked_attention
from engine.step import merge


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def unet(request, sd15_pipe, sdxl_pipe):
    return (sd15_pipe if request.param == "sd15" else sdxl_pipe).unet


def _inputs(unet, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(b, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(b, 5, cfg.cross_attention_dim[0] if isinstance(cfg.cross_attention_dim, (list, tuple))
                      else cfg.cross_attention_dim, generator=g)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(b, pooled, generator=g), "time_ids": torch.rand(b, 6, generator=g) * 64}
    return x, torch.tensor([500, 300, 100]), ctx, added


def test_every_resnet_and_transformer_block_is_a_site(unet):
    names = [s.name for s in unet.feature_sites]
    resnets = [n for n, m in unet.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    blocks = [n for n, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert names == sorted(resnets + blocks, key=names.index) and len(names) == len(resnets) + len(blocks)
    assert [s.index for s in unet.feature_sites] == list(range(len(names)))
    with pytest.raises(ValueError, match="no feature site"):
        unet.site("up_blocks.9.resnets.0")


@torch.no_grad()
def test_identity_injection_is_bit_identical(unet):
    x, t, ctx, added = _inputs(unet)
    plain = unet(x, t, ctx, added)
    ident = torch.arange(3)
    plan = AttentionPlan(features={s.index: ident for s in unet.feature_sites})
    assert torch.equal(unet(x, t, ctx, added, plan=plan), plain)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["resnet", "block"])
def test_injected_features_are_the_source_rows(unet, kind):
    """Rows 1 and 2 take row 0's features at one site: what follows the site sees row 0's
    tensor there, exactly as row 0 computed it; rows before the site are untouched."""
    x, t, ctx, added = _inputs(unet)
    name = "up_blocks.1.resnets.1" if kind == "resnet" else [s.name for s in unet.feature_sites if s.kind == "block"][-1]
    site = unet.site(name)
    mod = unet.get_submodule(name)
    seen = {}

    def keep(key, value):
        seen.setdefault(key, value.clone())  # first call only; hooks return None: nothing is changed

    if site.kind == "resnet":  # the site's output, then the input of the module that follows it
        h = mod.register_forward_hook(lambda m, a, out: keep("made", out))
        block, j = unet.get_submodule(name.rsplit(".", 2)[0]), int(name.rsplit(".", 1)[1])
        nxt = block.attentions[j] if block.attentions is not None else block.resnets[j + 1]
    else:  # a transformer block's input, then its first norm's input
        h = mod.register_forward_pre_hook(lambda m, a: keep("made", a[0]))
        nxt = mod.norm1
    h2 = nxt.register_forward_pre_hook(lambda m, a: keep("next_in", a[0]))
    try:
        plan = AttentionPlan(features={site.index: torch.tensor([0, 0, 0])})
        unet(x, t, ctx, added, plan=plan)
    finally:
        h.remove()
        h2.remove()
    made, nxt = seen["made"], seen["next_in"]
    for r in range(3):  # (a following resnet's input is [x, skip]: x comes first)
        assert torch.equal(nxt[r][:made.shape[1]], made[0])
    assert not torch.equal(made[1], made[0])  # the rows did differ before the site


def test_merged_feature_rows_shift_by_offset():
    a = AttentionPlan(features={3: torch.tensor([0, 0, 0])})
    b = AttentionPlan(features={5: torch.tensor([1, 1])})
    m = merge([(a, 0, 3), (None, 3, 2), (b, 5, 2)], 8, [], "cpu")
    assert torch.equal(m.features[3], torch.tensor([0, 0, 0, 3, 4, 5, 6, 7]))
    assert torch.equal(m.features[5], torch.tensor([0, 1, 2, 3, 4, 6, 6, 7]))


# ---- key masks (mask-guided MasaCtrl) --------------------------------------------------------


def _explicit_masked(q, k, v, key_fg, query_fg):
    """Reference: softmax restricted to the foreground / background keys, in float64."""
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5  # [H, Nq, Nk]
    fg = torch.softmax(s.masked_fill(key_fg[None, None, :] == 0, float("-inf")), -1) @ v.double()
    bg = torch.softmax(s.masked_fill(key_fg[None, None, :] == 1, float("-inf")), -1) @ v.double()
    qf = query_fg[None, :, None].double()
    return fg * qf + bg * (1 - qf)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 3e-3)])
def test_key_masked_reads_restrict_the_softmax(dtype, tol):
    g = torch.Generator().manual_seed(3)
    B, H, D, side = 4, 2, 32, 8
    q, k, v = (torch.randn(B, H, side * side, D, generator=g).to(dtype) for _ in range(3))
    key_fg = (torch.rand(2, side, side, generator=g) > 0.6).float()  # [2, h, w] for rows 2, 3
    query_fg = (torch.rand(2, side, side, generator=g) > 0.5).float()
    reads = torch.tensor([0, 1, 0, 1])  # rows 2, 3 read rows 0, 1's keys and values
    layer = AttnLayer(0, "s", False, "up", 1)
    plan = AttentionPlan(self_inject={"k_from": reads, "v_from": reads},
                         key_masks={0: (KeyMask(key_fg, query_fg, (2, 4)),)})
    out = attention(q, k, v, layer, plan)
    assert not out.isnan().any()
    for r in (2, 3):
        want = _explicit_masked(q[r], k[r - 2], v[r - 2], key_fg[r - 2].flatten(), query_fg[r - 2].flatten())
        torch.testing.assert_close(out[r].double(), want, atol=tol, rtol=tol)
    plain = attention(q[:2], k[:2], v[:2])
    torch.testing.assert_close(out[:2], plain, atol=tol, rtol=0)  # unmasked rows: ordinary attention


def test_key_masks_resize_to_coarser_layers():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 1, 16, 16, generator=g) for _ in range(3))  # a 4x4 layer
    key_fg = torch.zeros(1, 8, 8)
    key_fg[:, :4, :4] = 1  # latent-sized mask: the top-left quarter
    query_fg = torch.ones(1, 8, 8)
    out = masked_attention(q, k, v, KeyMask(key_fg, query_fg, (1, 2)), k_from=torch.tensor([0, 0]),
                           v_from=torch.tensor([0, 0]))
    small = F.interpolate(key_fg[:, None], size=(4, 4), mode="nearest").flatten()
    want = _explicit_masked(q[1], k[0], v[0], small, torch.ones(16))
    torch.testing.assert_close(out[1].double(), want, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="fits no grid"):
        masked_attention(q[:, :, :15], k[:, :, :15], v[:, :, :15], KeyMask(key_fg, query_fg, (1, 2)))
