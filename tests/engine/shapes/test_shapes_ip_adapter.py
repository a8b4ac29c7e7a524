"""The Shapes IP-Adapter: its trainer (smoke, resume), its files in the published layout (our loader
and diffusers' read them), and the bundled adapter through the model's card."""

import json

import pytest
import torch

import engine
from engine.shapes import train_ip as T
from engine.shapes import world


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ip") / "run"
    T.main(["--out", str(out), "--smoke", "--no-progress"])
    assert json.loads((out / "train_config.json").read_text())["screens"] == 0.0  # as the bundled model's training
    return out


def test_smoke_run_writes_a_loadable_adapter_and_resumes(trained, tmp_path):
    file = trained / T.ADAPTER_FILE
    assert file.is_file() and (trained / "image_encoder" / "config.json").is_file()
    pipe = engine.load("shapes")
    adapter = pipe.load_ip_adapter(file)
    assert adapter.kind == "plus" and adapter.tokens == 4
    scene = world.sample_scene(__import__("numpy").random.default_rng(0))
    ip = pipe.image_prompt(world.render(scene))
    assert ip.cond.shape == (1, 4, 128) and torch.isfinite(ip.cond).all()
    # resuming from the last checkpoint for two more steps continues the run (its log grows)
    T.main(["--out", str(trained), "--smoke", "--no-progress", "--resume", "--steps", "6"])
    assert (trained / "train_log.csv").read_text().strip().splitlines()[-1].startswith("ip,6,")


def test_diffusers_loads_the_exported_layout(trained):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    state = load_file(str(trained / T.ADAPTER_FILE))
    unet = UNet2DConditionModel.from_pretrained(str(engine.load("shapes").components.root / "unet"))
    unet._load_ip_adapter_weights({p: {k.removeprefix(p + "."): v for k, v in state.items() if k.startswith(p + ".")}
                                   for p in ("image_proj", "ip_adapter")})
    assert unet.encoder_hid_proj is not None


def test_bundled_adapter_tightens_a_guided_inversion():
    """The shipped adapter through the model's card; on a ShapesEdit scene where guided (7.5) DDIM
    inversion drifts away, conditioning it on the image itself (Tight Inversion) brings the
    reconstruction back (benchmarks/shapes_tight.py measures the rest)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from benchmarks.shapes_edit import _u8, make_cases
    from engine.shapes import metrics

    pipe = engine.load("shapes")
    adapter = pipe.load_ip_adapter()  # the card's ip_adapter: model/ip_adapter/
    assert adapter.kind == "plus" and adapter.tokens == 16
    scene, _ = next(c for c in make_cases(35) if c[1].kind == "colour")
    src = world.render(scene)
    psnr = {}
    for name, kw in (("plain", {}), ("tight", dict(image_condition=True, image_scale=1.0))):
        inv = pipe.invert(src, world.caption(scene), method="ddim", steps=30, guidance_scale=7.5, progress=False, **kw)
        psnr[name] = metrics.psnr(_u8(pipe.edit(inv, "ddim", None, output_type="pt", progress=False)), src)
    assert psnr["tight"] > psnr["plain"] + 10, psnr


def test_screens_follow_the_model_unless_given(tmp_path, capsys):
    assert T.model_screens("shapes") == 0.0  # trained before screens existed: its config does not say
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / "train_config.json").write_text('{"screens": 0.25}')
    assert T.model_screens(str(folder)) == 0.25
    assert T.parse_args(["--out", "unused", "--model", str(folder)]).screens is None  # read when the run starts
    assert T.parse_args(["--out", "unused", "--screens", "0.5"]).screens == 0.5
    with pytest.raises(SystemExit):
        T.parse_args(["--out", "unused", "--screens", "2"])
    assert "--screens is a share between 0 and 1" in capsys.readouterr().err


def test_export_into_its_model_folder_names_the_adapter_in_the_card(tmp_path):
    import json
    import shutil

    from engine.loader import resolve
    from engine.shapes import recipes

    folder = tmp_path / "pipe"  # a Shapes model without an adapter
    shutil.copytree(resolve("shapes"), folder, ignore=shutil.ignore_patterns("ip_adapter"))
    recipes.write_card(folder, recipes.model_card(ip_adapter=False))
    before = (folder / "overpaint.json").read_text()
    smoke = ["--smoke", "--no-progress", "--export", str(folder / "ip_adapter")]
    T.main(["--out", str(tmp_path / "other"), "--model", "shapes"] + smoke)  # trained for another UNet
    assert (folder / recipes.IP_ADAPTER).is_file() and (folder / "overpaint.json").read_text() == before
    T.main(["--out", str(tmp_path / "own"), "--model", str(folder)] + smoke)
    assert json.loads((folder / "overpaint.json").read_text()) == recipes.model_card()
    assert engine.load(str(folder)).load_ip_adapter().tokens == 4  # found through the card


def test_a_flux_model_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="UNet Shapes models; 'shapes-dit' is not one"):
        T.main(["--out", str(tmp_path / "run"), "--smoke", "--no-progress", "--model", "shapes-dit"])
