"""PuLID-Flux (engine.models.pulid) on tiny FLUX models with random weights in the published layout:
loading, the id encoder and the injected cross-attention against the official math written out,
where the residuals go, id weight 0 vs plain FLUX, Tight Inversion (RF-Inversion) through it."""

import pytest
import torch
from safetensors.torch import load_file

import engine
from engine.tiny import make_tiny_pulid


def _official_perceiver(attn, x, latents):
    """The official PerceiverAttention: q, k scaled by d^-1/4 each, float softmax."""
    x, latents = attn.norm1(x), attn.norm2(latents)
    b, n, _ = latents.shape
    h = attn.heads
    q = attn.to_q(latents)
    k, v = attn.to_kv(torch.cat([x, latents], 1)).chunk(2, -1)
    split = lambda t: t.view(b, t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    s = q.shape[-1] ** -0.25
    w = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), -1).type(q.dtype)
    return attn.to_out((w @ v).transpose(1, 2).reshape(b, n, -1))


def _official_idformer(enc, id_cond, hidden):
    b = id_cond.shape[0]
    x = enc.id_embedding_mapping(id_cond).reshape(b, enc.id_tokens, -1)
    latents = torch.cat([enc.latents.repeat(b, 1, 1), x], 1)
    for i in range(enc.scales):
        ctx = torch.cat([x, getattr(enc, f"mapping_{i}")(hidden[i])], 1)
        for attn, ff in enc.layers[i * enc.per_scale:(i + 1) * enc.per_scale]:
            latents = _official_perceiver(attn, ctx, latents) + latents
            latents = ff(latents) + latents
    return latents[:, :enc.queries] @ enc.proj_out


def _official_ca(ca, ids, img):
    x, latents = ca.norm1(ids), ca.norm2(img)
    b, n, _ = latents.shape
    q = ca.to_q(latents).view(b, n, ca.heads, -1).transpose(1, 2)
    k, v = (t.view(b, ids.shape[1], ca.heads, -1).transpose(1, 2) for t in ca.to_kv(x).chunk(2, -1))
    s = 1 / (q.shape[-1] ** 0.5) ** 0.5
    w = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), -1).type(q.dtype)
    return ca.to_out((w @ v).transpose(1, 2).reshape(b, n, -1))


def _embedding(b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 48, generator=g), [torch.randn(b, 9, 32, generator=g) for _ in range(5)]


@pytest.fixture()
def setup(tiny_flux_dir, tmp_path):
    pipe = engine.load(tiny_flux_dir)
    file = make_tiny_pulid(tmp_path / "pulid_flux_tiny.safetensors", pipe.transformer)
    return pipe, file


@torch.no_grad()
def test_published_layout_loads_and_matches_the_official_math(setup):
    pipe, file = setup
    keys = set(load_file(str(file)))
    assert {"pulid_encoder.latents", "pulid_encoder.proj_out", "pulid_encoder.layers.9.1.3.weight",
            "pulid_encoder.mapping_4.6.bias", "pulid_encoder.id_embedding_mapping.6.weight",
            "pulid_ca.1.to_kv.weight", "pulid_ca.0.norm2.bias"} <= keys
    pulid = pipe.load_pulid(file)
    id_cond, hidden = _embedding(2)
    tokens, null = pulid.encode(id_cond, hidden)
    torch.testing.assert_close(tokens, _official_idformer(pulid.pulid_encoder, id_cond, hidden), rtol=1e-5, atol=1e-5)
    assert tokens.shape == (2, 4, 32) and (null - tokens).abs().max() > 1e-3
    img = torch.randn(2, 7, 32)
    for ca in pulid.pulid_ca:
        torch.testing.assert_close(ca(img, *ca.kv(tokens)), _official_ca(ca, tokens, img), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_residuals_follow_the_blocks_and_weight_zero_is_plain_flux(setup):
    pipe, file = setup
    pulid = pipe.load_pulid(file)
    tr = pipe.transformer
    c = tr.config
    b, n = 2, 16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, n, c.in_channels, generator=g)
    ctx, pooled = torch.randn(b, 5, c.joint_attention_dim, generator=g), torch.randn(b, c.pooled_projection_dim, generator=g)
    t = torch.tensor([0.7, 0.3])
    ids = engine.models.flux.image_ids(8, 8)  # an 8x8 latent: 16 packed tokens
    guidance = torch.full((b,), 0.0035) if c.guidance_embeds else None
    tokens, _ = pulid.encode(*_embedding(b))
    w = torch.tensor([0.8, 0.0])
    got = tr(x, ctx, pooled, t, ids, torch.zeros(5, 3), guidance, plan=pulid.plan(tokens, w))
    plain = tr(x, ctx, pooled, t, ids, torch.zeros(5, 3), guidance)
    torch.testing.assert_close(got[1:], plain[1:], rtol=0, atol=0)  # weight 0: exactly plain FLUX
    assert (got[:1] - plain[:1]).abs().max() > 1e-4
    # the official loop: after double block i (i % 2 == 0) and single block i (i % 4 == 0), on image tokens
    from engine.models.flux import rope

    h = tr.x_embedder(x)
    temb = tr.time_text_embed(t * 1000, guidance * 1000 if guidance is not None else None, pooled)
    cc = tr.context_embedder(ctx)
    rot = rope(torch.cat([torch.zeros(5, 3), ids]), c.axes_dims_rope)
    k = 0
    for i, block in enumerate(tr.transformer_blocks):
        h, cc = block(h, cc, temb, rot)
        if i % 2 == 0:
            h = h + w.view(-1, 1, 1) * _official_ca(pulid.pulid_ca[k], tokens, h)
            k += 1
    seq = torch.cat([cc, h], 1)
    for i, block in enumerate(tr.single_transformer_blocks):
        seq = block(seq, temb, rot, 5)
        if i % 4 == 0:
            img = seq[:, 5:]
            seq = torch.cat([seq[:, :5], img + w.view(-1, 1, 1) * _official_ca(pulid.pulid_ca[k], tokens, img)], 1)
            k += 1
    out, _ = tr.norm_out(seq[:, 5:], temb)
    torch.testing.assert_close(got, tr.proj_out(out), rtol=1e-5, atol=1e-5)


