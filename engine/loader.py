"""Load a diffusers-format SD1.x/2.x or SDXL pipeline folder into overpaint's modules.

Offline by design (a local folder, or a hub id already in the local Hugging Face
cache) and safetensors only; see ``engine/loading/`` for the pieces.

    resolve(path_or_id)                  -> Path of the pipeline folder ("shapes": the bundled model)
    read_state_dict(dir, name, variant)  -> {key: tensor} on CPU
    load_components(path_or_id, ...)     -> Components (unet, vae, text encoders, ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.loading import files
from engine.loading.card import ModelCard, identity
from engine.loading.files import LoadError, ModelNotFoundError, hub_cache_dir, read_json, read_state_dict
from engine.loading.flux import FluxComponents, is_flux, load_flux_components
from engine.loading.modules import load_module, load_text_encoder, load_tokenizer, load_unet, load_vae

__all__ = [
    "Components", "FluxComponents", "LoadError", "ModelCard", "ModelNotFoundError", "hub_cache_dir", "load_components",
    "load_module",
    "load_text_encoder", "load_tokenizer", "load_unet", "load_vae", "parse_device", "parse_dtype",
    "read_state_dict", "resolve",
]

# Names of the models that ship inside the package (an existing local folder of that name wins).
# "shapes-v2": the same recipe with a third of its scenes on green or blue screens (engine.shapes.
# world.SCREENS), which chroma-key generation needs; it replaces "shapes" once every figure measured
# on "shapes" is measured on it.
BUNDLED = {"shapes": Path(__file__).parent / "shapes" / "model",
           "shapes-v2": Path(__file__).parent / "shapes" / "model_v2",
           "shapes-dit": Path(__file__).parent / "shapes" / "dit_model"}


def resolve(path_or_id: str | Path) -> Path:
    """A pipeline folder: a bundled model's name, a local folder or a cached hub id."""
    name = str(path_or_id)
    if name in BUNDLED and not Path(name).is_dir():
        if not (BUNDLED[name] / "model_index.json").is_file():
            present = [repr(n) for n in BUNDLED if (BUNDLED[n] / "model_index.json").is_file()]
            use = f"use {', '.join(present)} or a pipeline folder" if present else "pass a pipeline folder"
            raise files.ModelNotFoundError(
                f"the bundled model {name!r} is not in this install ({BUNDLED[name]} has no model_index.json); {use}")
        return files.resolve(BUNDLED[name])
    return files.resolve(path_or_id)


DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch.float32/float16/bfloat16 or one of their names ("fp16", "bf16", ...)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(DTYPES)} or torch.float32/float16/bfloat16")


def parse_device(device: str | torch.device) -> torch.device:
    """A usable torch device ("cpu", "cuda", "cuda:1", "mps"), checked against this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}; use e.g. 'cpu' or 'cuda'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked but CUDA is not available here; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked but MPS is not available here; use device='cpu'")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; use 'cpu', 'cuda[:N]' or 'mps'")
    return dev


@dataclass
class Components:
    """Everything a Stable Diffusion (XL) pipeline needs, loaded and ready for inference."""

    root: Path
    model_index: dict
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module | None  # None only for an SDXL refiner (model_index says null)
    text_encoder_2: nn.Module | None
    tokenizer: object | None
    tokenizer_2: object | None
    scheduler_config: dict
    arch: str  # "sd" or "sdxl"
    vae_dtype: torch.dtype
    card: ModelCard = field(default_factory=ModelCard)  # the folder's overpaint.json (empty if none)
    name: str = ""  # what the user loaded it as (a folder, a hub id or a bundled name)
    identity: str = ""  # hash of configs and weights' headers (see engine.loading.card.identity)


# model_index entry -> the class we support for it
EXPECTED = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": None,  # any: only its config is read
}


def _component(root: Path, model_index: dict, name: str, required: bool) -> Path | None:
    """The folder of a component named in model_index.json; None if model_index leaves it out."""
    entry = model_index.get(name)
    named = isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None
    if not named:
        if required:
            raise LoadError(f"{root / 'model_index.json'} names no {name!r} component, which overpaint needs")
        return None
    if EXPECTED[name] is not None and entry[1] not in EXPECTED[name]:
        raise LoadError(f"component {name!r} is a {entry[1]}; overpaint supports only {' / '.join(EXPECTED[name])}")
    folder = root / name
    if not folder.is_dir():
        raise LoadError(
            f"model_index.json names component {name!r} ({entry[1]}) but the folder {folder} is missing; "
            f"the download is incomplete: fetch the {name}/ files"
        )
    return folder


def load_components(path_or_id: str | Path, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = torch.float32,
                    variant: str | None = None) -> Components | FluxComponents:
    """Load unet, vae, text encoder(s), tokenizer(s) and scheduler config of a pipeline (a FLUX
    folder gives :class:`~engine.loading.flux.FluxComponents`: a transformer, CLIP and T5).

    The SDXL VAE overflows in fp16, so with ``dtype`` fp16 it stays in fp32 unless
    its config says ``force_upcast: false`` (e.g. the fp16-fix VAE); see ``vae_dtype``.
    """
    device, dtype = parse_device(device), parse_dtype(dtype)
    root = resolve(path_or_id)
    model_index = read_json(root / "model_index.json", "model_index")
    if is_flux(model_index):
        c = load_flux_components(root, model_index, device, dtype, variant)
        c.card, c.name, c.identity = ModelCard.read(root), str(path_or_id), identity(root, model_index)
        return c
    unet_dir = _component(root, model_index, "unet", True)
    sdxl = read_json(unet_dir / "config.json", "unet").get("addition_embed_type") == "text_time"
    folders = {name: _component(root, model_index, name, required=not (sdxl and name in ("text_encoder", "tokenizer")))
               for name in ("vae", "text_encoder", "tokenizer", "scheduler")}
    for name in ("text_encoder_2", "tokenizer_2"):
        folders[name] = _component(root, model_index, name, required=sdxl)
    vae_config = read_json(folders["vae"] / "config.json", "vae")
    upcast = sdxl and dtype == torch.float16 and vae_config.get("force_upcast", True)
    vae_dtype = torch.float32 if upcast else dtype

    def maybe(name, load):
        return load(folders[name]) if folders[name] is not None else None

    return Components(
        root=root,
        model_index=model_index,
        unet=load_unet(unet_dir, device, dtype, variant),
        vae=load_vae(folders["vae"], device, vae_dtype, variant),
        text_encoder=maybe("text_encoder", lambda f: load_text_encoder(f, device, dtype, variant)),
        text_encoder_2=maybe("text_encoder_2", lambda f: load_text_encoder(f, device, dtype, variant, True)),
        tokenizer=maybe("tokenizer", load_tokenizer),
        tokenizer_2=maybe("tokenizer_2", load_tokenizer),
        scheduler_config=read_json(folders["scheduler"] / "scheduler_config.json", "scheduler"),
        arch="sdxl" if sdxl else "sd",
        vae_dtype=vae_dtype,
        card=ModelCard.read(root),
        name=str(path_or_id),
        identity=identity(root, model_index),
    )

