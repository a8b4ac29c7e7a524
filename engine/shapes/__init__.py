"""The Shapes world: a synthetic scene generator, analyser, metrics and a small trainable model.

world.py    seeded 64x64 scenes, captions, masks and exact edits
analyser.py detects objects in an image to judge generations against ground truth
metrics.py  PSNR, SSIM, masked PSNR
train.py    trains a tiny diffusers-format text-to-image pipeline from scratch
scene_code.py  the text encoder's supervised pretraining: decode the scene from the caption's tokens
model/      the trained pipeline shipped with the package: engine.load("shapes")
model_v2/   the same recipe with a third of its scenes on green or blue screens: engine.load("shapes-v2")
evaluate.py generation quality of a model, judged by the analyser
recipes.py  each editing method's settings for this model (benchmark and demo)
demo.py     ``overpaint demo``: a bundled red -> blue circle edit
"""
