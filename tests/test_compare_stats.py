"""bench_compare.py's statistics against hand-worked cases and independent computations: the tuning
rule (an lr at equal quality cost), the bootstrap interval of a mean (coverage on known distributions), and ShortFT against the best
baseline (the ratio and difference intervals, the best re-chosen in every resample)."""
import os
import sys

import numpy as np
import pytest
from scipy import stats as sps

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_compare as bc  # noqa: E402


def test_choose_lr_rule():
    """The lr where the class-matched FD after reaches fd_tol x the base's, interpolated in log lr."""
    pts = {1e-4: (0.20, 5.0, 5.0), 1e-3: (0.50, 6.0, 5.0), 1e-2: (0.90, 9.0, 5.0)}  # (rate, FD after, FD before)
    # bound 1.25 x 5 = 6.25, between FD 6.0 (lr 1e-3) and 9.0 (lr 1e-2): 1/12 of the way in log lr
    lr, why = bc.choose_lr(pts, 1.25)
    assert lr == pytest.approx(float(f"{1e-3 * 10 ** (0.25 / 3):.2g}")) and lr == 1.2e-3 and "between 0.001 and 0.01" in why
    assert bc.choose_lr(pts, 1.6)[0] == pytest.approx(float(f"{1e-3 * 10 ** (2 / 3):.2g}"))  # bound 8.0: 2/3 of the way
    lr, why = bc.choose_lr(pts, 2.0)  # the bound (10.0) is never reached: the grid's largest, said so
    assert lr == 1e-2 and "largest" in why
    lr, why = bc.choose_lr({1e-4: (0.2, 9.0, 5.0), 1e-3: (0.9, 9.5, 5.0)}, 1.25)
    assert lr == 1e-4 and "smallest" in why  # over the bound already at the smallest lr
    # the first crossing counts, even if a larger lr dips below the bound again (noise); and the
    # rate plays no part: every method is compared at the same quality cost
    pts = {1e-4: (0.9, 5.0, 5.0), 1e-3: (0.1, 7.5, 5.0), 1e-2: (0.5, 6.0, 5.0)}
    assert bc.choose_lr(pts, 1.25)[0] == pytest.approx(float(f"{1e-4 * 10 ** 0.5:.2g}"))  # halfway 5.0 -> 7.5


def test_mean_ci_degenerate_and_coverage():
    assert bc.mean_ci([0.3] * 5) == (0.3, [0.3, 0.3])
    # coverage on a known distribution: the true mean falls inside the 95 % interval about 95 % of the
    # time (percentile bootstrap at n = 20 undercovers a little), and the width matches Student's t interval
    rng = np.random.default_rng(1)
    hits, ratio = 0, []
    for i in range(300):
        x = rng.normal(1.0, 2.0, 20)
        m, (lo, hi) = bc.mean_ci(x, n_boot=1000, seed=i)
        assert m == pytest.approx(x.mean())
        hits += lo <= 1.0 <= hi
        t_half = sps.t.ppf(0.975, 19) * x.std(ddof=1) / np.sqrt(20)
        ratio.append((hi - lo) / (2 * t_half))
    assert 0.88 <= hits / 300 <= 0.99, hits
    assert 0.85 <= np.median(ratio) <= 1.05, np.median(ratio)


def test_versus_best_exact_cases():
    base = np.array([0.10, 0.20, 0.15, 0.05, 0.12])
    v = bc.versus_best({"shortft": 2 * base, "a": base, "b": base / 2}, "shortft", ["a", "b"])
    assert v["best"] == "a"
    assert v["ratio"] == pytest.approx(2.0) and v["ratio_ci"] == pytest.approx([2.0, 2.0])  # 2x on every seed
    assert v["diff"] == pytest.approx(base.mean()) and v["p_ratio_undefined"] == 0
    # a baseline that never gains: the ratio is undefined, said so, and the difference still has its interval
    w = bc.versus_best({"shortft": base, "a": -base}, "shortft", ["a"])
    assert np.isnan(w["ratio"]) and w["p_ratio_undefined"] == 1.0 and w["diff"] == pytest.approx(2 * base.mean())


def test_versus_best_difference_matches_a_paired_bootstrap():
    """When one baseline is best in every resample, the difference interval is the plain paired
    bootstrap of (ours - that baseline) over seeds, computed here independently with the same draws."""
    rng = np.random.default_rng(0)
    ours, a = rng.normal(0.3, 0.1, 6), rng.normal(0.2, 0.1, 6)
    b = a - 1.0  # never the best
    v = bc.versus_best({"ours": ours, "a": a, "b": b}, "ours", ["a", "b"], n_boot=500, seed=7)
    draws = np.random.default_rng(7)
    d = []
    for _ in range(500):
        idx = draws.integers(0, 6, 6)
        d.append(ours[idx].mean() - a[idx].mean())
    assert v["diff_ci"] == pytest.approx(list(np.percentile(d, [2.5, 97.5])))


def test_versus_best_rechoosing_widens_towards_the_baselines():
    """Two equally good noisy baselines: re-choosing the best in each resample makes the best-baseline
    mean at least either's, so the difference interval sits no higher than against a fixed one."""
    rng = np.random.default_rng(3)
    ours, a, b = rng.normal(0.3, 0.1, 5), rng.normal(0.2, 0.1, 5), rng.normal(0.2, 0.1, 5)
    both = bc.versus_best({"o": ours, "a": a, "b": b}, "o", ["a", "b"], seed=0)
    only_a = bc.versus_best({"o": ours, "a": a}, "o", ["a"], seed=0)
    only_b = bc.versus_best({"o": ours, "b": b}, "o", ["b"], seed=0)
    assert both["diff_ci"][1] <= min(only_a["diff_ci"][1], only_b["diff_ci"][1]) + 1e-12
