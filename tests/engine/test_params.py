"""Numbers are checked where they enter: engine.params and the façade that applies it."""

import math

import pytest

from engine import params


@pytest.mark.parametrize("value,message", [
    (2.5, "steps must be an integer, got 2.5"), ("10", "steps must be an integer, got '10'"),
    (True, "steps must be an integer"), (0, "steps must be between 1 and 1000, got 0"),
    (5000, "between 1 and 1000"), (math.nan, "must be an integer"),
])
def test_steps(value, message):
    with pytest.raises(ValueError, match=message):
        params.check({"steps": value})


def test_integral_floats_are_accepted_and_normalised():
    assert params.check({"steps": 30.0, "height": 64.0}) == {"steps": 30, "height": 64}
    assert type(params.check({"steps": 30.0})["steps"]) is int


@pytest.mark.parametrize("key", ["guidance_scale", "edit_guidance_scale", "source_guidance_scale"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "7.5", None])
def test_guidance_must_be_finite(key, value):
    if value is None and key == "source_guidance_scale":
        assert params.check({key: None}) == {key: None}  # None means "the default" there
        return
    with pytest.raises(ValueError, match=f"{key} must be a finite number"):
        params.check({key: value})


def test_per_concept_lists_name_the_bad_entry():
    assert params.check({"edit_guidance_scale": [1, 2.5]}) == {"edit_guidance_scale": [1.0, 2.5]}
    with pytest.raises(ValueError, match=r"edit_guidance_scale\[1\] must be a finite number"):
        params.check({"edit_guidance_scale": [1.0, math.inf]})
    with pytest.raises(ValueError, match=r"edit_threshold\[0\] must be in \[0.0, 1.0\]"):
        params.check({"edit_threshold": [1.5]})


def test_fractions_and_ranges():
    with pytest.raises(ValueError, match=r"skip must be in \[0.0, 1.0\)"):
        params.check({"skip": 1.0})
    assert params.check({"cross_replace_steps": {"default_": 0.8, "red": 0.4}})["cross_replace_steps"]["red"] == 0.4
    with pytest.raises(ValueError, match=r"cross_replace_steps\['red'\]"):
        params.check({"cross_replace_steps": {"red": 2}})
    assert params.check({"self_replace_steps": (0.1, 0.5)})["self_replace_steps"] == (0.1, 0.5)


def test_seeds_beyond_64_bits_are_reduced_with_a_notice(caplog):
    assert params.check({"seed": 2 ** 64 - 1})["seed"] == 2 ** 64 - 1
    assert params.check({"seed": -(2 ** 63)})["seed"] == -(2 ** 63)
    with caplog.at_level("WARNING", logger="overpaint"):
        assert params.check({"seed": 2 ** 70 + 5})["seed"] == 5
    assert "outside 64 bits" in caplog.text
    with pytest.raises(ValueError, match="seed must be an integer"):
        params.check({"seed": 1.5})


def test_unknown_names_pass_through():
    marker = object()
    assert params.check({"callback": marker, "editing_prompt": ["a"]}) == {"callback": marker, "editing_prompt": ["a"]}


def test_the_facade_checks_every_request(sd15_pipe, image):
    with pytest.raises(ValueError, match="steps must be an integer, got 2.5"):
        sd15_pipe.generate("x", steps=2.5, progress=False)
    with pytest.raises(ValueError, match="steps must be an integer, got '10'"):
        sd15_pipe.generate("x", steps="10", progress=False)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number, got inf"):
        sd15_pipe.generate("x", steps=1, guidance_scale=math.inf, progress=False)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number, got nan"):
        sd15_pipe.invert(image, "x", method="ddim", steps=1, guidance_scale=math.nan, progress=False)
    inv = sd15_pipe.invert(image, "x", method="ddpm", steps=2, progress=False)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        sd15_pipe.edit(inv, "p2p", "y", guidance_scale=math.inf, progress=False)
    with pytest.raises(ValueError, match=r"edit_guidance_scale\[0\]"):
        sd15_pipe.edit(inv, "ledits++", editing_prompt=["y"], edit_guidance_scale=[math.nan], progress=False)
