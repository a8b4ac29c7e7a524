"""FLUX pieces of the end-to-end benchmark (``e2e.py`` W5, W6): random-weight FLUX.1-dev, ours
and diffusers' over the same tensors, and the workloads' runs.

The full-size model follows the published FLUX.1-dev configs (transformer 12B, T5-XXL
encoder 4.7B, CLIP-L, the 16-channel VAE, the dynamically shifted flow schedule), written
inline (no download) and randomly initialised on the device; our transformer loads
diffusers' state dict with ``assign=True`` (one copy of the weights). The T5 tokenizer is a
small Unigram one (``engine.tiny.t5_tokenizer``): token ids differ from real T5's, the
compute does not (prompts are padded to 512 tokens either way).
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import common

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dropout_rate=0.0,
              is_encoder_decoder=False, use_cache=False)
FLUX_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
                sample_size=1024)
FLUX_SCHED = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096)
T5_TOKENS = 512


def build(device: str, dtype: torch.dtype, tiny: bool = False, seed: int = 0) -> common.Models:
    """FLUX.1-dev-shaped models (``tiny``: engine.tiny's miniature) as ``common.Models``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from engine import tiny as tiny_mod

    torch.manual_seed(seed)
    with torch.device(device):
        if tiny:
            transformer = FluxTransformer2DModel(**tiny_mod.flux_transformer_config(dev=True))
            clip = CLIPTextModel(tiny_mod._text_config(32, 32))
            t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                         feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))
            vae = tiny_mod._flux_vae()
        else:
            transformer = FluxTransformer2DModel(**FLUX_DEV)
            clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=512,
                                                eos_token_id=513, pad_token_id=513, **common.CLIP_L))
            t5 = T5EncoderModel(T5Config(**T5_XXL))
            vae = AutoencoderKL(**FLUX_VAE)
    with torch.no_grad():
        for p in transformer.parameters():  # adaLN-Zero gates start at zero: make every weight count
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    transformer, vae = torch.nn.Module.to(transformer, dtype).eval(), torch.nn.Module.to(vae, dtype).eval()
    clip, t5 = clip.to(dtype).eval(), t5.to(dtype).eval()
    tok, tok2 = common._tokenizer(), tiny_mod.t5_tokenizer(max_length=64 if tiny else T5_TOKENS)
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHED)
    theirs = FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                          tokenizer_2=tok2, transformer=transformer)
    theirs.set_progress_bar_config(disable=True)
    ours = _ours(transformer, vae, clip, t5, tok, tok2, sched, device, dtype)
    params = sum(p.numel() for p in transformer.parameters())
    return common.Models("flux-dev", ours, theirs, dtype, dict(transformer_params=params, tiny=tiny))


def _ours(transformer, vae, clip, t5, tok, tok2, sched, device, dtype):
    from engine.flux import FluxPipeline
    from engine.loading.flux import FluxComponents
    from engine.loading.modules import load_module
    from engine.models.flux import FluxTransformer2DModel as Ours
    from engine.models.flux_config import FluxConfig

    cfg = FluxConfig.from_dict(dict(transformer.config))
    mine = load_module("transformer", lambda: Ours(cfg), transformer.state_dict(), torch.device(device), dtype)
    sched_cfg = {**dict(sched.config), "_class_name": type(sched).__name__}
    comps = FluxComponents(root=Path("."), model_index={}, transformer=mine, vae=vae, text_encoder=clip,
                           text_encoder_2=t5, tokenizer=tok, tokenizer_2=tok2, scheduler_config=sched_cfg,
                           vae_dtype=dtype)
    return FluxPipeline(comps)


def gen_variants(m: common.Models, impls, prompt: str, size: int, steps: int, guidance: float = 3.5):
    """FLUX.1-dev text-to-image (embedded guidance 3.5, no true CFG), ours and diffusers'."""
    kw = dict(steps=steps, embedded_guidance=guidance, height=size, width=size, seed=0, output_type="pt",
              progress=False)
    seq = m.ours.max_sequence_length
    out = []
    for impl in impls:
        if impl in ("ours", "ours-compile"):  # e2e compiles our transformer before the compile variant
            out.append((impl, lambda: m.ours.generate(prompt, **kw)))
        elif impl == "ours-graphs":
            out.append((impl, lambda: m.ours.generate(prompt, cuda_graphs=True, **kw)))
        elif impl == "diffusers":
            out.append((impl, lambda: m.theirs(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size,
                                               width=size, generator=torch.Generator().manual_seed(0),
                                               max_sequence_length=seq, output_type="pt").images))
    return out


