"""Architecture of the Shapes text-to-image model, and saving it as a diffusers pipeline.

An SD1.x-shaped pipeline scaled down for 64x64 images and CPU training:
  vae           AutoencoderKL (16, 32, 64), 64x64x3 <-> 4x16x16 (two 2x downsamplings)
  text_encoder  CLIPTextModel, hidden 128, 4 layers, 2 heads (head dim 64), 77 positions
  unet          UNet2DConditionModel (64, 64, 128) on 16x16 latents, cross-attention at
                16x16, 8x8 and 4x4 (down, mid and up); heads chosen so every head is 64 wide
  scheduler     DDIM with SD's scaled_linear betas and steps_offset=1
``ModelSizes.smoke()`` is a miniature of the same layout for tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.shapes.tokenizer import MAX_LENGTH, special_ids, write_tokenizer

HEAD_DIM = 64  # a head width the attention kernels support (40, 64, 80, 128, 160)


@dataclass(frozen=True)
class ModelSizes:
    # Sized for a ~45-minute CPU training run: flat-coloured shapes need little VAE width,
    # and the UNet's cost is dominated by its 16x16 level.
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_groups: int = 8
    unet_channels: tuple[int, ...] = (64, 64, 128)
    unet_groups: int = 32
    layers_per_block: int = 1
    text_hidden: int = 128
    text_layers: int = 4
    head_dim: int = HEAD_DIM

    @classmethod
    def smoke(cls) -> "ModelSizes":
        """Tiny widths for tests: same block layout, ~100x fewer FLOPs."""
        return cls(vae_channels=(8, 16, 16), vae_groups=4, unet_channels=(32, 64, 64), unet_groups=8,
                   text_hidden=64, text_layers=1, head_dim=32)

    def to_dict(self) -> dict:
        return asdict(self)


def vae_config(s: ModelSizes) -> dict:
    n = len(s.vae_channels)
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(s.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=s.vae_groups, sample_size=64,
        mid_block_add_attention=False,  # at 16x16 a conv mid block suffices and is cheaper
    )


def unet_config(s: ModelSizes) -> dict:
    ch = tuple(s.unet_channels)
    return dict(
        sample_size=64 // 2 ** (len(s.vae_channels) - 1), in_channels=4, out_channels=4,
        layers_per_block=s.layers_per_block, block_out_channels=ch, norm_num_groups=s.unet_groups,
        cross_attention_dim=s.text_hidden,
        # Cross-attention at every level, 4x4 included: LEDITS++'s cross-attention mask reads
        # the down/up maps at 1/4 of the latent side (diffusers' rule), i.e. 4x4 here.
        down_block_types=("CrossAttnDownBlock2D",) * len(ch),
        up_block_types=("CrossAttnUpBlock2D",) * len(ch),
        attention_head_dim=tuple(c // s.head_dim for c in ch),  # diffusers' name for the head count
    )


def text_config(s: ModelSizes, vocab: dict[str, int]):
    from transformers import CLIPTextConfig

    bos, eos = special_ids(vocab)
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=s.text_hidden, intermediate_size=4 * s.text_hidden,
        num_hidden_layers=s.text_layers, num_attention_heads=max(1, s.text_hidden // s.head_dim),
        max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", projection_dim=s.text_hidden,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )


def scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


@dataclass
class Models:
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    tokenizer: object


def build(sizes: ModelSizes, tokenizer_dir: str | Path) -> Models:
    """Fresh, randomly initialised modules (seed torch first for reproducibility)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vocab = write_tokenizer(tokenizer_dir)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    return Models(
        vae=AutoencoderKL(**vae_config(sizes)),
        text_encoder=CLIPTextModel(text_config(sizes, vocab)),
        unet=UNet2DConditionModel(**unet_config(sizes)),
        tokenizer=tok,
    )


def save_pipeline(models: Models, folder: str | Path, dtype: torch.dtype = torch.float32,
                  prediction_type: str = "epsilon") -> Path:
    """Write a diffusers StableDiffusionPipeline folder (safetensors) into ``folder``."""
    import copy

    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    def cast(m):  # a cast copy, so the training modules stay fp32
        return m if next(m.parameters()).dtype == dtype else copy.deepcopy(m).to(dtype)

    pipe = StableDiffusionPipeline(
        vae=cast(models.vae), text_encoder=cast(models.text_encoder), tokenizer=models.tokenizer,
        unet=cast(models.unet), scheduler=scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def folder_megabytes(folder: str | Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors")) / 2**20
