"""engine.loader: offline resolution, safetensors-only reading, meta-device loading."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from itertools import chain
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.loader import (
    Components, LoadError, ModelNotFoundError, hub_cache_dir, load_components, parse_device, parse_dtype,
    read_state_dict, resolve,
)

UNET_W = "diffusion_pytorch_model"


def _no_meta(c: Components) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(c, name)
        if m is not None:
            left = [n for n, t in chain(m.named_parameters(), m.named_buffers()) if t.is_meta]
            assert not left, f"{name}: {left[:3]}"


def _assert_same(state_dict: dict, reference: dict) -> None:
    """Bit-exact equality of two state dicts (keys, dtypes, values)."""
    assert state_dict.keys() == reference.keys()
    for k, v in reference.items():
        assert state_dict[k].dtype == v.dtype, k
        assert torch.equal(state_dict[k], v), k


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _clip_ids(c: Components) -> torch.Tensor:
    return c.tokenizer(["a photo", "of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids


# ----------------------------------------------------------------------------- full pipelines


def test_load_sd15(tiny_sd15_dir):
    from engine.models.unet import UNet2DConditionModel
    from transformers import CLIPTextModel

    c = load_components(tiny_sd15_dir)
    assert c.arch == "sd" and c.root == tiny_sd15_dir.resolve()
    assert isinstance(c.unet, UNet2DConditionModel)  # ours, not diffusers'
    assert c.text_encoder_2 is None and c.tokenizer_2 is None
    assert c.vae_dtype == torch.float32 and c.scheduler_config["_class_name"] == "DDIMScheduler"
    assert c.model_index["_class_name"] == "StableDiffusionPipeline"
    _no_meta(c)
    _assert_same(c.unet.state_dict(), load_file(tiny_sd15_dir / "unet" / f"{UNET_W}.safetensors"))
    _assert_same(c.vae.state_dict(), load_file(tiny_sd15_dir / "vae" / f"{UNET_W}.safetensors"))
    # position_ids is a non-persistent buffer: the output proves it was materialised right.
    ref = CLIPTextModel.from_pretrained(tiny_sd15_dir / "text_encoder").eval()
    ids = _clip_ids(c)
    with torch.no_grad():
        assert torch.equal(c.text_encoder(ids).last_hidden_state, ref(ids).last_hidden_state)
    assert not c.unet.training and not any(p.requires_grad for p in c.unet.parameters())


def test_load_sdxl(tiny_sdxl_dir):
    from transformers import CLIPTextModelWithProjection

    c = load_components(tiny_sdxl_dir, dtype="float32")
    assert c.arch == "sdxl" and c.text_encoder is not None and c.tokenizer_2 is not None
    _no_meta(c)
    _assert_same(c.unet.state_dict(), load_file(tiny_sdxl_dir / "unet" / f"{UNET_W}.safetensors"))
    ref = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl_dir / "text_encoder_2").eval()
    ids = _clip_ids(c)
    with torch.no_grad():
        assert torch.equal(c.text_encoder_2(ids).text_embeds, ref(ids).text_embeds)


def test_sdxl_fp16_keeps_vae_fp32_unless_fixed(tiny_sdxl_dir, tmp_path):
    c = load_components(tiny_sdxl_dir, dtype="fp16")
    assert c.unet.dtype == torch.float16 and c.text_encoder_2.dtype == torch.float16
    assert c.vae_dtype == torch.float32 and next(c.vae.parameters()).dtype == torch.float32
    fixed = _copy(tiny_sdxl_dir, tmp_path / "fixed")
    cfg = json.loads((fixed / "vae" / "config.json").read_text())
    (fixed / "vae" / "config.json").write_text(json.dumps({**cfg, "force_upcast": False}))
    c = load_components(fixed, dtype=torch.float16)
    assert c.vae_dtype == torch.float16 and next(c.vae.parameters()).dtype == torch.float16


# ----------------------------------------------------------------------------- variants and shards


@pytest.fixture(scope="module")
def sd15_fp16_dir(tiny_sd15_dir, tmp_path_factory):
    """The tiny SD1.5 pipeline saved by diffusers as an fp16 variant only."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path_factory.mktemp("fp16") / "sd15"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, dtype=torch.float16)
    pipe.save_pretrained(out, variant="fp16")
    return out


def test_fp16_variant(sd15_fp16_dir):
    assert (sd15_fp16_dir / "text_encoder" / "model.fp16.safetensors").is_file()
    c = load_components(sd15_fp16_dir, variant="fp16", dtype="fp16")
    _no_meta(c)
    _assert_same(c.unet.state_dict(), load_file(sd15_fp16_dir / "unet" / f"{UNET_W}.fp16.safetensors"))
    # No variant asked, only the fp16 file there: use it, say so, cast to the asked dtype.
    with pytest.warns(UserWarning, match="'fp16' variant"):
        c = load_components(sd15_fp16_dir)
    assert c.unet.dtype == torch.float32


