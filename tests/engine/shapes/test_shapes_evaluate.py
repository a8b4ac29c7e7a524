"""The generation-quality scorer, on rendered scenes whose answer is known."""

from dataclasses import replace

import numpy as np

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
