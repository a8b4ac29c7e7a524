"""Loading FLUX pipeline folders: sharded transformer weights, T5's tied embedding, clear errors."""

import json
import shutil

import pytest
import torch

import engine
from engine.loading.files import LoadError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from engine.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("flux") / "dev", arch="flux-dev")


def _run(pipe):
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(1, 16, 64, generator=g), torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    return pipe.transformer(x, ctx, pooled, torch.tensor([0.5]), torch.zeros(16, 3), torch.zeros(5, 3),
                            guidance=torch.tensor([3.5]))


def test_sharded_transformer_loads_the_same(folder, tmp_path):
    from diffusers import FluxTransformer2DModel

    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    shutil.rmtree(sharded / "transformer")
    FluxTransformer2DModel.from_pretrained(folder / "transformer").save_pretrained(
        sharded / "transformer", max_shard_size="40KB", safe_serialization=True)
    names = sorted(p.name for p in (sharded / "transformer").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in names and len(names) > 3
    a, b = engine.load(sharded), engine.load(folder)
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():  # the same weights (memory alignment may change the last bit of a GEMM)
        torch.testing.assert_close(_run(a), _run(b), rtol=1e-6, atol=1e-6)


def test_t5_embedding_is_tied(folder):
    t5 = engine.load(folder).text_encoders[1]
    assert t5.shared.weight.data_ptr() == t5.encoder.embed_tokens.weight.data_ptr()


def test_errors(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "vae" / "config.json").read_text())
    cfg["shift_factor"] = None
    (bad / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="needs shift_factor"):
        engine.load(bad)
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    shutil.copytree(folder / "transformer", bad / "t2")
    (bad / "t2" / "config.json").write_text(json.dumps({**cfg, "patch_size": 2}))
    shutil.rmtree(bad / "transformer")
    (bad / "t2").rename(bad / "transformer")
    cfg_v = json.loads((folder / "vae" / "config.json").read_text())
    (bad / "vae" / "config.json").write_text(json.dumps(cfg_v))
    with pytest.raises(LoadError, match="patch_size=2"):
        engine.load(bad)
    idx = json.loads((folder / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**idx, "text_encoder_2": ["transformers", "UMT5EncoderModel"]}))
    with pytest.raises(LoadError, match="T5EncoderModel"):
        engine.load(bad)
