"""Finding a model folder offline and reading its safetensors weights.

A model is a local diffusers folder or a hub id already in the local Hugging Face
cache; nothing here touches the network. Only safetensors are read: pickle
checkpoints (.bin, .ckpt, .pt) can run arbitrary code when loaded, so they are
refused with instructions to convert them.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from torch import Tensor

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_HUB_ID = re.compile(r"^([\w.-]+)/([\w.-]+)(?:@([\w./-]+))?$")
_VARIANT = re.compile(r"^[A-Za-z0-9_]+$")


class LoadError(RuntimeError):
    """A model folder or checkpoint that cannot be loaded; the message says what to change."""


class ModelNotFoundError(LoadError, FileNotFoundError):
    """Neither a local pipeline folder nor a hub id present in the local cache."""


# ----------------------------------------------------------------------------- resolve


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, chosen from the env like huggingface_hub does."""
    env = os.environ
    path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not path:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
        )
        path = os.path.join(home, "hub")
    return Path(os.path.expanduser(os.path.expandvars(path)))


def _snapshot(repo_dir: Path, revision: str | None) -> Path | None:
    """The snapshot folder for ``revision`` (a branch, tag or commit) in a cached repo, or None."""
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / (revision or "main")
    if ref.is_file():
        return snapshots / ref.read_text().strip()
    if revision is not None:
        return snapshots / revision if (snapshots / revision).is_dir() else None
    found = sorted(p for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    if len(found) > 1:
        raise ModelNotFoundError(
            f"{repo_dir} holds {len(found)} snapshots ({', '.join(p.name for p in found)}) and no refs/main; "
            f"pick one with 'org/name@<commit>'"
        )
    return found[0] if found else None


def resolve(path_or_id: str | Path, marker: str = "model_index.json") -> Path:
    """Find a diffusers pipeline folder (or, with ``marker="config.json"``, a single model's
    folder such as a ControlNet): a local folder or ``org/name[@revision]`` in the HF cache."""
    local = Path(os.path.expanduser(str(path_or_id)))
    if local.is_dir():
        if not (local / marker).is_file():
            what = ("the root of a diffusers pipeline folder (the one holding model_index.json, unet/, vae/, ...)"
                    if marker == "model_index.json" else f"a diffusers model folder (the one holding {marker})")
            raise LoadError(f"{local.resolve()} is a folder but has no {marker}; pass {what}")
        return local.resolve()
    if local.is_file():
        raise LoadError(
            f"{local.resolve()} is a file; overpaint loads diffusers pipeline folders (with model_index.json). "
            f"Convert a single-file checkpoint once with diffusers: "
            f"StableDiffusionPipeline.from_single_file(path).save_pretrained(folder)"
        )
    match = _HUB_ID.match(str(path_or_id))
    if match is None or ".." in str(path_or_id):
        raise ModelNotFoundError(
            f"{str(path_or_id)!r} is neither an existing folder ({local.resolve()}) nor a hub id of the form "
            f"'org/name' or 'org/name@revision'"
        )
    org, name, revision = match.groups()
    cache = hub_cache_dir()
    repo_dir = cache / f"models--{org}--{name}"
    snap = _snapshot(repo_dir, revision) if repo_dir.is_dir() else None
    if snap is not None and (snap / marker).is_file():
        return snap
    where = f"{snap} (no {marker}: incomplete download?)" if snap else str(repo_dir)
    repo = f"{org}/{name}"
    raise ModelNotFoundError(
        f"cannot find model {str(path_or_id)!r}. Looked in:\n"
        f"  - local folder {local.resolve()}: does not exist\n"
        f"  - Hugging Face cache {where}"
        + (f" at revision {revision!r}" if revision else "")
        + " (cache from HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)\n"
        f"overpaint never downloads. Either pass a local diffusers pipeline folder, or on a machine with "
        f"network run `hf download {repo}` (older: `huggingface-cli download {repo}`) and copy its cache "
        f"folder here as {cache} (or point HF_HUB_CACHE / HF_HOME at it)."
    )


# ----------------------------------------------------------------------------- state dicts


def _shards(index: Path) -> tuple[list[Path], set[str]]:
    """Shard files (in order) and tensor names listed by a sharded checkpoint's index."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoadError(f"cannot read shard index {index}: {e}; re-download it") from e
    files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise LoadError(
            f"shard index {index} names {len(missing)} shard(s) that are missing, e.g. {missing[:3]}; "
            f"the download is incomplete: fetch the missing files"
        )
    return files, set(weight_map)


def _find(folder: Path, stem: str, variant: str | None) -> tuple[list[Path], set[str] | None] | None:
    """Safetensors files of one variant (None: the plain one), single or sharded; None if absent."""
    single = folder / (f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors")
    if single.exists() or single.is_symlink():  # a dangling cache link is reported when read
        return [single], None
    # diffusers/transformers name a variant index `x.safetensors.index.fp16.json`;
    # older diffusers wrote `x.safetensors.fp16.index.json`.
    names = [f"{stem}.safetensors.index.{variant}.json", f"{stem}.safetensors.{variant}.index.json"] if variant \
        else [f"{stem}.safetensors.index.json"]
    for name in names:
        if (folder / name).is_file():
            return _shards(folder / name)
    return None


def _variants(folder: Path, stem: str) -> list[str]:
    """Variant names (e.g. 'fp16') present for ``stem`` in ``folder``."""
    found = set()
    for p in folder.glob(f"{stem}.*"):
        rest = p.name[len(stem) + 1:]
        for pattern in (r"^(\w+)\.safetensors$", r"^safetensors\.index\.(\w+)\.json$", r"^safetensors\.(\w+)\.index\.json$"):
            m = re.match(pattern, rest)
            if m and _VARIANT.match(m.group(1)) and m.group(1) != "index":
                found.add(m.group(1))
    return sorted(found)


def _refuse_pickle(folder: Path, stem: str) -> None:
    """No safetensors found: explain, and refuse any pickle checkpoint instead of reading it."""
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES) or
                     p.name.endswith(".bin.index.json")) if folder.is_dir() else []
    if pickles:
        src = pickles[0]
        raise LoadError(
            f"{folder} holds only pickle checkpoint(s) {pickles[:4]}, which overpaint refuses to read: "
            f"unpickling can execute arbitrary code. Convert it once to safetensors (only if you trust "
            f"the file), then retry:\n"
            f"  python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load('{folder / src}', map_location='cpu', weights_only=True); "
            f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{folder / (stem + '.safetensors')}')\""
            + ("\n(sharded: or load it once with diffusers/transformers and re-save it with "
               "save_pretrained(folder, safe_serialization=True))" if len(pickles) > 1 else "")
        )
    listing = sorted(p.name for p in folder.iterdir())[:10] if folder.is_dir() else "folder missing"
    raise LoadError(
        f"no {stem}.safetensors (nor a sharded {stem}.safetensors.index.json) in {folder}; it holds {listing}. "
        f"Re-download the component's weights"
    )


def _read_file(path: Path) -> dict[str, Tensor]:
    """All tensors of one safetensors file, on CPU; a broken file is named in the error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"cannot read safetensors file {path}: {e}; the file is corrupt or truncated, "
                        f"re-download it") from e


