"""bench_compare.py's statistics (benchmarks/frontier.py) against hand-worked cases and independent
computations: a run's best value at a cost, a method's frontier and its bracketing, the matched-cost
mean with its interval over seeds, the paired difference, and the protocol's bad input."""
import os
import sys

import numpy as np
import pytest
from scipy import stats as sps

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import frontier as fr  # noqa: E402


def test_value_at_cost_hand_worked():
    """Linear between a run's points; the best value at cost <= c, crossings included."""
    curve = [(0.0, 0.0), (1.0, 0.1), (2.0, 0.3), (4.0, 0.5)]
    assert fr.value_at_cost(curve, 3.0) == (pytest.approx(0.4), True)  # halfway from (2, .3) to (4, .5)
    assert fr.value_at_cost(curve, 2.0) == (pytest.approx(0.3), True)  # exactly on a point
    assert fr.value_at_cost(curve, 5.0) == (pytest.approx(0.5), False)  # never reached cost 5: not bracketed
    # a curve that rises in cost, then comes back: the best value at cost <= c is kept, crossings both ways
    back = [(0.0, 0.0), (3.0, 0.2), (1.0, 0.6)]
    v, reached = fr.value_at_cost(back, 2.0)
    assert reached and v == pytest.approx(0.6)  # its last point sits at cost 1 <= 2
    v, _ = fr.value_at_cost([(0.0, 0.0), (4.0, 0.8)], 1.0)
    assert v == pytest.approx(0.2)
    assert fr.value_at_cost([(2.0, 0.5)], 1.0) == (None, True)  # nothing at cost <= 1


def test_frontier_at_takes_the_best_run_and_brackets():
    slow = [(0.0, 0.0), (0.5, 0.1), (1.0, 0.2)]  # a small lr: never reaches cost 2
    fast = [(0.0, 0.0), (2.0, 0.3), (6.0, 0.9)]  # a large lr
    assert fr.frontier_at([slow, fast], 1.0) == (pytest.approx(0.2), True)  # slow's 0.2 beats fast's 0.15 at cost 1
    assert fr.frontier_at([slow, fast], 4.0) == (pytest.approx(0.6), True)
    v, br = fr.frontier_at([slow], 2.0)
    assert v == pytest.approx(0.2) and not br  # unbracketed: the value is what it reached, flagged


def test_matched_mean_interval_and_paired_difference():
    a = {0: [[(0, 0), (2, 0.4)]], 1: [[(0, 0), (2, 0.6)]], 2: [[(0, 0), (2, 0.5)]]}
    m = fr.matched(a, 1.0, n_boot=500)
    assert m["per_seed"] == {0: pytest.approx(0.2), 1: pytest.approx(0.3), 2: pytest.approx(0.25)}
    assert m["mean"] == pytest.approx(0.25) and m["bracketed"] and m["n_unbracketed"] == 0
    assert m["ci"][0] <= 0.25 <= m["ci"][1] and m["ci"][0] >= 0.2 - 1e-12 and m["ci"][1] <= 0.3 + 1e-12
    b = {0: [[(0, 0), (0.5, 0.1)]], 1: [[(0, 0), (2, 0.2)]], 2: [[(0, 0), (2, 0.1)]]}
    mb = fr.matched(b, 1.0, n_boot=500)
    assert not mb["bracketed"] and mb["n_unbracketed"] == 1
    d, ci = fr.paired_difference(mb["per_seed"], m["per_seed"], n_boot=500)
    assert d == pytest.approx(np.mean([0.1 - 0.2, 0.1 - 0.3, 0.05 - 0.25]))
    assert ci[0] <= d <= ci[1]


def test_protocol_bad_input():
    with pytest.raises(ValueError, match="strictly increasing"):
        fr.check_grid([1e-3, 5e-4], [0, 1])
    with pytest.raises(ValueError, match="at least 2 seeds"):
        fr.check_grid([1e-3, 2e-3], [0])
    with pytest.raises(ValueError, match="positive finite"):
        fr.check_grid([0.0, 1e-3], [0, 1])
    with pytest.raises(ValueError, match="repeats"):
        fr.check_grid([1e-3], [1, 1])


def test_bootstrap_mean_degenerate_and_coverage():
    assert fr.bootstrap_mean([0.3] * 5) == (0.3, [0.3, 0.3])
    # coverage on a known distribution: the true mean falls inside the 95 % interval about 95 % of the
    # time (percentile bootstrap at n = 20 undercovers a little), and the width matches Student's t interval
    rng = np.random.default_rng(1)
    hits, ratio = 0, []
    for i in range(300):
        x = rng.normal(1.0, 2.0, 20)
        m, (lo, hi) = fr.bootstrap_mean(x, n_boot=1000, seed=i)
        assert m == pytest.approx(x.mean())
        hits += lo <= 1.0 <= hi
        t_half = sps.t.ppf(0.975, 19) * x.std(ddof=1) / np.sqrt(20)
        ratio.append((hi - lo) / (2 * t_half))
    assert 0.88 <= hits / 300 <= 0.99, hits
    assert 0.85 <= np.median(ratio) <= 1.05, np.median(ratio)
