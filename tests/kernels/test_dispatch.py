"""The measured table (kernels/configs.py) and best-backend dispatch (kernels/dispatch.py), on CPU."""
import json

import pytest
import torch

from kernels import configs, dispatch

DEVICE = "NVIDIA Test GPU 80GB"


@pytest.fixture
def table(tmp_path, monkeypatch):
    entries = [
        dict(dtype="float16", D=40, variant="plain", n_q=4096, n_k=77, backend="flash", config=None),
        dict(dtype="float16", D=40, variant="plain", n_q=1024, n_k=1024, backend="ours",
             config=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)),
        dict(dtype="float16", D=40, variant="store", n_q=4096, n_k=77, backend="ours",
             config=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)),
        dict(dtype="bfloat16", D=128, variant="plain", n_q=4608, n_k=4608, backend="warp-drive", config=None),
    ]
    (tmp_path / f"{configs.slug(DEVICE)}.json").write_text(json.dumps(dict(device=DEVICE, entries=entries)))
    (tmp_path / "other-gpu.json").write_text(json.dumps(dict(device="Somebody else", entries=entries)))
    monkeypatch.setattr(configs, "TABLES", tmp_path)
    dispatch.clear_cache()
    yield tmp_path
    dispatch.clear_cache()


def test_nearest_entry_and_backend(table):
    assert configs.slug(DEVICE) == "nvidia-test-gpu-80gb"
    # nearest shape in log space: 3600 x 77 -> the 4096 x 77 entry; 900 x 900 -> 1024 x 1024
    assert dispatch.choose(DEVICE, torch.float16, 40, 3600, 77) == "flash"
    assert dispatch.choose(DEVICE, torch.float16, 40, 900, 900) == "ours"
    entry = configs.lookup(DEVICE, torch.float16, 40, 900, 900)
    assert entry["config"] == dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    assert configs.lookup(DEVICE, torch.float16, 40, 4096, 77, "store")["config"]["BLOCK_M"] == 128


def test_unmeasured_means_ours(table):
    assert dispatch.choose(DEVICE, torch.float16, 64, 4096, 77) == "ours"  # no entry for D=64
    assert dispatch.choose(DEVICE, torch.float32, 40, 4096, 77) == "ours"  # nor for fp32
    assert dispatch.choose("Somebody else", torch.float16, 40, 4096, 77) == "ours"  # file names another GPU
    assert dispatch.choose("No such GPU", torch.float16, 40, 4096, 77) == "ours"
    assert dispatch.choose(DEVICE, torch.bfloat16, 128, 4608, 4608) == "ours"  # unknown backend name


def test_cpu_tensors_never_dispatch(table):
    q = torch.zeros(1, 2, 8, 40)
    assert dispatch.backend(q, q) == "ours"


def test_shipped_tables_are_well_formed():
    # Every shipped table names its device and holds complete entries (none is shipped without a GPU run).
    for path in configs.TABLES.glob("*.json"):
        data = json.loads(path.read_text())
        assert path.stem == configs.slug(data["device"]), path
        for e in data["entries"]:
            assert {"dtype", "D", "variant", "n_q", "n_k", "backend"} <= set(e), (path, e)
            assert e["backend"] in dispatch.BACKENDS, (path, e)


def test_heuristic_blocks():
    # fp16 SDXL cross-attention: 128-row query tiles, 64-wide key tiles; Nk < 64 or D = 40 -> 32-wide tiles
    assert configs.heuristic(4096, 77, 64) == dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    assert configs.heuristic(4096, 16, 64)["BLOCK_N"] == 32
    assert configs.heuristic(4096, 77, 48)["BLOCK_N"] == 32
    assert configs.heuristic(4096, 77, 48, interpret=True)["num_stages"] == 1
    assert configs.heuristic(256, 77, 160)["num_warps"] == 8  # 160 = 128 + 32 wide accumulators
    assert configs.heuristic(4096, 77, 48, store=True)["BLOCK_M"] == 64
