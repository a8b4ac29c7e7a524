"""A newcomer's bad inputs through the CLI: a one-line error and exit 2 (no traceback), checks
before any compute, inputs never touched, notices where the engine adapts what it was given."""

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli import main


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    return path


def run(argv, capsys, inputs=(), code=2):
    """Run the CLI; check the exit code, that no traceback was printed and that every input's
    bytes are unchanged; return stderr's error line."""
    before = {p: p.read_bytes() for p in inputs}
    assert main(argv) == code, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    for p, b in before.items():
        assert p.read_bytes() == b, f"{p} was modified"
    lines = [ln for ln in err.splitlines() if ln.startswith("overpaint")]
    return lines[-1] if lines else ""


def edit(model, image, out, *extra):
    return ["edit", str(image), "--model", str(model), "--source-prompt", "a red circle", "--target-prompt",
            "a blue circle", "--steps", "2", "--no-progress", "-o", str(out), *extra]


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: the check must come before any compute."""
    import engine

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was caught")

    monkeypatch.setattr(engine, "load", refuse)


@pytest.mark.parametrize("side", [10000, 30000])
def test_decompression_bombs(tiny_sd15_dir, tmp_path, capsys, side, no_model_load, png_header):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(side, side))
    line = run(edit(tiny_sd15_dir, bomb, tmp_path / "o.png"), capsys, [bomb])
    assert line.startswith("overpaint: error: image") and "pixel limit; downscale it first" in line


def _broken_models(tiny_sd15_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    pickle = shutil.copytree(tiny_sd15_dir, tmp_path / "pickle")
    w = pickle / "unet" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))
    truncated = shutil.copytree(tiny_sd15_dir, tmp_path / "truncated")
    w = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    corrupt = shutil.copytree(tiny_sd15_dir, tmp_path / "corrupt")
    w = corrupt / "vae" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(b"\xff" * 8 + w.read_bytes()[8:])
    listed = shutil.copytree(tiny_sd15_dir, tmp_path / "listed")
    (listed / "model_index.json").write_text("[1, 2]")
    mismatched = shutil.copytree(tiny_sd15_dir, tmp_path / "mismatched")
    cfg = json.loads((mismatched / "unet" / "config.json").read_text())
    cfg["cross_attention_dim"] *= 2  # every cross-attention key/value projection misfits: torch lists each
    (mismatched / "unet" / "config.json").write_text(json.dumps(cfg))
    return [(empty, "has no model_index.json"), (pickle, "refuses to read"), (truncated, "truncated"),
            (corrupt, "corrupt"), (listed, "holds a JSON list, not an object"),
            (mismatched, "do not fit its config.json")]


def test_model_loading_errors_are_one_line(tiny_sd15_dir, tmp_path, photo, capsys):
    for folder, message in _broken_models(tiny_sd15_dir, tmp_path):
        line = run(edit(folder, photo, tmp_path / "o.png"), capsys, [photo])
        assert line.startswith("overpaint: error:") and message in line, (folder, line)
        assert len(line) < 1000, line  # one readable line, not every mismatch torch found (50 kB once)
        assert not (tmp_path / "o.png").exists()


def test_outputs_are_checked_before_any_compute(tiny_sd15_dir, tmp_path, photo, capsys, monkeypatch, no_model_load):
    folder_named_png = tmp_path / "dir.png"
    folder_named_png.mkdir()
    cases = [
        (edit(tiny_sd15_dir, photo, folder_named_png), "is a folder"),
        (edit(tiny_sd15_dir, photo, tmp_path / "o.png", "--inversion", str(tmp_path / "nope" / "inv.safetensors")),
         "--inversion folder"),
        (edit(tiny_sd15_dir, photo, tmp_path / "o.png", "--inversion", str(tmp_path / "inv.txt")), "must end in"),
    ]
    for argv, message in cases:
        line = run(argv, capsys, [photo])
        assert message in line, (argv, line)

    import engine.cli.outputs as outputs

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "NamedTemporaryFile", read_only)
    line = run(edit(tiny_sd15_dir, photo, tmp_path / "o.png"), capsys, [photo])
    assert "cannot write into output folder" in line and "Read-only file system" in line


def test_an_output_linked_to_the_input_is_refused(tiny_sd15_dir, tmp_path, photo, capsys, no_model_load):
    hard = tmp_path / "hard.png"
    os.link(photo, hard)
    soft = tmp_path / "soft.png"
    soft.symlink_to(photo)
    for out in (photo, hard, soft):
        line = run(edit(tiny_sd15_dir, photo, out), capsys, [photo])
        assert "is the input" in line and "(or a link to it)" in line


def test_existing_files_are_never_replaced_unless_asked(tiny_sd15_dir, tmp_path, photo, capsys, monkeypatch):
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"keep me")
    (tmp_path / "many_1.png").write_bytes(b"keep me too")
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    gen = ["generate", "--model", str(tiny_sd15_dir), "--prompt", "x", "--steps", "1", "--no-progress"]
    cases = [
        (edit(tiny_sd15_dir, photo, taken), "exists; choose another name, or pass --overwrite"),
        ([*gen, "-o", str(tmp_path / "many.png"), "--num-images", "2"], "many_1.png' exists"),
        (["edit", str(photo), "--model", str(tiny_sd15_dir), "--method", "ledits++", "--edit-prompt", "x",
          "--mask", str(mask), "-o", str(mask)], "is the input"),
        ([*gen, "--ip-image", str(photo), "-o", str(photo)], "is the input"),
    ]
    import engine

    real_load = engine.load
    monkeypatch.setattr(engine, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded a model")))
    for argv, message in cases:
        line = run(argv, capsys, [photo, taken, mask, tmp_path / "many_1.png"])
        assert message in line, (argv, line)
    monkeypatch.setattr(engine, "load", real_load)
    run([*gen, "-o", str(taken), "--overwrite"], capsys, [photo], code=0)
    assert Image.open(taken).size == (32, 32)


def test_a_reused_inversion_must_match_the_image_and_the_options(tiny_sd15_dir, tmp_path, photo, capsys):
    """--inversion FILE that exists is edited as it is: another image, or options that would
    invert differently, used to be silently ignored."""
    inv = tmp_path / "inv.safetensors"
    argv = lambda image, out, *extra: edit(tiny_sd15_dir, image, tmp_path / out, "--method", "ddpm",  # noqa: E731
                                           "--inversion", str(inv), *extra)
    run(argv(photo, "a.png"), capsys, [photo], code=0)
    run(argv(photo, "b.png"), capsys, [photo, inv], code=0)  # the same command again: reused
    other = tmp_path / "other.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(other)
    line = run(argv(other, "c.png"), capsys, [photo, inv, other])
    assert "was made from another image" in line
    line = run(argv(photo, "c.png", "--seed", "7"), capsys, [photo, inv])
    assert "was made with seed=0 and this command asks for 7" in line
    line = run(argv(photo, "c.png", "--skip", "0.5"), capsys, [photo, inv])
    assert "was made with skip=None and this command asks for 0.5" in line
    line = run(argv(photo, "c.png", "--height", "16"), capsys, [photo, inv])
    assert "was made at 32x32 and this command processes the image at 16x16" in line
    run(argv(photo, "c.png", "--height", "32", "--width", "32"), capsys, [photo, inv], code=0)  # the same size
    ddim = tmp_path / "ddim.safetensors"
    run(edit(tiny_sd15_dir, photo, tmp_path / "d.png", "--method", "ddim", "--inversion", str(ddim)), capsys,
        [photo], code=0)
    run(edit(tiny_sd15_dir, photo, tmp_path / "e.png", "--method", "ddim", "--inversion", str(ddim), "--seed", "5"),
        capsys, [photo, ddim], code=0)  # DDIM draws nothing: the seed does not matter


def test_an_inversion_option_its_inversion_does_not_take(tiny_sd15_dir, tmp_path, photo, capsys, no_model_load):
    line = run(edit(tiny_sd15_dir, photo, tmp_path / "o.png", "--method", "p2p", "--skip", "0.3"), capsys, [photo])
    assert "--skip applies to --method ddpm, ledits++, not p2p (whose edit here inverts with ddim)" in line
    line = run(edit(tiny_sd15_dir, photo, tmp_path / "o.png", "--method", "flow"), capsys, [photo])
    assert "--method 'flow' runs on FLUX models; this is a UNet (SD, SDXL) model" in line
    with pytest.raises(SystemExit) as exit:  # argparse's own one-line error
        main(["serve", "--port", "70000"])
    assert exit.value.code == 2 and "must be at most 65535" in capsys.readouterr().err


def test_options_once_python_only_reach_the_engine(tiny_sd15_dir, tmp_path, photo, caplog):
    from engine.cli import build_parser
    from engine.cli.commands import method_params

    def params(*argv, inv_method):
        return method_params(build_parser().parse_args(edit(tiny_sd15_dir, photo, tmp_path / "o.png", *argv)),
                             inv_method)

    _, e = params("--method", "masactrl", "--end-step", "20", "--end-layer", "12", inv_method="ddim")
    assert e["end_step"] == 20 and e["end_layer"] == 12
    i, _ = params("--method", "null-text", "--null-text-lr", "0.002", inv_method="null-text")
    assert i["lr"] == 0.002
    i, _ = params("--method", "ddpm", "--exact", "true", inv_method="ddpm")
    assert i["exact"] is True
    with caplog.at_level("WARNING", logger="overpaint"):
        _, e = params("--method", "ledits++", "--edit-prompt", "blue", inv_method="ledits++")
    assert e["editing_prompt"] == ["blue"] and "--target-prompt is not used: --edit-prompt gives the edit" in caplog.text
    args = build_parser().parse_args(["generate", "--prompt", "x", "-o", "o.png", "--chroma-key", "green",
                                      "--chroma-center", "0.5,-0.25"])
    assert args.chroma_center == (0.5, -0.25)


def test_size_flags(tiny_sd15_dir, tmp_path, photo, capsys, no_model_load):
    line = run(edit(tiny_sd15_dir, photo, tmp_path / "o.png", "--keep-size", "--height", "32"), capsys, [photo])
    assert "give one of them" in line
    from types import SimpleNamespace

    from engine.cli.commands import _image_size

    pipe = SimpleNamespace(size_step=8)
    x = torch.zeros(1, 3, 768, 1024)
    size = lambda h, w: _image_size(pipe, x, SimpleNamespace(height=h, width=w, keep_size=False))  # noqa: E731
    assert size(480, None) == (480, 640) and size(None, 200) == (152, 200)  # aspect kept, sides the model takes
    assert size(40, 40) == (40, 40)


def test_demo_output_checks(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "taken"
    a_file.write_bytes(b"keep me")
    line = run(["demo", "-o", str(a_file)], capsys, [a_file])
    assert "is a file; -o takes a folder" in line
    line = run(["demo", "-o", str(tmp_path / "missing" / "deeper")], capsys)
    assert "output folder" in line and "does not exist" in line

    import engine.cli.outputs as outputs

    monkeypatch.setattr(outputs.tempfile, "NamedTemporaryFile",
                        lambda *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")))
    line = run(["demo", "-o", str(tmp_path / "ro")], capsys)
    assert "cannot write into output folder" in line


def test_bad_numbers_are_one_line_argparse_errors(tiny_sd15_dir, tmp_path, photo, capsys):
    for flag, value, message in [("--guidance", "inf", "must be a finite number, got inf"),
                                 ("--guidance", "nan", "must be a finite number, got nan"),
                                 ("--steps", "2.5", "expected an integer, got '2.5'"),
                                 ("--seed", "2**70", "expected an integer, got '2**70'"),
                                 ("--skip", "1.5", "must be between 0 and 1")]:
        with pytest.raises(SystemExit) as e:
            main(edit(tiny_sd15_dir, photo, tmp_path / "o.png", flag, value))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err and "--help" in err, err


def test_huge_seeds_are_reduced_with_a_notice(tiny_sd15_dir, tmp_path, capsys, caplog):
    out = tmp_path / "o.png"
    with caplog.at_level("WARNING", logger="overpaint"):
        run(["generate", "--model", str(tiny_sd15_dir), "--prompt", "x", "--steps", "1", "--no-progress",
             "--seed", str(2 ** 70), "-o", str(out)], capsys, code=0)
    assert "outside 64 bits" in caplog.text and out.exists()


def test_a_far_off_size_is_resized_with_a_notice(tiny_sd15_dir, tmp_path, capsys, caplog):
    big = tmp_path / "big.png"
    Image.fromarray((np.random.default_rng(1).random((128, 96, 3)) * 255).astype(np.uint8)).save(big)
    out = tmp_path / "o.png"
    with caplog.at_level("WARNING", logger="overpaint"):
        run(edit(tiny_sd15_dir, big, out), capsys, [big], code=0)
    assert "resizing the 96x128 image to 28x36" in caplog.text  # ~32², aspect kept, sides multiples of 4
    assert Image.open(out).size == (28, 36)
    run(edit(tiny_sd15_dir, big, out, "--output-size", "input", "--overwrite"), capsys, [big], code=0)
    assert Image.open(out).size == (96, 128)
    caplog.clear()
    with caplog.at_level("WARNING", logger="overpaint"):
        run(edit(tiny_sd15_dir, big, out, "--keep-size", "--overwrite"), capsys, [big], code=0)
    assert Image.open(out).size == (96, 128) and "works at about 32x32" in caplog.text


def test_a_tiny_image(tiny_sd15_dir, tmp_path, capsys):
    dot = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (200, 0, 0)).save(dot)
    line = run(edit(tiny_sd15_dir, dot, tmp_path / "o.png", "--keep-size"), capsys, [dot])
    assert "image is 1x1" in line and "height=2, width=2" in line and "=0" not in line
    run(edit(tiny_sd15_dir, dot, tmp_path / "o.png"), capsys, [dot], code=0)  # resized up by default
    assert Image.open(tmp_path / "o.png").size == (32, 32)


def test_a_corrupted_or_foreign_inversion(tiny_sd15_dir, tmp_path, photo, capsys):
    inv = tmp_path / "inv.safetensors"
    run(edit(tiny_sd15_dir, photo, tmp_path / "a.png", "--inversion", str(inv), "--method", "ddim"), capsys,
        [photo], code=0)
    other = shutil.copytree(tiny_sd15_dir, tmp_path / "other")
    (other / "unet" / "config.json").write_text((other / "unet" / "config.json").read_text() + " ")
    line = run(edit(other, photo, tmp_path / "b.png", "--inversion", str(inv), "--method", "ddim"), capsys,
               [photo, inv])
    assert "this inversion was made with model" in line and not (tmp_path / "b.png").exists()
    data = bytearray(inv.read_bytes())
    data[-10] ^= 0xFF
    inv.write_bytes(bytes(data))
    line = run(edit(tiny_sd15_dir, photo, tmp_path / "b.png", "--inversion", str(inv), "--method", "ddim"), capsys,
               [photo, inv])
    assert "is corrupted" in line


def test_transparent_input_gets_a_notice(tiny_sd15_dir, tmp_path, capsys, caplog):
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(rgba)
    with caplog.at_level("WARNING", logger="overpaint"):
        run(edit(tiny_sd15_dir, rgba, tmp_path / "o.png", "--background", "black"), capsys, [rgba], code=0)
    assert "transparent pixels: composited over black" in caplog.text
    line = run(edit(tiny_sd15_dir, rgba, tmp_path / "p.png", "--background", "mauve"), capsys, [rgba])
    assert line.startswith("overpaint: error: --background: background must be")


def test_flags_of_another_method_are_refused(tiny_sd15_dir, tmp_path, photo, capsys, no_model_load):
    for extra, message in [(["--cross-replace", "0.5", "--method", "ddim"], "--cross-replace applies to --method p2p"),
                           (["--edit-threshold", "0.5"], "--edit-threshold applies to --method ledits++"),
                           (["--method", "ledits++", "--edit-prompt", "a", "--edit-prompt", "b", "--warmup", "1",
                             "--warmup", "2", "--warmup", "3"], "--warmup was given 3 times for 2 concepts")]:
        assert message in run(edit(tiny_sd15_dir, photo, tmp_path / "o.png", *extra), capsys, [photo])


def test_every_ledits_and_p2p_option_reaches_the_engine(tiny_sd15_dir, tmp_path, photo, capsys, monkeypatch):
    from engine.pipeline import Pipeline

    import torch

    seen = {}

    def spy(self, inv, method=None, target_prompt=None, **params):  # records what the CLI passes
        seen.update(params)
        return torch.rand(1, 3, 32, 32)

    monkeypatch.setattr(Pipeline, "edit", spy)
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    run(edit(tiny_sd15_dir, photo, tmp_path / "o.png", "--method", "ledits++", "--edit-prompt", "blue",
             "--edit-prompt", "red", "--edit-scale", "4", "--reverse", "--edit-threshold", "0.6", "--warmup", "1",
             "--cooldown", "2", "--no-intersect-mask", "--cross-attn-mask", "--mask", str(mask),
             "--guidance-rescale", "0.1"), capsys, [photo, mask], code=0)
    assert seen["editing_prompt"] == ["blue", "red"] and seen["edit_guidance_scale"] == [4.0, 4.0]
    assert seen["reverse_editing_direction"] == [True, True] and seen["edit_threshold"] == [0.6, 0.6]
    assert seen["edit_warmup_steps"] == [1, 1] and seen["edit_cooldown_steps"] == [2, 2]
    assert seen["use_intersect_mask"] is False and seen["use_cross_attn_mask"] is True
    assert tuple(seen["user_mask"].shape) == (1, 1, 16, 16) and seen["guidance_rescale"] == 0.1
    seen.clear()
    run(edit(tiny_sd15_dir, photo, tmp_path / "p.png", "--cross-replace", "0.5", "--self-replace", "0.3",
             "--reweight", "blue=2", "--blend-words", "red circle", "blue circle", "--blend-threshold", "0.4",
             "--blend-start", "0.1", "--blend-maps", "edited", "--source-branch", "inversion",
             "--source-branch-guidance", "2"), capsys, [photo], code=0)
    assert seen["cross_replace_steps"] == 0.5 and seen["self_replace_steps"] == 0.3
    assert seen["equalizer"] == {"blue": 2.0} and seen["local_blend_words"] == (["red", "circle"], ["blue", "circle"])
    assert (seen["blend_threshold"], seen["blend_start"], seen["blend_maps"]) == (0.4, 0.1, "edited")
    assert seen["source"] == "inversion" and seen["source_guidance_scale"] == 2.0


def test_bugs_say_so_and_debug_shows_tracebacks(tiny_sd15_dir, tmp_path, photo, capsys, monkeypatch):
    import engine.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "vocab", lambda args: 1 / 0)
    assert main(["vocab"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "this is a bug in overpaint: please report" in err
    missing = tmp_path / "missing.png"
    assert main(["--debug", *edit(tiny_sd15_dir, missing, tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("does not exist")
    assert main([*edit(tiny_sd15_dir, missing, tmp_path / "o.png"), "--debug"]) == 2  # after the command too
    assert "Traceback" in capsys.readouterr().err


def test_help_version_and_vocabulary(capsys):
    from engine.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subs.items():
        if name == "bench":  # its own parser (benchmarks/): listed for --help only
            continue
        assert sub.description, f"{name} has no description"
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        text = sub.format_help()
        if name == "edit":
            assert "(default: 0)" in text and "(default: p2p)" in text
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("overpaint 0.")
    assert main(["vocab"]) == 0
    out = capsys.readouterr().out
    assert "circle" in out and "triangle" in out and "background" in out


def test_progress_bars_are_labelled(tiny_sd15_dir, tmp_path, photo, capsys):
    argv = [a for a in edit(tiny_sd15_dir, photo, tmp_path / "o.png") if a != "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "invert:" in err and "edit:" in err and "decode:" in err


def test_shapes_ledits_colour_swap_works_with_no_extra_flags(tmp_path, capsys):
    """The bundled model's recipe (threshold 0.5, intersect mask, 30 steps) comes from its card."""
    from engine.shapes import analyser, demo, world

    src = tmp_path / "input.png"
    Image.fromarray(world.render(demo.SCENE)).save(src)
    out = tmp_path / "edited.png"
    run(["edit", str(src), "--method", "ledits++", "--source-prompt",
         "a large red circle in the center, on a white background", "--target-prompt",
         "a large blue circle in the center, on a white background", "--no-progress", "-o", str(out)],
        capsys, [src], code=0)
    assert analyser.describe(np.asarray(Image.open(out))) == "a large blue circle in the center, on a white background"