def test_generation_and_tight_rf_inversion(setup):
    pipe, file = setup
    kw = dict(steps=2, height=32, width=32, seed=0, output_type="pt", progress=False)
    before = pipe.generate("a face", **kw)
    pipe.load_pulid(file)
    emb = _embedding()
    torch.testing.assert_close(pipe.generate("a face", id_embedding=emb, id_weight=0.0, **kw), before, rtol=0, atol=0)
    assert (pipe.generate("a face", id_embedding=emb, **kw) - before).abs().max() > 1e-4
    with pytest.raises(ValueError, match="needs a face embedder"):
        pipe.generate("a face", id_image=torch.rand(1, 3, 32, 32), **kw)
    # a user-supplied face front end (here a fixed function of the image) makes Tight RF-Inversion work
    pipe.face_embedder = lambda images: (images.mean((2, 3)).repeat(1, 16), [images.flatten(2)[:, :, :32].repeat(1, 3, 1)
                                                                                [:, :9] for _ in range(5)])
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    inv = pipe.invert(image, "a face", method="rf-inversion", steps=2, image_condition=True, image_scale=0.7,
                      progress=False)
    plain = pipe.invert(image, "a face", method="rf-inversion", steps=2, progress=False)
    assert inv.settings["image_scale"] == 0.7 and (inv.latents - plain.latents).abs().max() > 1e-4
    edited = pipe.edit(inv, "rf-inversion", "a smiling face", output_type="pt", progress=False)
    assert edited.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="IP-Adapters attach to SD"):
        pipe.load_ip_adapter("x.safetensors")


def test_id_start_step(setup):
    # PuLID's start_step: the steps before it are plain FLUX's (the same latents), the identity joins
    # from it on; 0 is the default, `steps` never reads it.
    pipe, file = setup
    pipe.load_pulid(file)
    emb = _embedding()
    kw = dict(steps=3, height=32, width=32, seed=0, output_type="pt", progress=False)

    def trace(**more):
        xs = []
        pipe.generate("a face", callback=lambda d: xs.append(d["x"].clone()), **kw, **more)
        return xs

    plain, always, late = trace(), trace(id_embedding=emb), trace(id_embedding=emb, id_start_step=2)
    assert torch.equal(trace(id_embedding=emb, id_start_step=0)[-1], always[-1])
    assert torch.equal(trace(id_embedding=emb, id_start_step=3)[-1], plain[-1])
    assert torch.equal(late[0], plain[0]) and torch.equal(late[1], plain[1])
    assert (late[2] - plain[2]).abs().max() > 1e-5 and (late[2] - always[2]).abs().max() > 1e-5
    with pytest.raises(ValueError, match="give id_image= or id_embedding= too"):
        pipe.generate("a face", id_start_step=1, **kw)
    for bad in (-1, 4, 1.5):
        with pytest.raises(ValueError, match="id_start_step must be an int step in \\[0, 3\\]"):
            pipe.generate("a face", id_embedding=emb, id_start_step=bad, **kw)
