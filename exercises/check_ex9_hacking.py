"""Check for exercise 9 (reward hacking): the measurement, not its outcome. The class-matched Fréchet
distance against a reference set built explicitly (each real class repeated as often as the samples'
class mix asks) and a distance computed here with scipy's sqrtm; the diversity against a double loop."""
import numpy as np
import pytest
import scipy.linalg

import checklib

ex = checklib.load("ex9_hacking", disable=("sftlib.metrics.class_matched",))


def fd_scipy(a, b):
    """Fréchet distance of two feature sets, population moments, with scipy's general matrix sqrt."""
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False, bias=True), np.cov(b, rowvar=False, bias=True)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def real_set(seed=0, n=30, D=4, C=3):
    """n real features per class, each class its own mean and scale (a between-class spread that matters)."""
    rng = np.random.default_rng(seed)
    feats = np.concatenate([rng.normal(3.0 * c, 1.0 + c, size=(n, D)) for c in range(C)])
    return feats, np.repeat(np.arange(C), n)


@pytest.mark.parametrize("counts", [(6, 3, 3), (0, 12, 0), (4, 4, 4), (1, 0, 5)])
def test_matches_an_explicit_reference_set_of_the_same_class_mix(counts):
    real, labels = real_set()
    rng = np.random.default_rng(1)
    pred = np.repeat(np.arange(3), counts)
    feats = rng.normal(1.0, 2.0, size=(len(pred), 4))
    # the reference: class c's real features repeated counts[c] times (equal class sizes: weights = counts / N)
    ref = np.concatenate([np.tile(real[labels == c], (k, 1)) for c, k in enumerate(counts) if k])
    assert abs(ex.class_matched_fd(feats, pred, real, labels) - fd_scipy(feats, ref)) < 1e-6 * max(1, fd_scipy(feats, ref))


def test_a_class_shift_costs_nothing_unmatched_it_would():
    """Samples that are exactly the real ships (class 1 here) score 0 against ships, not against all classes."""
    real, labels = real_set(2)
    ships = real[labels == 1]
    assert abs(ex.class_matched_fd(ships, np.ones(len(ships), int), real, labels)) < 1e-8
    assert fd_scipy(ships, real) > 1  # the unmatched distance would call the wanted shift damage


def test_diversity_is_the_mean_distance_between_two_different_samples():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(7, 5))
    ref = np.mean([np.linalg.norm(f[i] - f[j]) for i in range(7) for j in range(7) if i != j])
    assert abs(ex.diversity(f) - ref) < 1e-9
    assert abs(ex.diversity(np.tile(f[:1], (6, 1)))) < 1e-9  # a collapsed model: every sample the same
    assert abs(ex.diversity(2 * f) - 2 * ref) < 1e-9