def read_state_dict(component_dir: Path, weights_name: str, variant: str | None = None) -> dict[str, Tensor]:
    """Read a component's weights: ``{weights_name}[.{variant}].safetensors`` or its sharded form.

    ``weights_name`` is the stem ("diffusion_pytorch_model", "model"). When no variant
    is asked and only a variant exists, that one is used (with a warning); when the
    asked variant is absent, the plain weights are used (with a warning).
    """
    folder = Path(component_dir)
    stem = weights_name.removesuffix(".safetensors")
    if variant is not None and not _VARIANT.match(variant):
        raise ValueError(f"variant must be a name like 'fp16', got {variant!r}")
    found = _find(folder, stem, variant)
    if found is None and variant is not None and (found := _find(folder, stem, None)) is not None:
        warnings.warn(f"{folder}: no {variant!r} variant of {stem}; loading the plain weights instead", stacklevel=2)
    if found is None and variant is None and folder.is_dir():
        variants = _variants(folder, stem)
        if len(variants) > 1:
            raise LoadError(f"{folder} has no plain {stem}.safetensors but variants {variants}; pass variant=one of them")
        if variants:
            warnings.warn(f"{folder}: no plain {stem}.safetensors; using the {variants[0]!r} variant", stacklevel=2)
            found = _find(folder, stem, variants[0])
    if found is None:
        _refuse_pickle(folder, stem)
    files, expected = found
    state_dict: dict[str, Tensor] = {}
    for path in files:
        part = _read_file(path)
        if dup := state_dict.keys() & part.keys():
            raise LoadError(f"{path} repeats tensors of an earlier shard, e.g. {sorted(dup)[:3]}")
        state_dict.update(part)
    if expected is not None and (lost := expected - state_dict.keys()):
        raise LoadError(f"the shard index in {folder} lists tensors no shard holds, e.g. {sorted(lost)[:3]}")
    return state_dict


def read_json(path: Path, what: str) -> dict:
    """A JSON file of the model folder; a missing or broken one is a LoadError naming it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{what}: missing {path}; the model folder is incomplete") from None
    except (OSError, ValueError) as e:
        raise LoadError(f"{what}: cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise LoadError(f"{what}: {path} holds a JSON {type(data).__name__}, not an object; the file is damaged")
    return data
