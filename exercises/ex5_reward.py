"""Exercise 5: a new differentiable reward, and reward hacking (PAPER.md Sec. 4, item 3; rewards.py).

Fill in the gap marked TODO(student), then check:  python -m pytest exercises/check_ex5_reward.py
Then fine-tune with it and read the held-out evaluator (exercises/README.md, exercise 5).
The rewards.py convention: images x_0 in [-1, 1], shape (B, C, H, W); one value per image, shape
(B,); higher is better (loss = -reward); differentiable in x_0.
"""
import torch


def contrast(x):
    """RMS contrast (Peli 1990): the standard deviation of each image's gray level g = mean over the
    channels of (x + 1) / 2, in [0, 1]: r = sqrt(mean_{H,W} (g - mean g)^2 + 1e-8). The 1e-8 keeps the
    gradient finite on a flat image (d sqrt(v)/dv is infinite at v = 0). In [0, 0.5] for x in [-1, 1]."""
    # TODO(student): g (B, H, W), then each image's own mean and variance over its pixels, then r (B,)
    raise NotImplementedError("exercise 5: contrast")
