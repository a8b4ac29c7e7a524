"""Reading IP-Adapter files and their image encoders.

An adapter is one safetensors file in the published layout (``ip-adapter_sd15.safetensors``,
``ip-adapter-plus_sdxl_vit-h.safetensors``; h94/IP-Adapter keeps them in ``models/`` and
``sdxl_models/``); its image encoder a transformers ``CLIPVisionModelWithProjection`` folder
(``config.json`` + ``model.safetensors``; ``models/image_encoder`` there). Pickle files
(``.bin``) are refused, as everywhere in overpaint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .files import LoadError, _read_file, read_json, read_state_dict, resolve
from .modules import load_module


def adapter_file(path, weight_name: str | None = None, subfolder: str | None = None) -> Path:
    """The adapter's safetensors file: ``path`` itself, or ``weight_name`` in the folder (or hub id)
    ``path`` (``subfolder`` inside it)."""
    local = Path(os.path.expanduser(str(path)))
    if local.is_file():
        file = local
    else:
        if weight_name is None:
            raise LoadError(f"{path} is not a file: pass the adapter's .safetensors file, or weight_name= the file "
                            f"inside this folder (e.g. 'ip-adapter_sd15.safetensors')")
        inside = str(Path(subfolder or "") / weight_name)
        file = resolve(path, marker=inside) / inside  # a local folder or a cached hub snapshot holding it
    if file.suffix != ".safetensors":
        raise LoadError(f"{file.name} is not a safetensors file; overpaint refuses pickle checkpoints (unpickling can "
                        f"execute code): use the .safetensors release of the adapter")
    return file


def read_adapter(file: Path) -> dict[str, torch.Tensor]:
    return _read_file(file)


def encoder_folder(adapter: Path, image_encoder) -> Path:
    """The image encoder's folder: ``image_encoder`` (a folder or hub id), else an ``image_encoder``
    folder beside the adapter file or one level up (h94/IP-Adapter's layout)."""
    if image_encoder is not None:
        local = Path(os.path.expanduser(str(image_encoder)))
        return local if local.is_dir() else resolve(image_encoder, marker="config.json")
    for cand in (adapter.parent / "image_encoder", adapter.parent.parent / "models" / "image_encoder"):
        if (cand / "config.json").is_file():
            return cand
    raise LoadError(f"no image encoder given and none beside {adapter}: pass image_encoder= a "
                    f"CLIPVisionModelWithProjection folder (config.json + model.safetensors), e.g. h94/IP-Adapter's "
                    f"models/image_encoder")


def load_image_encoder(folder: Path, device, dtype) -> tuple[nn.Module, dict]:
    """transformers' CLIPVisionModelWithProjection and its preprocessing settings (from
    ``preprocessor_config.json`` when the folder has one; CLIP's otherwise)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig.from_dict(read_json(folder / "config.json", "image_encoder"))
    sd = read_state_dict(folder, "model")
    model = load_module("image_encoder", lambda: CLIPVisionModelWithProjection(config), sd, device, dtype,
                        prefix="vision_model.")
    pre = read_json(folder / "preprocessor_config.json", "image_encoder") \
        if (folder / "preprocessor_config.json").is_file() else {}
    return model, pre
