"""The Shapes world: a synthetic scene generator, analyser, metrics and a small trainable model.

world.py    seeded 64x64 scenes, captions, masks and exact edits
analyser.py detects objects in an image to judge generations against ground truth
metrics.py  PSNR, SSIM, masked PSNR
train.py    trains a tiny diffusers-format text-to-image pipeline from scratch
"""
