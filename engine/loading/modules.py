"""Building modules with meta parameters and assigning checkpoint tensors into them.

Parameters are created on the ``meta`` device (no random init, no second copy in
memory) and replaced by the checkpoint's tensors; buffers the checkpoint does not
hold are computed by the constructor as usual.
"""

from __future__ import annotations

import contextlib
import re
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor, nn

from .files import LoadError, read_json, read_state_dict


@contextlib.contextmanager
def _params_on_meta():
    """Create parameters on ``meta`` while buffers stay real.

    Non-persistent buffers (CLIP's ``position_ids``) are not in checkpoints, so
    they must be computed by the constructor; parameters will be replaced by the
    checkpoint, so allocating and initialising them would be wasted work.
    (Patches nn.Module globally for the duration: do not build modules on other
    threads meanwhile.)
    """
    register = nn.Module.register_parameter

    def to_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _vae_key(key: str) -> str:
    """Rename old diffusers VAE attention names (query/key/value/proj_attn) to the current ones."""
    m = re.match(r"^(.*attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", key)
    if m is None:
        return key
    new = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}[m.group(2)]
    return f"{m.group(1)}.{new}.{m.group(3)}"


def _fit_prefix(key: str, expected: set[str], prefix: str) -> str:
    """Add or drop ``prefix`` when that turns an unknown key into an expected one."""
    if key in expected or not prefix:
        return key
    if key.startswith(prefix) and key[len(prefix):] in expected:
        return key[len(prefix):]
    return prefix + key if prefix + key in expected else key


def load_module(name: str, build, state_dict: dict[str, Tensor], device: torch.device, dtype: torch.dtype,
                prefix: str = "") -> nn.Module:
    """Build ``build()`` with meta parameters, assign ``state_dict``, cast, and check nothing is left on meta.

    ``prefix``: a wrapper-module prefix that checkpoints may or may not carry (CLIP's
    ``text_model.``: transformers 5 dropped it from CLIPTextModel, hub files keep it).
    """
    with _params_on_meta():
        module = build()
    persistent = set(module.state_dict())
    buffers = {n for n, _ in module.named_buffers()}
    state_dict = {_fit_prefix(k, persistent | buffers, prefix): v for k, v in state_dict.items()}
    # Old CLIP checkpoints still carry position_ids; the constructor's copy is the right one.
    state_dict = {k: v for k, v in state_dict.items() if k not in buffers - persistent}
    try:
        result = module.load_state_dict(state_dict, assign=True, strict=False)
    except RuntimeError as e:  # shape mismatches: torch lists every one; name the count and the first few
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        shown = "; ".join(lines[:3]) if lines else str(e).splitlines()[0]
        more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
        raise LoadError(f"{name}: the weights do not fit its config.json: {shown}{more}; check that config.json "
                        f"and the weights belong together") from e
    if result.missing_keys or result.unexpected_keys:
        raise LoadError(
            f"{name}: the weights do not match the model built from its config.json: "
            f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:5]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:5]}); "
            f"check that config.json and the weights belong together"
        )
    nn.Module.to(module, device=device, dtype=dtype)  # plain cast: skip diffusers' chatty override
    on_meta = [n for n, t in chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if on_meta:
        raise LoadError(f"{name}: tensors left uninitialised on meta: {on_meta[:5]}")
    return module.eval().requires_grad_(False)


def _load_model(name: str, folder: Path, config_cls, model_cls, device, dtype, variant=None) -> nn.Module:
    """One of our diffusers-format models: ``config_cls.from_dict(config.json)`` (errors name the
    component and folder), then ``diffusion_pytorch_model*.safetensors`` assigned into it."""
    try:
        config = config_cls.from_dict(read_json(folder / "config.json", name))
    except ValueError as e:
        raise LoadError(f"{name} ({folder}): {e}") from e
    sd = read_state_dict(folder, "diffusion_pytorch_model", variant)
    return load_module(name, lambda: model_cls(config), sd, device, dtype)


def load_unet(folder: Path, device, dtype, variant=None) -> nn.Module:
    """overpaint's UNet from ``unet/config.json`` and diffusers' weights."""
    from engine.models.unet import UNet2DConditionModel, UNetConfig

    return _load_model("unet", folder, UNetConfig, UNet2DConditionModel, device, dtype, variant)


def load_controlnet(folder: Path, device, dtype, variant=None) -> nn.Module:
    """overpaint's ControlNet from a diffusers ``ControlNetModel`` folder (config.json + weights)."""
    from engine.models.controlnet import ControlNetConfig, ControlNetModel

    return _load_model("controlnet", folder, ControlNetConfig, ControlNetModel, device, dtype, variant)


def load_vae(folder: Path, device, dtype, variant=None) -> nn.Module:
    """diffusers' AutoencoderKL from ``vae/config.json`` and its weights."""
    from diffusers import AutoencoderKL

    config = read_json(folder / "config.json", "vae")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise LoadError(f"vae ({folder}): {config['_class_name']} is not supported; only AutoencoderKL is")
    sd = {_vae_key(k): v for k, v in read_state_dict(folder, "diffusion_pytorch_model", variant).items()}
    return load_module("vae", lambda: AutoencoderKL.from_config(config), sd, device, dtype)


def load_text_encoder(folder: Path, device, dtype, variant=None, with_projection: bool = False) -> nn.Module:
    """transformers' CLIPTextModel (or CLIPTextModelWithProjection, SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    config = CLIPTextConfig.from_dict(read_json(folder / "config.json", folder.name))
    sd = read_state_dict(folder, "model", variant)
    return load_module(folder.name, lambda: cls(config), sd, device, dtype, prefix="text_model.")


def load_tokenizer(folder: Path):
    """CLIPTokenizer from a local folder (vocab.json + merges.txt, or tokenizer.json)."""
    from transformers import CLIPTokenizer

    if not ((folder / "tokenizer.json").is_file() or
            ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        raise LoadError(f"{folder.name}: {folder} has neither tokenizer.json nor vocab.json + merges.txt")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; the folder is what matters
        raise LoadError(f"{folder.name}: cannot load the CLIP tokenizer in {folder}: {e}") from e
