"""The comparison's statistics: reward-quality frontiers, read at a matched quality cost.

Every fine-tuning run records, along training, points (cost, value): value is the held-out reward
axis (the judge's target-class rate for a classifier reward, the samples' mean brightness for the
brightness reward) and cost the quality it paid for it, a distance to real images in the features of
the judge, a network that never served as a reward or for tuning (sftlib/judge.py). Both are measured
relative to the base model on the same noise (the run's first point is (0, 0)).

A method's frontier on one seed is the best value any of its runs (any lr, any point along training)
reached at a cost of at most c, with each run's curve linear between its recorded points:

    F_m,s(c) = max over runs r of m on seed s of  max { v : (x, v) on r's polyline, x <= c }

It is *bracketed* at c when some run of m on s reached cost c (its curve crosses or touches c): then
pushing the method further cannot be what is missing. A method none of whose runs reaches c on some seed
is reported *unbracketed* at c, never silently capped at its largest value. Methods are compared at
equal c by the mean of F over seeds, with a percentile bootstrap 95 % interval over seeds, and by the
paired difference to ShortFT (the same seeds resampled jointly).
"""
import math

import numpy as np


def value_at_cost(curve, c):
    """One run's best value at a cost <= c. curve: [(cost, value), ...] in training order, linear between
    points. Returns (value or None when no part of the curve lies at cost <= c, reached: some point has
    cost >= c)."""
    best, reached = None, False
    for i, (x, v) in enumerate(curve):
        cands = [v] if x <= c else []
        if i > 0:
            x0, v0 = curve[i - 1]
            if (x0 - c) * (x - c) < 0:  # the segment crosses cost c: the value where it does
                cands.append(v0 + (c - x0) / (x - x0) * (v - v0))
        for u in cands:
            best = u if best is None else max(best, u)
        reached = reached or x >= c
    return best, reached


def frontier_at(curves, c):
    """A method's frontier on one seed at cost c: (max over its runs of value_at_cost, bracketed)."""
    vals = [value_at_cost(cv, c) for cv in curves]
    got = [v for v, _ in vals if v is not None]
    return (max(got) if got else float("nan")), any(r for _, r in vals)


def bootstrap_mean(values, n_boot=2000, seed=0, level=0.95):
    """Mean and percentile bootstrap interval over the seeds."""
    v = np.asarray(values, float)
    idx = np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return float(v.mean()), [float(x) for x in np.percentile(v[idx].mean(1), q)]


def matched(curves_by_seed, c, n_boot=2000):
    """curves_by_seed: {seed: [curve, ...]} of one method. Its frontier at c on every seed, the mean with
    an interval, and whether every seed is bracketed. dict(per_seed, mean, ci, bracketed, n_unbracketed)."""
    seeds = sorted(curves_by_seed)
    per = [frontier_at(curves_by_seed[s], c) for s in seeds]
    vals = [v for v, _ in per]
    n_un = sum(not b for _, b in per)
    mean, ci = bootstrap_mean(vals, n_boot) if all(math.isfinite(v) for v in vals) else (float("nan"), [float("nan")] * 2)
    return dict(per_seed=dict(zip(seeds, vals)), mean=mean, ci=ci, bracketed=n_un == 0, n_unbracketed=n_un)


def paired_difference(a, b, n_boot=2000):
    """mean(a - b) over the seeds both have, with its bootstrap interval (the seeds resampled jointly)."""
    seeds = sorted(set(a) & set(b))
    return bootstrap_mean([a[s] - b[s] for s in seeds], n_boot)


def check_grid(lrs, seeds):
    """The protocol's inputs, or a ValueError line: lrs strictly increasing, at least 2 seeds for an interval."""
    if any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise ValueError(f"--lrs must be positive finite learning rates, got {lrs}")
    if any(b <= a for a, b in zip(lrs, lrs[1:])):
        raise ValueError(f"--lrs must be strictly increasing (a grid, smallest first), got {','.join(f'{x:g}' for x in lrs)}")
    if len(seeds) < 2:
        raise ValueError(f"an interval over seeds needs at least 2 seeds, got --seeds={','.join(map(str, seeds))}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {seeds}")