def test_missing_variant_falls_back(tiny_sd15_dir):
    with pytest.warns(UserWarning, match="plain weights"):
        sd = read_state_dict(tiny_sd15_dir / "unet", UNET_W, variant="fp16")
    assert next(iter(sd.values())).dtype == torch.float32


def test_sharded_unet(tiny_sd15_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    root = _copy(tiny_sd15_dir, tmp_path / "sharded")
    shutil.rmtree(root / "unet")
    UNet2DConditionModel.from_pretrained(tiny_sd15_dir / "unet").save_pretrained(root / "unet", max_shard_size="1MB")
    assert (root / "unet" / f"{UNET_W}.safetensors.index.json").is_file()
    assert len(list((root / "unet").glob(f"{UNET_W}-*-of-*.safetensors"))) > 1
    c = load_components(root)
    _assert_same(c.unet.state_dict(), load_file(tiny_sd15_dir / "unet" / f"{UNET_W}.safetensors"))
    # An index naming a shard that is gone.
    shard = sorted((root / "unet").glob(f"{UNET_W}-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(LoadError, match=shard.name):
        load_components(root)


def test_sharded_fp16_variant_and_text_encoder(tiny_sd15_dir, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_dir / "unet").half()
    unet.save_pretrained(tmp_path / "unet", max_shard_size="1MB", variant="fp16")
    assert (tmp_path / "unet" / f"{UNET_W}.safetensors.index.fp16.json").is_file()
    _assert_same(read_state_dict(tmp_path / "unet", UNET_W, "fp16"), unet.state_dict())
    # older diffusers named the variant index `x.safetensors.fp16.index.json`
    (tmp_path / "unet" / f"{UNET_W}.safetensors.index.fp16.json").rename(
        tmp_path / "unet" / f"{UNET_W}.safetensors.fp16.index.json")
    _assert_same(read_state_dict(tmp_path / "unet", UNET_W, "fp16"), unet.state_dict())
    te = CLIPTextModel.from_pretrained(tiny_sd15_dir / "text_encoder")
    te.save_pretrained(tmp_path / "te", max_shard_size="100KB")
    assert (tmp_path / "te" / "model.safetensors.index.json").is_file()
    _assert_same(read_state_dict(tmp_path / "te", "model"), load_file(tiny_sd15_dir / "text_encoder" / "model.safetensors"))


# ----------------------------------------------------------------------------- hub cache


def _to_cache(src: Path, cache: Path, repo: str, commit: str, ref: str | None = "main") -> Path:
    """Lay ``src`` out like huggingface_hub does: blobs/<sha256>, snapshot symlinks, refs/<ref>."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return repo_dir / "snapshots" / commit


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_hub_id_from_cache(tiny_sd15_dir, hf_home):
    commit = "a" * 40
    snap = _to_cache(tiny_sd15_dir, hf_home / "hub", "org/tiny", commit)
    assert hub_cache_dir() == hf_home / "hub"
    assert resolve("org/tiny") == snap
    assert resolve(f"org/tiny@{commit}") == snap and resolve("org/tiny@main") == snap
    c = load_components("org/tiny")
    _assert_same(c.unet.state_dict(), load_file(tiny_sd15_dir / "unet" / f"{UNET_W}.safetensors"))


def test_hub_cache_env_precedence_and_single_snapshot(tiny_sd15_dir, hf_home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    snap = _to_cache(tiny_sd15_dir, tmp_path / "elsewhere", "org/tiny", "b" * 40, ref=None)
    assert resolve("org/tiny") == snap  # no refs/main: the only snapshot


def test_hub_miss_says_where_it_looked(hf_home):
    with pytest.raises(ModelNotFoundError) as e:
        resolve("org/absent")
    msg = str(e.value)
    assert str(hf_home / "hub" / "models--org--absent") in msg
    assert "local folder" in msg and "hf download org/absent" in msg
    with pytest.raises(ModelNotFoundError, match="revision 'v2'"):
        resolve("org/absent@v2")


# ----------------------------------------------------------------------------- broken folders


def test_missing_component(tiny_sd15_dir, tmp_path):
    root = _copy(tiny_sd15_dir, tmp_path / "novae")
    shutil.rmtree(root / "vae")
    with pytest.raises(LoadError, match="'vae'.*missing"):
        load_components(root)
    shutil.rmtree(root / "unet")
    with pytest.raises(LoadError, match="'unet'"):
        load_components(root)


def test_not_a_pipeline_folder(tiny_sd15_dir):
    with pytest.raises(LoadError, match="model_index.json"):
        resolve(tiny_sd15_dir / "unet")


def test_mismatched_weights(tiny_sd15_dir, tiny_sdxl_dir, tmp_path):
    root = _copy(tiny_sd15_dir, tmp_path / "mixed")
    shutil.copy(tiny_sdxl_dir / "unet" / f"{UNET_W}.safetensors", root / "unet")
    with pytest.raises(LoadError, match="unet: the weights do not"):
        load_components(root)


def test_old_checkpoint_names(tiny_sd15_dir, tmp_path):
    """Old VAEs use query/key/value/proj_attn; hub CLIP files use the ``text_model.`` prefix
    (transformers 5 dropped it) and may carry a stale position_ids."""
    from safetensors.torch import save_file

    root = _copy(tiny_sd15_dir, tmp_path / "old")
    vae_file = root / "vae" / f"{UNET_W}.safetensors"
    new = load_file(vae_file)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in new.items():
        for a, b in old_names.items():
            k = k.replace(f".{a}.", f".{b}.")
        renamed[k] = v
    assert renamed.keys() != new.keys()
    save_file(renamed, vae_file)
    te_file = root / "text_encoder" / "model.safetensors"
    te = load_file(te_file)
    hub_style = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in te.items()}
    save_file({**hub_style, "text_model.embeddings.position_ids": torch.zeros(1, 77)}, te_file)
    c = load_components(root)
    _assert_same(c.vae.state_dict(), new)
    pos = [b for n, b in c.text_encoder.named_buffers() if n.endswith("position_ids")]
    assert len(pos) == 1 and torch.equal(pos[0], torch.arange(77)[None])
    _assert_same({k.removeprefix("text_model."): v for k, v in c.text_encoder.state_dict().items()},
                 {k.removeprefix("text_model."): v for k, v in te.items()})


def test_sdxl_without_first_text_encoder(tiny_sdxl_dir, tmp_path):
    """An SDXL refiner's model_index has text_encoder/tokenizer set to null."""
    root = _copy(tiny_sdxl_dir, tmp_path / "refiner")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None], "tokenizer": [None, None]}))
    shutil.rmtree(root / "text_encoder")
    shutil.rmtree(root / "tokenizer")
    c = load_components(root)
    assert c.text_encoder is None and c.tokenizer is None and c.text_encoder_2 is not None