def rf_variants(m: common.Models, impls, src: str, tgt: str, size: int, steps: int):
    """RF-Inversion: a controlled inversion then a controlled edit (steps + steps). diffusers has no
    RF-Inversion pipeline in its library (only a community script): ``diffusers-loop`` is the same
    number of transformer calls as plain diffusers, the floor any implementation pays."""
    image = common.source_image(size)
    def ours():
        inv = m.ours.invert(image, src, method="rf-inversion", steps=steps, progress=False)
        return m.ours.edit(inv, "rf-inversion", tgt, embedded_guidance=3.5, output_type="pt", progress=False)

    out = [(i, ours) for i in impls if i in ("ours", "ours-compile")]
    if "diffusers" in impls:
        out.append(("diffusers-loop", lambda: diffusers_rf_loop(m.theirs, image, src, tgt, steps)))
    return out


@torch.no_grad()
def diffusers_rf_loop(pipe, image, src: str, tgt: str, steps: int):
    """The transformer work of RF-Inversion with diffusers' modules: ``steps`` calls of the
    inversion (gamma 0.5 toward a random y_1), then FluxPipeline generating from the result."""
    import numpy as np

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    tr, vae, dev = pipe.transformer, pipe.vae, pipe.transformer.device
    dtype = tr.dtype
    h, w = image.shape[-2:]
    seq = pipe.tokenizer_2.model_max_length
    pe, pooled, text_ids = pipe.encode_prompt(src, src, device=dev, max_sequence_length=seq)
    z = vae.encode((image * 2 - 1).to(dev, vae.dtype)).latent_dist.mode()
    z = ((z - vae.config.shift_factor) * vae.config.scaling_factor).to(dtype)  # [1, 16, h, w]
    b, c, lh, lw = z.shape
    y = pipe._pack_latents(z, b, c, lh, lw)  # [1, N, 64]
    ids = pipe._prepare_latent_image_ids(b, lh // 2, lw // 2, dev, dtype)
    sig = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(y.shape[1])
    _, _ = retrieve_timesteps(pipe.scheduler, steps, dev, sigmas=sig, mu=mu)
    sigmas = pipe.scheduler.sigmas.flip(0)
    y1 = torch.randn_like(y)
    g = torch.zeros(1, device=dev) if tr.config.guidance_embeds else None
    for i in range(steps):
        s = sigmas[i]
        u = tr(hidden_states=y, timestep=s.expand(1).to(dtype), guidance=g, pooled_projections=pooled,
               encoder_hidden_states=pe, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
        u = u + 0.5 * ((y1 - y) / (1 - s) - u)
        y = y + u * (sigmas[i + 1] - s)
    return pipe(tgt, latents=y, num_inference_steps=steps, guidance_scale=3.5, height=h, width=w,
                max_sequence_length=seq, output_type="pt").images


def flops_per_row(m: common.Models, size: int) -> dict:
    """FLOPs of one transformer row (512 text tokens) and of one VAE decode / encode at ``size``²."""
    tr, vae = m.theirs.transformer, m.theirs.vae
    dev, dtype, f = tr.device, tr.dtype, m.ours.vae_scale_factor
    n = (size // f // 2) ** 2
    text = m.ours.max_sequence_length
    cfg = tr.config
    x = torch.zeros(1, n, cfg.in_channels, device=dev, dtype=dtype)
    ctx = torch.zeros(1, text, cfg.joint_attention_dim, device=dev, dtype=dtype)
    pooled = torch.zeros(1, cfg.pooled_projection_dim, device=dev, dtype=dtype)
    ids = torch.zeros(n, 3, device=dev)
    g = torch.ones(1, device=dev) if cfg.guidance_embeds else None
    row = common.count_flops(lambda: tr(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                                        timestep=torch.ones(1, device=dev), img_ids=ids,
                                        txt_ids=torch.zeros(text, 3, device=dev), guidance=g))
    z = torch.zeros(1, cfg.in_channels // 4, size // f, size // f, device=dev, dtype=vae.dtype)
    img = torch.zeros(1, 3, size, size, device=dev, dtype=vae.dtype)
    return dict(unet_row=row, vae_decode=common.count_flops(lambda: vae.decode(z)),
                vae_encode=common.count_flops(lambda: vae.encode(img)))
