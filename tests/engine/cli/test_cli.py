"""The overpaint command line, run in-process on tiny models."""

import numpy as np
import pytest
from PIL import Image

from engine.cli import main


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _err(capsys):
    return capsys.readouterr().err


def test_tiny_then_generate(tmp_path, capsys):
    assert main(["tiny", str(tmp_path / "m")]) == 0
    out = tmp_path / "out.png"
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "a red circle", "-o", str(out),
                 "--steps", "2", "--no-progress"]) == 0
    assert Image.open(out).size == (32, 32)
    assert main(["tiny", str(tmp_path / "m")]) == 2
    assert "not an empty folder" in _err(capsys)


def test_shapes_is_the_default_model(tmp_path):
    from engine.cli import build_parser

    for argv in (["generate", "--prompt", "x", "-o", "o.png"], ["edit", "in.png", "-o", "o.png"], ["demo", "-o", "d"]):
        assert build_parser().parse_args(argv).model == "shapes"
    out = tmp_path / "circle.png"
    assert main(["generate", "--prompt", "a large red circle in the center, on a white background", "-o", str(out),
                 "--steps", "2", "--no-progress"]) == 0
    assert Image.open(out).size == (64, 64)


def test_generate_several_images(tiny_sd15_dir, tmp_path):
    assert main(["generate", "--model", str(tiny_sd15_dir), "--prompt", "x", "-o", str(tmp_path / "o.png"),
                 "--steps", "1", "--num-images", "2", "--no-progress"]) == 0
    assert (tmp_path / "o_0.png").exists() and (tmp_path / "o_1.png").exists()


def test_generate_chroma_key_with_alpha(tiny_sd15_dir, tmp_path):
    out = tmp_path / "keyed.png"
    assert main(["generate", "--model", str(tiny_sd15_dir), "--prompt", "x", "-o", str(out), "--steps", "1",
                 "--chroma-key", "green", "--alpha", "--no-progress"]) == 0
    assert Image.open(out).mode == "RGBA"
    steered = tmp_path / "steered.png"  # the shift's direction given, not measured
    assert main(["generate", "--model", str(tiny_sd15_dir), "--prompt", "x", "-o", str(steered), "--steps", "1",
                 "--chroma-key", "0,180,60", "--chroma-direction=-1,1,0,1", "--no-progress"]) == 0
    assert not np.array_equal(np.asarray(Image.open(steered)), np.asarray(Image.open(out).convert("RGB")))


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "x", "-o", "o.png", "--alpha"], "also give --chroma-key"),
    (["--prompt", "x", "-o", "o.png", "--chroma-direction", "1,1,0,0"], "also give --chroma-key"),
    (["--prompt", "x", "-o", "o.png", "--chroma-key", "green", "--chroma-direction", "1,1", "--steps", "1",
      "--no-progress"], "2 entries for 4 latent channels"),
    (["--prompt", "x", "-o", "o.png", "--controlnet", "cn"], "go together"),
    (["--prompt", "x", "-o", "o.png", "--controlnet", "cn", "--control-image", "missing.png"], "missing.png"),
    (["--prompt", "x", "-o", "o.jpg", "--chroma-key", "green", "--alpha"], "write a .png or .webp"),
    (["--prompt", "x", "-o", "out.txt"], "must end in one of"),
    (["--prompt", "x", "-o", "/nonexistent/dir/o.png"], "does not exist"),
    (["--prompt", "x", "-o", "o.png", "--device", "cuda"], "CUDA is not available"),
    (["--prompt", "word " * 90, "-o", "o.png", "--steps", "1", "--no-progress"], "at most 75"),
])
def test_generate_errors(tiny_sd15_dir, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--model", str(tiny_sd15_dir), *argv]) == 2
    assert message in _err(capsys)


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "-o", str(tmp_path / "o.png")]) == 2
    assert "nope" in _err(capsys)


