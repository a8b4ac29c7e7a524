"""ShapesEdit end to end on a few colour swaps with the bundled model: the edit is seen by
the analyser and the background is kept."""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.loader import BUNDLED  # noqa: E402
from engine.shapes import world  # noqa: E402

needs_model = pytest.mark.skipif(not (BUNDLED["shapes"] / "model_index.json").is_file(),
                                 reason="bundled shapes model not present")
METHOD = "p2p"  # the demo's method
# Methods held to the colour-swap target (ShapesEdit, 30 swaps: P2P 97%, LEDITS++ 90%, DDIM 100%); the
# CI subset asserts success for them. DDPM (87%) runs too but is only checked to replay the source.
# Plug-and-Play and MasaCtrl (210 cases: colour swaps 100% / 97%) are held to it too.
# pix2pix-zero too (35 cases: colour swaps 100%). Null-text and Imagic (20 s and 40 s per case on
# this CPU) are held to their figures by the benchmark; null-text's reconstruction is checked below.
SUBSET_METHODS = ("p2p", "ddim", "ddpm", "ledits++", "pnp", "masactrl", "pix2pix-zero")
MUST_SUCCEED = ("p2p", "ledits++", "ddim", "pnp", "masactrl", "pix2pix-zero")
MIN_BG_PSNR = 25.0


@pytest.fixture(scope="module")
def pipe():
    import engine

    return engine.load("shapes")


def _colour_cases(n: int):
    from benchmarks import shapes_edit as se

    return [c for c in se.make_cases(7 * n) if c[1].kind == "colour"][:n]


@needs_model
def test_demo_colour_swap_succeeds_and_keeps_background(pipe):
    from benchmarks import shapes_edit as se
    from engine.shapes import demo

    r = se.run_case(pipe, [METHOD], demo.SCENE, demo.EDIT)[METHOD]
    assert r["success"] and r["bg_psnr"] >= MIN_BG_PSNR, r
    assert r["recon_psnr"] >= 28.0, r


@pytest.fixture(scope="module")
def subset(pipe):
    """The first two colour swaps of ShapesEdit under every method, run once: [(edit, {method: metrics})]."""
    from benchmarks import shapes_edit as se

    return [(edit, se.run_case(pipe, list(SUBSET_METHODS), scene, edit)) for scene, edit in _colour_cases(2)]


@needs_model
def test_benchmark_subset_runs_end_to_end(subset):
    for edit, by_method in subset:
        for m, r in by_method.items():
            assert r["recon_psnr"] >= 27.0, (m, edit, r)  # every inversion replays the source up to the VAE
            assert set(r) >= {"success", "bg_psnr", "edit_psnr", "edit_ssim", "edit_s", "invert_s"}


@needs_model
@pytest.mark.parametrize("method", MUST_SUCCEED)
def test_benchmark_colour_swaps_succeed_and_keep_background(subset, method):
    for edit, by_method in subset:
        r = by_method[method]
        assert r["success"] and r["bg_psnr"] >= MIN_BG_PSNR, (method, edit, r)


@needs_model
def test_null_text_reconstructs_guided_better_than_ddim(pipe):
    """At guidance 7.5, the null-text reconstruction of the demo scene is nearer the VAE's own
    round trip than the same DDIM inversion replayed with the plain unconditional embedding
    (20 steps here; the benchmark's 30 / 10 give +11 dB)."""
    from engine.editing import Inversion
    from engine.shapes import demo, metrics

    src = world.render(demo.SCENE)
    nt = pipe.invert(src, world.caption(demo.SCENE), method="null-text", steps=20, inner_steps=10, lr=1e-2,
                     progress=False)  # the method's (paper's) lr, not the Shapes card's edit-friendly 2e-3
    plain = Inversion("ddim", nt.x0, nt.latents, nt.timesteps, nt.source, nt.uncond, settings=dict(nt.settings))
    u8 = lambda t: (t[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)  # noqa: E731
    vae = u8(pipe.decode(nt.x0))
    ours = metrics.psnr(u8(pipe.reconstruct(nt, output_type="pt", progress=False)), vae)
    base = metrics.psnr(u8(pipe.edit(plain, "ddim", None, output_type="pt", progress=False)), vae)
    assert ours >= base + 3.0, (ours, base)


def test_cases_are_seeded_and_balanced():
    from benchmarks import shapes_edit as se

    a, b = se.make_cases(14), se.make_cases(14)
    assert a == b
    assert sorted(e.kind for _, e in a) == sorted(list(se.KINDS) * 2)
    for scene, edit in a:  # the region covers every pixel the ground truth changes
        changed = np.any(world.render(scene) != world.render(world.apply(scene, edit)), axis=-1)
        assert not (changed & ~se.edit_region(scene, edit)).any(), edit


@needs_model
def test_generate_benchmark_writes_json_with_device(tmp_path):
    import json

    from benchmarks import shapes_generate

    out = tmp_path / "g.json"
    res = shapes_generate.main(["--n", "2", "--steps", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["device"] and data["meta"]["git_commit"] and data["meta"]["settings"]["n"] == 2
    assert data["results"][0]["named_rate"] == res["named_rate"] and set(res["attributes"]) >= {"background"}


DIT = BUNDLED["shapes-dit"]


@pytest.mark.skipif(not (DIT / "model_index.json").is_file(), reason="bundled shapes-dit not present")
def test_dit_colour_swaps_with_rf_inversion():
    """The Shapes DiT's recipes (RF-Inversion and flow inversion) on the first three colour swaps:
    the source replays, the colour changes and the background is kept."""
    import engine
    from benchmarks import shapes_edit as se

    pipe = engine.load("shapes-dit")
    for scene, edit in _colour_cases(3):
        by_method = se.run_case(pipe, ["flow", "rf-inversion"], scene, edit)
        for m, r in by_method.items():
            assert r["recon_psnr"] >= 27.0, (m, edit, r)
        r = by_method["rf-inversion"]
        assert r["success"] and r["bg_psnr"] >= MIN_BG_PSNR, (edit, r)



@needs_model
def test_edit_benchmark_keeps_the_kinds_asked_for(tmp_path, capsys):
    """``--kinds``: the first cases of those kinds in the usual stream, and the JSON records them."""
    import json

    from benchmarks import shapes_edit as se

    out = tmp_path / "e.json"
    # kinds come in turn (colour, shape, position, size, background, add, remove): cases 1, 5, 8
    data = se.main(["--cases", "3", "--kinds", "add,shape", "--methods", "ddim", "--sweep-cases", "0",
                    "--out", str(out)])
    stream = se.make_cases(9)
    assert [c["caption"] for c in data["cases"]] == [world.caption(stream[i][0]) for i in (1, 5, 8)]
    assert [c["kind"] for c in data["cases"]] == ["shape", "add", "shape"] and len(data["per_case"]["ddim"]) == 3
    saved = json.loads(out.read_text())["meta"]
    assert saved["settings"]["kinds"] == ["shape", "add"] and isinstance(saved["uncommitted"], list)
    for bad, says in ((["--kinds", "recolour"], "unknown edit kinds ['recolour']"), (["--kinds", ","], "at least one")):
        with pytest.raises(SystemExit):
            se.main(["--cases", "1", *bad, "--out", str(out)])
        assert says in capsys.readouterr().err
