"""Shapes recipes: each world edit's words (prompts, P2P blend words, LEDITS++ concepts)."""

import numpy as np
import pytest

from engine.shapes import recipes, world

SCENE = world.Scene((world.Obj("circle", "red", "left", "small"), world.Obj("square", "blue", "right", "large")),
                    "white", 0)


@pytest.mark.parametrize("edit, towards, away", [
    (world.Edit("colour", 0, "green"), ["a small green circle on the left"], []),
    (world.Edit("shape", 1, "diamond"), ["a large blue diamond on the right"], []),
    (world.Edit("position", 0, "center"), ["a small red circle in the center"], ["a small red circle on the left"]),
    (world.Edit("background", -1, "gray"), ["on a gray background"], []),
    (world.Edit("add", 2, world.Obj("triangle", "black", "center", "large")), ["a large black triangle in the center"], []),
    (world.Edit("remove", 1), [], ["a large blue square on the right"]),
])
def test_ledits_concepts_are_the_captions_phrases_for_what_changes(edit, towards, away):
    ch = recipes.change_of(SCENE, edit)
    assert ch.concepts == (tuple(towards), tuple(away))
    assert ch.source_prompt == world.caption(SCENE) and ch.target_prompt == world.edit_prompt(SCENE, edit)
    for phrase in towards:
        assert phrase in ch.target_prompt
    for phrase in away:
        assert phrase in ch.source_prompt


def test_blend_words_only_for_edits_in_place():
    assert recipes.change_of(SCENE, world.Edit("colour", 0, "green")).blend == (["red", "circle"], ["green", "circle"])
    assert recipes.change_of(SCENE, world.Edit("size", 1, "small")).blend == (["large", "square"], ["small", "square"])
    assert recipes.change_of(SCENE, world.Edit("remove", 0)).blend is None


def test_every_sampled_edit_has_a_concept():
    rng = np.random.default_rng(0)
    for _ in range(100):
        scene = world.sample_scene(rng)
        towards, away = recipes.change_of(scene, world.sample_edit(scene, rng)).concepts
        assert towards or away


def test_ledits_without_concepts_is_refused_before_any_work():
    with pytest.raises(ValueError, match="at least one concept"):
        recipes.edit(None, None, "ledits++", recipes.Change("a", "b"))
