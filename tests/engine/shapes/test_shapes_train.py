"""Trainer smoke test: a few steps of the tiny config, a loadable folder, exact resume."""

import contextlib
import csv
import io
import json

import pytest
import torch
from safetensors.torch import load_file

from engine.shapes import train as T


def _unet(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


STALE_ADAPTER = b"an adapter trained for an earlier UNet"
PRINTED = {}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from engine.shapes import recipes

    out = tmp_path_factory.mktemp("shapes") / "straight"
    stale = out.parent / "export" / recipes.IP_ADAPTER  # exporting over a folder that holds an adapter
    stale.parent.mkdir(parents=True)
    stale.write_bytes(STALE_ADAPTER)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        T.main(["--out", str(out), "--smoke", "--steps", "4", "--vae-steps", "3", "--batch-size", "2",
                "--vae-batch-size", "2", "--ckpt-every", "2", "--time-budget-min", "5", "--screens", "0.5",
                "--no-progress", "--export", str(out.parent / "export")])
    PRINTED["export"] = printed.getvalue()
    return out


def test_smoke_folder_loads_in_diffusers(straight):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(straight))
    ids = pipe.tokenizer("a small red circle on the left, on a white background").input_ids
    assert len(ids) == 14  # bos + 11 words + ',' + eos
    out = pipe("a large blue square in the center, on a gray background", num_inference_steps=2,
               height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)
    assert pipe.vae.config.scaling_factor == 1.0  # the per-channel standardisation lives in the quant convs


def test_smoke_folder_loads_in_overpaint(straight):
    import engine

    pipe = engine.load(str(straight))
    assert pipe.unet is not None and len(pipe.tokenizers) == 1


def test_log_and_summary(straight):
    rows = list(csv.DictReader((straight / "train_log.csv").open()))
    assert {r["stage"] for r in rows} == {"vae", "text", "unet"}
    assert rows[-1]["stage"] == "unet" and int(rows[-1]["step"]) == 4
    assert (straight / "checkpoint.pt").exists() and (straight / "train_summary.json").exists()
    assert json.loads((straight / "train_config.json").read_text())["screens"] == 0.5


def test_export_card_names_no_adapter_and_records_the_screens(straight):
    """The export folder held an adapter trained for the UNet it replaces: the card stops naming
    it, the file is left as it was (the user's), and the retrain command is printed."""
    from engine.shapes import recipes

    export = straight.parent / "export"
    assert json.loads((export / "overpaint.json").read_text()) == recipes.model_card(ip_adapter=False)
    assert json.loads((export / "train_config.json").read_text())["screens"] == 0.5
    assert (export / recipes.IP_ADAPTER).read_bytes() == STALE_ADAPTER
    assert f"python -m engine.shapes.train_ip --model {export} --out RUN" in PRINTED["export"]


def test_resume_matches_uninterrupted_run(straight, tmp_path):
    out = tmp_path / "resumed"
    common = ["--out", str(out), "--smoke", "--vae-steps", "3", "--batch-size", "2", "--vae-batch-size", "2",
              "--ckpt-every", "2", "--time-budget-min", "5", "--screens", "0.5", "--no-progress"]
    T.main(common + ["--steps", "2"])
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2
    T.main(common + ["--steps", "4", "--resume"])
    a, b = _unet(straight), _unet(out)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = [int(r["step"]) for r in csv.DictReader((out / "train_log.csv").open()) if r["stage"] == "unet"]
    assert steps == sorted(set(steps)) and steps[-1] == 4


def test_normalise_latents_standardises_channels_and_keeps_the_decoder_output():
    import copy

    from engine.shapes.model import ModelSizes, vae_config
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_config(ModelSizes.smoke())).eval()
    with torch.no_grad():  # give the channels very different scales and offsets, as training did
        vae.quant_conv.weight[:4] *= torch.tensor([0.2, 1.0, 5.0, 2.0]).view(-1, 1, 1, 1)
        vae.quant_conv.bias[:4] += torch.tensor([0.5, -1.0, 2.0, 0.0])
    before = copy.deepcopy(vae)
    cfg = T.TrainConfig(out="unused", seed=3)
    stats = T.normalise_latents(cfg, vae)
    x, _ = T.scene_batch(cfg.seed, 2, 0, 256)  # the batch the statistics came from
    with torch.no_grad():
        post, ref = vae.encode(x).latent_dist, before.encode(x).latent_dist
        z = post.mean  # [256, 4, 16, 16]
        torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
        torch.testing.assert_close(z.std((0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)
        sigma = torch.tensor(stats["latent_std"]).view(1, -1, 1, 1)
        torch.testing.assert_close(post.std * sigma, ref.std, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(vae.decode(z[:8]).sample, before.decode(ref.mean[:8]).sample, rtol=1e-4, atol=1e-4)
    assert vae.config.scaling_factor == 1.0


def test_scene_batch_masks_cover_the_objects():
    import numpy as np

    from engine.shapes import world

    x, caps, m = T.scene_batch(5, 0, 3, 4, masks=True)
    x2, caps2 = T.scene_batch(5, 0, 3, 4)
    torch.testing.assert_close(x, x2, rtol=0, atol=0)  # asking for masks does not change the scenes
    assert caps == caps2 and m.shape == (4, 1, 64, 64)
    rng = np.random.default_rng([5, 0, 3])
    for i in range(4):
        scene = world.sample_scene(rng)
        assert world.caption(scene) == caps[i]
        torch.testing.assert_close(m[i, 0], torch.from_numpy(world.render_masks(scene).any(0)).float(), rtol=0, atol=0)


def test_scene_batch_partial_captions_keep_the_scenes():
    x, caps = T.scene_batch(5, 1, 3, 16)
    xp, capsp = T.scene_batch(5, 1, 3, 16, partial=0.5)
    torch.testing.assert_close(x, xp, rtol=0, atol=0)  # fragments change the words, never the images
    changed = [(a, b) for a, b in zip(caps, capsp) if a != b]
    assert changed and len(changed) < 16
    assert all("background" not in b or b.startswith("on a") for _, b in changed)


def test_ema_follows_only_what_the_unet_stage_trains():
    cfg = T.TrainConfig(out="unused")
    m = type("M", (), dict(unet=torch.nn.Linear(2, 2), text_encoder=torch.nn.Linear(2, 2)))()
    assert T.trained_modules(cfg, m) == [m.unet]  # the frozen text encoder ships as the text stage left it
    cfg.freeze_text = False
    assert T.trained_modules(cfg, m) == [m.unet, m.text_encoder]


@pytest.mark.parametrize("flag", ["--partial-captions", "--screens"])
@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_shares_are_checked(flag, value, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--out", "unused", flag, value])
    assert f"{flag} is a share between 0 and 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--min-snr", "--vae-object-weight", "--text-steps"])
def test_negative_weights_and_steps_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--out", "unused", flag, "-1"])
    assert f"{flag} must be 0 or more" in capsys.readouterr().err
