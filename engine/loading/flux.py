"""Loading a diffusers ``FluxPipeline`` folder (FLUX.1-dev / -schnell, the bundled Shapes DiT).

    transformer     our FluxTransformer2DModel (``transformer/config.json`` + sharded safetensors)
    vae             diffusers' AutoencoderKL (16 latent channels, shift and scaling factors)
    text_encoder    transformers' CLIPTextModel (its pooled output)
    text_encoder_2  transformers' T5EncoderModel (the token sequence)
    tokenizer(_2)   CLIPTokenizer, T5TokenizerFast
    scheduler       FlowMatchEulerDiscreteScheduler settings (resolution-dependent shift for dev)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .card import ModelCard
from .files import LoadError, read_json, read_state_dict
from .modules import _load_model, load_module, load_text_encoder, load_tokenizer, load_vae

FLUX_EXPECTED = {
    "transformer": ("FluxTransformer2DModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "text_encoder_2": ("T5EncoderModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "tokenizer_2": ("T5Tokenizer", "T5TokenizerFast"),
    "scheduler": ("FlowMatchEulerDiscreteScheduler",),
}


@dataclass
class FluxComponents:
    """Everything a FLUX pipeline needs, loaded and ready for inference."""

    root: Path
    model_index: dict
    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    tokenizer: object
    tokenizer_2: object
    scheduler_config: dict
    vae_dtype: torch.dtype
    arch: str = "flux"
    card: ModelCard = field(default_factory=ModelCard)
    name: str = ""
    identity: str = ""


def is_flux(model_index: dict) -> bool:
    entry = model_index.get("transformer")
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] == "FluxTransformer2DModel"


def _folder(root: Path, model_index: dict, name: str) -> Path:
    entry = model_index.get(name)
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
        raise LoadError(f"{root / 'model_index.json'} names no {name!r} component, which a FLUX pipeline needs")
    if entry[1] not in FLUX_EXPECTED[name]:
        raise LoadError(f"component {name!r} is a {entry[1]}; overpaint's FLUX support takes only "
                        f"{' / '.join(FLUX_EXPECTED[name])}")
    folder = root / name
    if not folder.is_dir():
        raise LoadError(f"model_index.json names component {name!r} ({entry[1]}) but the folder {folder} is missing; "
                        f"the download is incomplete: fetch the {name}/ files")
    return folder


def load_flux_transformer(folder: Path, device, dtype, variant=None) -> nn.Module:
    from engine.models.flux import FluxTransformer2DModel
    from engine.models.flux_config import FluxConfig

    return _load_model("transformer", folder, FluxConfig, FluxTransformer2DModel, device, dtype, variant)


def load_t5(folder: Path, device, dtype, variant=None) -> nn.Module:
    """transformers' T5EncoderModel; the token embedding tied to ``shared`` (checkpoints keep one copy)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config.from_dict(read_json(folder / "config.json", folder.name))
    sd = read_state_dict(folder, "model", variant)
    if "shared.weight" in sd:
        sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    elif "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    return load_module(folder.name, lambda: T5EncoderModel(config), sd, device, dtype)


def load_t5_tokenizer(folder: Path):
    from transformers import T5TokenizerFast

    if not any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        raise LoadError(f"{folder.name}: {folder} has neither tokenizer.json nor spiece.model")
    try:
        return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; the folder is what matters
        raise LoadError(f"{folder.name}: cannot load the T5 tokenizer in {folder}: {e}") from e


def load_flux_components(root: Path, model_index: dict, device: torch.device, dtype: torch.dtype,
                         variant: str | None = None) -> FluxComponents:
    folders = {name: _folder(root, model_index, name) for name in FLUX_EXPECTED}
    vae_config = read_json(folders["vae"] / "config.json", "vae")
    if vae_config.get("shift_factor") is None:
        raise LoadError(f"vae ({folders['vae']}): a FLUX VAE config needs shift_factor (FLUX.1's is 0.1159)")
    upcast = dtype == torch.float16 and vae_config.get("force_upcast", True)
    vae_dtype = torch.float32 if upcast else dtype
    return FluxComponents(
        root=root, model_index=model_index,
        transformer=load_flux_transformer(folders["transformer"], device, dtype, variant),
        vae=load_vae(folders["vae"], device, vae_dtype, variant),
        text_encoder=load_text_encoder(folders["text_encoder"], device, dtype, variant),
        text_encoder_2=load_t5(folders["text_encoder_2"], device, dtype, variant),
        tokenizer=load_tokenizer(folders["tokenizer"]),
        tokenizer_2=load_t5_tokenizer(folders["tokenizer_2"]),
        scheduler_config=read_json(folders["scheduler"] / "scheduler_config.json", "scheduler"),
        vae_dtype=vae_dtype,
    )
