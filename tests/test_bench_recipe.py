"""benchmarks/bench_recipe.py's equal-compute rule: variants that differ only in what does not change a
training step's cost (the seed, the learning rate) share one step-time measurement and so train the same
number of steps; variants that change the network are measured apart."""
import os
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_recipe  # noqa: E402
from sftlib import config  # noqa: E402
from sftlib.common import UserError  # noqa: E402
from sftlib.data import DeviceBatches  # noqa: E402
from unet import build_unet  # noqa: E402


def test_seeds_share_a_calibration_and_architectures_do_not():
    V = bench_recipe.VARIANTS
    key = bench_recipe.cost_key
    assert key(V["old"]) == key(V["old_seed1"]) == key(V["lr2e-3"]) == key(V["cosine"])
    assert key(V["skip"]) == key(V["skip_seed1"])
    arch = ["old", "skip", "skip_noattn", "skip_attn16", "skip_res2", "skip_ch24", "b32", "minsnr5"]
    assert len({key(V[v]) for v in arch}) == len(arch)


def test_calibrate_times_every_setup_and_counts_its_parameters():
    tiny = dict(ch=8, ch_mult="1,2", num_res_blocks=1, attn_res="", ddpm_batch=2)
    sets = [tiny, dict(tiny, ch=16)]
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    out = bench_recipe.calibrate(sets, DeviceBatches(x, torch.zeros(8, dtype=torch.long), "cpu"), "cpu", n=1, rounds=2)
    assert len(out) == 2 and all(s > 0 for s, _ in out)
    for (_, n_params), flags in zip(out, sets):  # the parameter count, from a UNet built here
        assert n_params == sum(p.numel() for p in build_unet(dict(config.DEFAULTS, **flags)).parameters())
    assert out[1][1] > out[0][1]


def test_pool_groups_seeds_by_recipe_and_bounds_the_change_by_its_extremes():
    old, new = dict(eps_skip=False), dict(eps_skip=True)
    res = {"a": dict(flags=old, steps=900, fid=200.0, kid=0.2), "a1": dict(flags=dict(old, seed=1), steps=900, fid=220.0, kid=0.3),
           "b": dict(flags=new, steps=900, fid=150.0), "b1": dict(flags=dict(new, seed=1), steps=900, fid=170.0),
           "c": dict(flags=old, steps=1700, fid=100.0)}  # the old recipe at another budget: a recipe of its own
    rows = {tuple(r["variants"]): r for r in bench_recipe.pool(res, "a1", n_boot=4000)}
    assert set(rows) == {("a", "a1"), ("b", "b1"), ("c",)}
    fid_b, (lo, hi) = rows[("b", "b1")]["fid"]
    assert fid_b == 160.0 and (lo, hi) == (150.0, 170.0)  # 2 trainings: P(both draws the lowest) = 1/4 > 2.5 %
    # the change against the baseline: with two trainings per recipe, each extreme resample has probability
    # 1/16 > 2.5 %, so the interval's ends are exactly the extreme ratios
    c, (lo, hi) = rows[("b", "b1")]["fid_change"]
    assert abs(c - (1 - 160 / 210)) < 1e-12
    assert abs(lo - (1 - 170 / 200)) < 1e-12 and abs(hi - (1 - 150 / 220)) < 1e-12
    assert "kid" not in rows[("b", "b1")] and "kid" in rows[("a", "a1")]  # only metrics every training has
    assert rows[("a", "a1")]["fid_change"][0] == 0.0
    # Welch's t-test, from its definition: t over the unequal-variance standard error, Welch-Satterthwaite df
    x, b = np.array([150.0, 170.0]), np.array([200.0, 220.0])
    va, vb = x.var(ddof=1) / 2, b.var(ddof=1) / 2
    t, df = (x.mean() - b.mean()) / np.sqrt(va + vb), (va + vb) ** 2 / (va ** 2 + vb ** 2)
    assert abs(rows[("b", "b1")]["fid_p"] - 2 * stats.t.sf(abs(t), df)) < 1e-12
    assert rows[("c",)]["fid_p"] is None and rows[("a", "a1")]["fid_p"] is None  # one training; the baseline itself
    table = bench_recipe.pool_table(list(rows.values()), "a1")
    assert "(baseline)" in table and "-24 % [-32, -15], p 0.072" in table
    # FIDs of different sample counts do not pool
    with pytest.raises(UserError, match="different sample counts"):
        bench_recipe.pool({"a": dict(res["a"], fid_n=500), "b": dict(res["b"], fid_n=1000)}, "a")