def test_bad_arguments_exit_through_argparse(tiny_sd15_dir, photo, capsys):
    with pytest.raises(SystemExit) as e:
        main(["edit", str(photo), "--model", str(tiny_sd15_dir), "--method", "magic", "-o", "o.png"])
    assert e.value.code == 2 and "invalid choice: 'magic'" in _err(capsys)
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_sd15_dir), "--prompt", "x", "-o", "o.png", "--steps", "0"])
    assert "must be positive" in _err(capsys)
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_sd15_dir), "--prompt", "x", "-o", "o.png", "--chroma-key", "0,300,0"])
    assert "R,G,B with values in 0..255" in _err(capsys)
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_sd15_dir), "--prompt", "x", "-o", "o.png", "--chroma-key", "green",
              "--chroma-direction", "2,0,0,0"])
    assert "numbers in [-1, 1]" in _err(capsys)


@pytest.mark.parametrize("method,extra", [
    ("p2p", ["--target-prompt", "a blue circle"]),
    ("ddim", ["--target-prompt", "a blue circle"]),
    ("ddpm", ["--target-prompt", "a blue circle", "--skip", "0.2"]),
    ("ledits++", ["--edit-prompt", "blue", "--edit-scale", "4", "--reverse", "false"]),
    ("pnp", ["--target-prompt", "a blue circle", "--pnp-attn-t", "0.3", "--pnp-f-t", "0.6"]),
    ("masactrl", ["--target-prompt", "a blue circle", "--guidance", "3", "--start-step", "1", "--start-layer", "2",
                  "--mask-words", "circle", "circle", "--mask-threshold", "0.2"]),
    ("null-text", ["--target-prompt", "a blue circle", "--inner-steps", "2", "--early-stop", "1e-4"]),
    ("p2p", ["--target-prompt", "a blue circle", "--invert-with", "null-text", "--inner-steps", "2"]),
    ("pix2pix-zero", ["--direction", "red", "blue", "--xa-guidance", "0.05", "--lambda-kl", "10"]),
    ("pix2pix-zero", ["--target-prompt", "a blue circle", "--guidance", "3"]),
    ("imagic", ["--target-prompt", "a blue circle", "--alpha", "1.5", "--embed-steps", "2", "--tune-steps", "2",
                "--tune", "lora", "--lora-rank", "2", "--tune-lr", "1e-3"]),
])
def test_edit_methods(tiny_sd15_dir, photo, tmp_path, method, extra):
    out = tmp_path / "edited.png"
    argv = ["edit", str(photo), "--model", str(tiny_sd15_dir), "--method", method, "--source-prompt", "a red circle",
            "-o", str(out), "--steps", "3", "--no-progress", *extra]
    assert main(argv) == 0
    assert Image.open(out).size == (32, 32)  # the 64x64 photo is processed at the tiny model's 32x32


def test_edit_saves_and_reuses_the_inversion(tiny_sd15_dir, photo, tmp_path, capsys):
    inv = tmp_path / "inv.safetensors"
    argv = ["edit", str(photo), "--model", str(tiny_sd15_dir), "--method", "ddpm", "--source-prompt", "a red circle",
            "--target-prompt", "a blue circle", "--steps", "3", "--no-progress", "--inversion", str(inv)]
    assert main([*argv, "-o", str(tmp_path / "a.png")]) == 0
    assert "saved inversion" in capsys.readouterr().out
    assert main([*argv, "-o", str(tmp_path / "b.png")]) == 0
    assert "loaded inversion" in capsys.readouterr().out
    a, b = np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    assert np.array_equal(a, b)


