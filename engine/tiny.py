"""Tiny random-weight pipelines in diffusers format.

No checkpoint can be downloaded in CI, so tests (and the README's first command)
build miniature SD1.5- and SDXL-shaped pipelines from configs with seeded random
weights, save them exactly as diffusers would (``save_pretrained``, safetensors),
and load them back through :func:`engine.load`. The tokenizer is a byte-level CLIP
BPE vocabulary written here (256 byte symbols, their end-of-word forms, no merges,
and the two CLIP special tokens), so no vocabulary file has to be fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHS = ("sd15", "sdxl")


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


def _scheduler():
    from diffusers import DDIMScheduler

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
    if arch == "sd15":
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
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(),
        )
    # Random init leaves some weights at exactly zero (e.g. conv_out); perturb them so
    # that every parameter matters in parity tests.
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    return pipe


def make_tiny(folder: str | Path, arch: str = "sd15", seed: int = 0) -> Path:
    """Build a tiny random pipeline and save it in diffusers format under ``folder``."""
    folder = Path(folder)
    pipe = build_diffusers_pipeline(arch, seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
