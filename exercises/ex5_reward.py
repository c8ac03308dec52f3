"""Exercise 5: a new differentiable reward, and reward hacking (PAPER.md Sec. 4, item 3; rewards.py).

Fill in the gap marked TODO(student), then check:  python -m pytest exercises/check_ex5_reward.py
Then fine-tune with it and read the held-out evaluator (exercises/README.md, exercise 5).
The rewards.py convention: images x_0 in [-1, 1], shape (B, C, H, W); one value per image, shape
(B,); higher is better (loss = -reward); differentiable in x_0.
"""
import torch


def contrast(x):
    """RMS contrast (Peli 1990) of each image: the standard deviation, over the image's own H x W pixels, of
    its gray level (the mean of its channels, rescaled from [-1, 1] to [0, 1]), with 1e-8 added to the
    variance under the square root. In [0, 0.5] for x in [-1, 1]."""
    # TODO(student): one reward per image, shape (B,), in the rewards.py convention. Each image is measured
    # against its own mean, never the batch's; the variance is the population one (divide by H W); the 1e-8
    # keeps the gradient finite on a flat image, where the square root's derivative is infinite
    raise NotImplementedError("exercise 5: contrast")
