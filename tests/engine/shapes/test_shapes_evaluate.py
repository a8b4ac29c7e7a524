"""The generation-quality scorer, on rendered scenes whose answer is known."""

from dataclasses import replace

import numpy as np
import pytest

from engine.shapes import evaluate as E
from engine.shapes import world


def test_prompts_are_seeded_with_one_or_two_objects():
    a, b = E.prompts(10, 3), E.prompts(10, 3)
    assert a == b and [len(s.objects) for s in a] == [1, 2] * 5


def test_rendered_scenes_score_perfectly():
    scenes = E.prompts(12, 5)
    images = np.stack([world.render(s) for s in scenes])
    assert all(E.named_ok(im, s) for im, s in zip(images, scenes))
    assert E.attribute_rates(images, scenes) == {"background": 1.0, "colour": 1.0, "colour+shape": 1.0,
                                                 "colour+position": 1.0}


def test_wrong_attributes_are_counted_where_they_are_wrong():
    scene = world.Scene((world.Obj("circle", "red", "left", "large"),), "white", seed=1)
    wrong_shape = replace(scene, objects=(replace(scene.objects[0], shape="square"),))
    wrong_place = replace(scene, objects=(replace(scene.objects[0], position="right"),), background="gray")
    images = np.stack([world.render(wrong_shape), world.render(wrong_place)])
    assert not E.named_ok(images[0], scene) and not E.named_ok(images[1], scene)
    assert E.attribute_rates(images, [scene, scene]) == {"background": 0.5, "colour": 1.0, "colour+shape": 0.5,
                                                         "colour+position": 0.5}


def test_screens_share_of_the_prompts():
    # the scenes every earlier figure used (pinned from before screens existed)
    assert [world.caption(s) for s in E.prompts(3, 3, screens=0.0)] == [
        "a large yellow circle on the right, on a gray background",
        "a small red square in the center and a large purple diamond on the right, on a gray background",
        "a small green circle on the left, on a beige background"]
    on = E.prompts(20, 3, screens=1.0)
    assert {s.background for s in on} <= set(world.SCREENS) and [len(s.objects) for s in on][:2] == [1, 2]
    with pytest.raises(ValueError, match="screens is a share between 0 and 1"):
        E.evaluate(None, n=1, screens=1.5)
