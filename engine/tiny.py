"""Tiny random-weight pipelines in diffusers format.

No checkpoint can be downloaded in CI, so tests (and the README's first command)
build miniature SD1.5-, SDXL- and FLUX.1-shaped (dev and schnell) pipelines from configs with seeded random
weights, save them exactly as diffusers would (``save_pretrained``, safetensors),
and load them back through :func:`engine.load`. The tokenizer is a byte-level CLIP
BPE vocabulary written here (256 byte symbols, their end-of-word forms, no merges,
and the two CLIP special tokens), so no vocabulary file has to be fetched; FLUX's T5 tokenizer is a Unigram one over
letters (:func:`t5_tokenizer`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHS = ("sd15", "sdxl", "sdxl-turbo", "flux-dev", "flux-schnell")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's order: pad 0, end 1, unknown 2


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            chars.append(256 + n)
            n += 1
    return [chr(c) for c in chars]


def write_tokenizer(folder: Path, max_length: int = 77) -> None:
    """Write a CLIP-format tokenizer (vocab.json + merges.txt) with a byte vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = 512  # specials last: CLIP pools at argmax(input_ids)
    vocab["<|endoftext|>"] = 513
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    )


def t5_tokenizer(pieces: list[tuple[str, float]] = (), max_length: int = 16):
    """A ``T5TokenizerFast`` (Unigram, SentencePiece-style "▁" word starts) over the specials,
    ``pieces`` ((piece, log-probability) pairs, e.g. whole words) and single letters, so any
    text tokenizes. ``max_length``: its window (FLUX pads prompts to it)."""
    from transformers import T5TokenizerFast

    letters = [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'-"] + [("▁", -3.0)]
    scores = {s: 0.0 for s in T5_SPECIALS}
    for piece, score in [*pieces, *letters]:
        scores.setdefault(piece, score)  # one entry per piece: the first score given wins
    vocab = list(scores.items())
    pad, eos, unk = T5_SPECIALS
    return T5TokenizerFast(vocab=vocab, eos_token=eos, unk_token=unk, pad_token=pad, extra_ids=0,
                           model_max_length=max_length)


def flux_transformer_config(dev: bool) -> dict:
    """FLUX-shaped: 2 heads of 16, RoPE axes 4/6/6, one double and two single blocks."""
    return dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=dev,
                axes_dims_rope=(4, 6, 6))


def _flux_vae():
    """16 latent channels without quant convs, a shift and a scale, as FLUX's VAE."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611,
    )


def _flux_scheduler(dev: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dev:  # resolution-dependent shift, as FLUX.1-dev ships
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def _flux_pipeline(dev: bool, tokenizer):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tok2 = t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                 is_encoder_decoder=False, use_cache=False, dropout_rate=0.0))
    return FluxPipeline(scheduler=_flux_scheduler(dev), vae=_flux_vae(), text_encoder=CLIPTextModel(_text_config(32, 32)),
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tok2,
                        transformer=FluxTransformer2DModel(**flux_transformer_config(dev)))


def _text_config(hidden: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=projection_dim, bos_token_id=512, eos_token_id=513, pad_token_id=513,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=64,
    )


def _scheduler(turbo: bool = False):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    if turbo:  # SDXL-Turbo's scheduler: Euler ancestral, trailing spacing
        return EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               timestep_spacing="trailing", steps_offset=1)
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )


def sd15_unet_config() -> dict:
    """SD1.5-shaped: heads given as ``attention_head_dim``, conv projections, CLIP-L-like context."""
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
    )


def sdxl_unet_config() -> dict:
    """SDXL-shaped: text_time added embedding, linear projections, per-block transformer depth."""
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )


def build_diffusers_pipeline(arch: str = "sd15", seed: int = 0):
    """Construct a tiny diffusers pipeline with seeded random weights (no network)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    import tempfile

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHS}")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    if arch.startswith("flux"):
        pipe = _flux_pipeline(arch == "flux-dev", tokenizer)
    elif arch == "sd15":
        unet = UNet2DConditionModel(**sd15_unet_config())
        text_encoder = CLIPTextModel(_text_config(32, 32))
        pipe = StableDiffusionPipeline(
            vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        unet = UNet2DConditionModel(**sdxl_unet_config())
        text_encoder = CLIPTextModel(_text_config(32, 32))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(32, 32))
        pipe = StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(arch == "sdxl-turbo"),
        )
    # Random init leaves some weights at exactly zero (e.g. conv_out, FLUX's adaLN-Zero
    # gates); perturb them so that every parameter matters in parity tests.
    with torch.no_grad():
        for p in (pipe.transformer if arch.startswith("flux") else pipe.unet).parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    return pipe


def make_tiny(folder: str | Path, arch: str = "sd15", seed: int = 0) -> Path:
    """Build a tiny random pipeline and save it in diffusers format under ``folder``."""
    folder = Path(folder)
    pipe = build_diffusers_pipeline(arch, seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_ip_adapter(folder: str | Path, unet, kind: str = "plain", seed: int = 0, tokens: int = 4) -> Path:
    """A tiny random IP-Adapter for our ``unet`` in h94/IP-Adapter's layout: ``folder/models/
    ip-adapter-tiny[-plus].safetensors`` (published tensor names) beside ``folder/models/image_encoder``
    (a CLIPVisionModelWithProjection, 32x32 input). Returns the adapter file."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from .models.ip_adapter import IPAdapter, ImageProjection, Resampler, context_dim, cross_layers, to_state_dict

    folder = Path(folder) / "models"
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=24)
    encoder = CLIPVisionModelWithProjection(cfg).eval()
    encoder.save_pretrained(folder / "image_encoder", safe_serialization=True)
    (folder / "image_encoder" / "preprocessor_config.json").write_text(json.dumps(dict(
        do_resize=True, size={"shortest_edge": 32}, do_center_crop=True, crop_size={"height": 32, "width": 32},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])))
    cross = context_dim(unet)
    proj = ImageProjection(cfg.projection_dim, cross, tokens) if kind == "plain" else \
        Resampler(cfg.hidden_size, 64, cross, tokens, 4, 1)  # depth 4: what diffusers builds
    adapter = IPAdapter(proj, cross_layers(unet), cross, kind)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    file = folder / f"ip-adapter-tiny{'-plus' if kind == 'plus' else ''}.safetensors"
    save_file(to_state_dict(adapter, unet), str(file))
    return file


def make_tiny_pulid(path: str | Path, transformer, seed: int = 0) -> Path:
    """A tiny random PuLID-Flux for our FLUX ``transformer`` in the published layout
    (``pulid_encoder.*``, ``pulid_ca.{n}.*``): 5 hidden-state scales of width 32, a 48-wide id condition,
    4 id tokens of width 32. Returns the .safetensors file."""
    from safetensors.torch import save_file

    from .models.pulid import IDFormer, PerceiverAttentionCA, PuLID

    torch.manual_seed(seed)
    c = transformer.config
    encoder = IDFormer(dim=64, depth=10, heads=1, id_tokens=5, queries=4, out_dim=32, id_dim=48, vit_dim=32)
    n = len(range(0, c.num_layers, 2)) + len(range(0, c.num_single_layers, 4))
    ca = torch.nn.ModuleList([PerceiverAttentionCA(c.num_attention_heads * c.attention_head_dim, 32, 1)
                              for _ in range(n)])
    pulid = PuLID(encoder, ca, c.num_layers, c.num_single_layers)
    with torch.no_grad():
        for p in pulid.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # LayerNorms away from identity too: every tensor matters
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in pulid.state_dict().items()}, str(path))
    return path
