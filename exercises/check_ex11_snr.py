"""Check for exercise 11 (gradient signal-to-noise): the measurement, not its outcome. The batch cosine against a
closed form (per-noise gradients built as a shared signal plus orthogonal noise, so that the cosine of two
disjoint batches' mean gradients is known exactly) and against torch's cosine; the two batches against what
"two independent batches" means (disjoint, of the asked size, drawn at random by the generator given); and both
together against the signal-to-noise law cos = B snr / (1 + B snr) on Gaussian gradients."""
import numpy as np
import pytest
import torch

import checklib

ex = checklib.load("ex11_snr", disable=("sftlib.gradstudy.cosine",))


def signal_plus_noise(n, scales, sigma=2.0, P=64):
    """n per-noise gradients g_i = c_i (mu + sigma e_i), mu and the e_i orthonormal directions (float64)."""
    q, _ = torch.linalg.qr(torch.randn(P, n + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    mu, e = q[:, 0], q[:, 1:].T  # (P,), (n, P): orthonormal
    return torch.as_tensor(scales, dtype=torch.float64)[:, None] * (mu + sigma * e), sigma


@pytest.mark.parametrize("scales", [[1.0] * 6, [0.5, 1.0, 3.0, 2.0, 0.7, 1.5]])
def test_batch_cosine_of_disjoint_batches_is_the_closed_form(scales):
    """Batches A = {0, 1, 2}, B = {3, 4, 5}: g_A = (sum_A c_i / 3) mu + (sigma / 3) sum_A c_i e_i, so
    g_A . g_B = (C_A C_B / 9) |mu|^2 and |g_A|^2 = (C_A / 3)^2 + (sigma / 3)^2 sum_A c_i^2 (the e_i are
    orthogonal to mu and to each other). Unequal c_i: noises whose gradients differ in length."""
    g, sigma = signal_plus_noise(6, scales)
    c = torch.tensor(scales, dtype=torch.float64)
    ca, cb = c[:3].sum() / 3, c[3:].sum() / 3
    na = (ca ** 2 + sigma ** 2 * (c[:3] ** 2).sum() / 9).sqrt()
    nb = (cb ** 2 + sigma ** 2 * (c[3:] ** 2).sum() / 9).sqrt()
    want = float(ca * cb / (na * nb))
    got = ex.batch_cosine(g[:3], g[3:])
    assert isinstance(got, float), f"batch_cosine returned a {type(got).__name__}, not a Python float"
    assert abs(got - want) < 1e-9, f"batch_cosine = {got}, the closed form gives {want}"


def test_batch_cosine_is_the_cosine_of_the_mean_gradients():
    """On random gradients: torch's cosine of the two batches' means, for batches of unequal size; scaling a
    whole batch does not change it; the cosine of a batch with itself is 1."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 40, generator=gen) + 0.3, torch.randn(3, 40, generator=gen) + 0.3
    want = float(torch.nn.functional.cosine_similarity(a.mean(0), b.mean(0), dim=0))
    assert abs(ex.batch_cosine(a, b) - want) < 1e-5, (ex.batch_cosine(a, b), want)
    assert abs(ex.batch_cosine(7.0 * a, b) - want) < 1e-5
    assert abs(ex.batch_cosine(a, a) - 1.0) < 1e-5


@pytest.mark.parametrize("n, B", [(17, 8), (10, 1), (6, 3)])
def test_two_batches_are_disjoint_random_batches_of_b(n, B):
    """Each draw: two index arrays of B noises in 0 .. n-1, no noise twice and none in both; the draws follow the
    generator (the same seed gives the same batches, another seed others) and, over many draws, every noise
    lands in batch A and in batch B."""
    rng = np.random.default_rng(0)
    seen_a, seen_b = set(), set()
    for _ in range(200):
        a, b = (np.asarray(i).tolist() for i in ex.two_batches(n, B, rng))
        assert len(a) == B and len(b) == B, f"batches of {len(a)} and {len(b)} noises, not {B}"
        assert all(0 <= i < n for i in a + b), f"an index outside 0 .. {n - 1}: {a}, {b}"
        assert len(set(a)) == B and len(set(b)) == B and not set(a) & set(b), f"not disjoint: {a}, {b}"
        seen_a |= set(a)
        seen_b |= set(b)
    assert seen_a == set(range(n)) and seen_b == set(range(n)), "some noise never lands in a batch"
    draw = lambda seed: [np.asarray(i).tolist() for i in ex.two_batches(n, B, np.random.default_rng(seed))]
    assert draw(3) == draw(3), "the same generator seed gave other batches"
    assert any(draw(3) != draw(s) for s in range(4, 10)), "the batches do not depend on the generator"


def test_independent_batches_follow_the_signal_to_noise_law():
    """Gaussian per-noise gradients g_i = mu + noise (per-sample snr = |mu|^2 / tr Sigma = 1/4, P = 4000): the
    mean over random pairs of disjoint batches of the batch cosine is B snr / (1 + B snr) (each batch gradient
    has cosine sqrt(B snr / (1 + B snr)) with mu, and their noises are independent). Overlapping batches would
    share noise and agree more."""
    P, n = 4000, 32
    gen = torch.Generator().manual_seed(2)
    mu = torch.randn(P, dtype=torch.float64, generator=gen)
    mu = mu / mu.norm()
    g = mu + 2.0 * torch.randn(n, P, dtype=torch.float64, generator=gen) / P ** 0.5  # tr Sigma = 4
    rng = np.random.default_rng(0)
    for B in (1, 4, 16):
        got = np.mean([ex.batch_cosine(g[a], g[b]) for a, b in (ex.two_batches(n, B, rng) for _ in range(100))])
        want = B * 0.25 / (1 + B * 0.25)
        assert abs(got - want) < 0.04, f"B = {B}: mean cosine of independent batches {got:.3f}, the law gives {want:.3f}"
