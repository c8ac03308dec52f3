"""Check for exercise 5 (the contrast reward): against numpy, hand-made images and the rewards.py convention."""
import numpy as np
import torch

import checklib
from rewards import Reward

ex = checklib.load("ex5_reward")


def images(seed=0, B=4):
    return torch.rand(B, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_matches_numpy():
    x = images()
    g = ((x.numpy() + 1) / 2).mean(axis=1)  # (4, 8, 8)
    expected = np.sqrt(g.reshape(4, -1).var(axis=1) + 1e-8)  # (4,)
    r = ex.contrast(x)
    assert r.shape == (4,) and np.allclose(r.numpy(), expected, atol=1e-12)


def test_hand_made_images():
    flat = torch.full((1, 3, 8, 8), 0.3)
    halves = torch.cat([-torch.ones(1, 3, 8, 4), torch.ones(1, 3, 8, 4)], dim=3)  # black | white
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 2.0 - 1  # (8, 8) in {-1, 1}
    checker = checker.expand(1, 3, 8, 8)
    gray_halves = halves * 0.5  # the same pattern at half the amplitude
    r = ex.contrast(torch.cat([flat, halves, checker, gray_halves]))  # (4,)
    assert r[0] < 1e-3  # a flat image has (almost) no contrast
    assert torch.allclose(r[1:], torch.tensor([0.5, 0.5, 0.25]), atol=1e-6)  # higher contrast, higher reward


def test_one_value_per_image_no_mixing_across_the_batch():
    x = images(1)
    y = x.clone()
    y[1:] = 0.9 * torch.sign(y[1:])  # change every image but the first
    assert torch.equal(ex.contrast(x)[0], ex.contrast(y)[0])
    assert Reward("contrast", ex.contrast)(x).shape == (4,)  # the rewards.py wrapper's shape check


def test_invariant_to_brightness_scales_with_amplitude():
    x = images(2) * 0.5  # (4, 3, 8, 8) in [-0.5, 0.5]
    assert torch.allclose(ex.contrast(x + 0.3), ex.contrast(x), atol=1e-9)
    assert torch.allclose(ex.contrast(2 * x), 2 * ex.contrast(x), atol=1e-6)


def test_differentiable_finite_and_ascent_raises_it():
    x = images(3, B=2).requires_grad_(True)
    assert torch.autograd.gradcheck(ex.contrast, (x,))
    flat = torch.zeros(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    ex.contrast(flat).sum().backward()
    assert torch.isfinite(flat.grad).all()
    r = ex.contrast(x)
    (grad,) = torch.autograd.grad(r.sum(), x)
    assert (ex.contrast(x + 0.05 * grad) > r).all()  # gradient ascent on the reward raises it: higher is better