def test_edit_errors(tiny_sd15_dir, photo, tmp_path, capsys):
    base = ["edit", "--model", str(tiny_sd15_dir), "--steps", "2", "--no-progress"]
    cases = [
        ([str(tmp_path / "missing.png"), "--target-prompt", "x", "-o", str(tmp_path / "o.png")], "does not exist"),
        ([str(photo), "--target-prompt", "x", "-o", str(photo)], "is the input"),
        ([str(photo), "--method", "ledits++", "-o", str(tmp_path / "o.png")], "needs --edit-prompt"),
        ([str(photo), "--method", "p2p", "-o", str(tmp_path / "o.png")], "needs --target-prompt"),
        ([str(photo), "--method", "p2p", "--target-prompt", "x", "--edit-prompt", "y", "-o", str(tmp_path / "o.png")],
         "--edit-prompt applies to --method ledits++, not p2p"),
        ([str(photo), "--method", "ledits++", "--edit-prompt", "a", "--edit-prompt", "b", "--edit-scale", "1",
          "--edit-scale", "2", "--edit-scale", "3", "-o", str(tmp_path / "o.png")], "given 3 times for 2"),
        ([str(photo), "--method", "p2p", "--source-prompt", "a red circle", "--target-prompt", "a big blue circle",
          "--edit-type", "replace", "-o", str(tmp_path / "o.png")], "token"),
        ([str(photo), "--target-prompt", "x", "--height", "63", "-o", str(tmp_path / "o.png")], "multiples of 2"),
        ([str(photo), "--method", "pix2pix-zero", "-o", str(tmp_path / "o.png")], "needs --target-prompt (the caption "
                                                                                   "of the edited image) or --direction"),
        ([str(photo), "--method", "p2p", "--target-prompt", "x", "--alpha", "2", "-o", str(tmp_path / "o.png")],
         "--alpha applies to --method imagic, not p2p"),
        ([str(photo), "--method", "null-text", "--target-prompt", "x", "--source-guidance", "1",
          "-o", str(tmp_path / "o.png")], "guidance_scale must exceed 1"),
    ]
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not a png")
    cases.append(([str(junk), "--target-prompt", "x", "-o", str(tmp_path / "o.png")], "cannot read image"))
    for argv, message in cases:
        assert main([*base, *argv]) == 2, argv
        assert message in _err(capsys), (argv, message)
    assert photo.exists()  # the user's input is never touched


@pytest.fixture(scope="module")
def tiny_adapter(tiny_sd15_dir, tmp_path_factory):
    """A tiny IP-Adapter (and image encoder) for the tiny SD1.5 model."""
    import engine
    from engine.tiny import make_tiny_ip_adapter

    return make_tiny_ip_adapter(tmp_path_factory.mktemp("ip"), engine.load(tiny_sd15_dir).unet)


def test_image_conditioned_edit_and_generation(tiny_sd15_dir, tiny_adapter, photo, tmp_path, capsys):
    inv = tmp_path / "tight.safetensors"
    argv = ["edit", str(photo), "--model", str(tiny_sd15_dir), "--method", "ddpm", "--source-prompt", "a red circle",
            "--target-prompt", "a blue circle", "--steps", "3", "--no-progress", "--image-scale", "0.7",
            "--ip-adapter", str(tiny_adapter), "--inversion", str(inv)]
    assert main([*argv, "-o", str(tmp_path / "a.png")]) == 0
    from engine.editing import Inversion

    assert Inversion.load(inv).settings["image_scale"] == 0.7
    # a saved image-conditioned inversion needs the adapter again; the edit's scale may differ
    assert main([*argv[:-4], "--inversion", str(inv), "--edit-image-scale", "0.2", "-o", str(tmp_path / "b.png")]) == 2
    assert "needs an IP-Adapter" in _err(capsys)
    assert main([*argv, "--edit-image-scale", "0.2", "-o", str(tmp_path / "b.png")]) == 0
    a, b = np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    assert not np.array_equal(a, b)
    out = tmp_path / "g.png"
    assert main(["generate", "--model", str(tiny_sd15_dir), "--prompt", "x", "-o", str(out), "--steps", "1",
                 "--no-progress", "--ip-image", str(photo), "--ip-adapter", str(tiny_adapter), "--ip-scale", "0.5"]) == 0
    assert out.exists()
    assert main(["generate", "--model", str(tiny_sd15_dir), "--prompt", "x", "-o", str(out), "--steps", "1",
                 "--no-progress", "--ip-adapter", str(tiny_adapter)]) == 2
    assert "needs --ip-image" in _err(capsys)
    assert main(["edit", str(photo), "--model", str(tiny_sd15_dir), "--method", "pix2pix-zero", "--direction", "red",
                 "blue", "--image-scale", "0.5", "-o", str(tmp_path / "h.png"), "--steps", "2", "--no-progress"]) == 2
    assert "--image-scale applies to --method" in _err(capsys)
