"""Exercise 5: a new differentiable reward, and reward hacking (PAPER.md Sec. 4, item 3; rewards.py).

Reference solution. The rewards.py convention: images x_0 in [-1, 1], shape (B, C, H, W); one value
per image, shape (B,); higher is better (loss = -reward); differentiable in x_0.
"""
import torch


def contrast(x):
    """RMS contrast (Peli 1990): the standard deviation of each image's gray level g = mean over the
    channels of (x + 1) / 2, in [0, 1]: r = sqrt(mean_{H,W} (g - mean g)^2 + 1e-8). The 1e-8 keeps the
    gradient finite on a flat image (d sqrt(v)/dv is infinite at v = 0). In [0, 0.5] for x in [-1, 1]."""
    g = ((x + 1) / 2).mean(dim=1)  # (B, H, W) gray level in [0, 1]
    mu = g.mean(dim=(1, 2), keepdim=True)  # (B, 1, 1) each image's own mean, not the batch's
    var = (g - mu).pow(2).mean(dim=(1, 2))  # (B,) population variance over the pixels
    return (var + 1e-8).sqrt()  # (B,)