class _Payload:
    """Unpickling this creates a directory: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_refused_never_unpickled(tiny_sd15_dir, tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps({"w": _Payload(probe)}))
    assert probe.is_dir()  # the payload works when unpickled...
    root = _copy(tiny_sd15_dir, tmp_path / "pickled")
    (root / "unet" / f"{UNET_W}.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (root / "unet" / f"{UNET_W}.bin").write_bytes(pickle.dumps({"conv_in.weight": _Payload(marker)}))
    with pytest.raises(LoadError, match="pickle") as e:
        load_components(root)
    assert "safetensors" in str(e.value) and f"{UNET_W}.bin" in str(e.value)
    assert not marker.exists()  # ...and the loader never unpickled it


def test_corrupt_and_truncated_safetensors(tiny_sd15_dir, tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    bad = folder / f"{UNET_W}.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(LoadError, match=f"{UNET_W}.safetensors.*corrupt"):
        read_state_dict(folder, UNET_W)
    data = (tiny_sd15_dir / "vae" / f"{UNET_W}.safetensors").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=str(bad)):
        read_state_dict(folder, UNET_W)


def test_no_weights_at_all(tmp_path):
    with pytest.raises(LoadError, match="no model.safetensors"):
        read_state_dict(tmp_path, "model")


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("name,want", [
    ("fp32", torch.float32), ("float32", torch.float32), ("fp16", torch.float16), ("float16", torch.float16),
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), (torch.float16, torch.float16),
])
def test_parse_dtype(name, want):
    assert parse_dtype(name) == want


def test_bad_arguments(tiny_sd15_dir):
    with pytest.raises(ValueError, match="unsupported dtype"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match="unsupported dtype"):
        parse_dtype(torch.float64)
    with pytest.raises(ValueError, match="invalid device"):
        parse_device("gpu0")
    assert parse_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_components(tiny_sd15_dir, device="cuda")
    with pytest.raises(ValueError, match="variant"):
        read_state_dict(tiny_sd15_dir / "unet", UNET_W, variant="../x")


def test_a_bundled_name_missing_from_the_install_says_so(monkeypatch, tmp_path):
    import engine.loader as L

    monkeypatch.setitem(L.BUNDLED, "shapes-next", tmp_path / "absent")
    with pytest.raises(L.files.ModelNotFoundError, match="the bundled model 'shapes-next' is not in this install"):
        L.resolve("shapes-next")
