"""The 10-minute CPU recipe for the DDPM stage, measured: each variant of the DDPM's config trained for
the same wall-clock budget by the project's own command (train_ddpm.py), then sampled (DDIM-50, fixed
noise) and scored by the shipped held-out evaluator (its Fréchet distance, fast) and optionally by
Inception FID/KID (sftlib/fid.py, ~0.4 s per image on 2 CPU cores).

    python benchmarks/bench_recipe.py                                   # every variant, 600 s each
    python benchmarks/bench_recipe.py --variants=old,new --fid=old,new --n_samples=2000
    python benchmarks/bench_recipe.py --budget_s=60 --n_samples=200     # a quick look

A variant that names ddpm_steps (old900: the old default as it shipped) trains that many steps instead.
Equal compute, robust to a busy machine: first every variant's seconds per training step are measured
on the idle machine (3 interleaved rounds of --calib_steps steps after 2 warm-up steps each, in this
process, with the same threads as the training run; variants with the same UNet and batch, such as two
seeds, share one measurement), and each variant then trains for round(budget_s / seconds_per_step) steps. The
DDPM stage's real wall time is reported next to it (it equals the budget only on an idle machine).

Writes <out_dir>/results.json and prints a markdown table; the sample grids are
<out_dir>/<variant>/grid.png (the first 64 of the scored samples).

Several trainings of one recipe (its seeds), pooled from results files into means over the trainings
with percentile bootstrap 95 % intervals, and each recipe's change against a baseline recipe (trains
nothing):

    python benchmarks/bench_recipe.py --pool=benchmarks/results/recipe_cpu_600s.json,... --baseline=old900
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ddpm
from sftlib import config
from sftlib.common import UserError, pick_device, run_main, save_grid, write_text
from sftlib.data import DeviceBatches, load_cifar10
from sftlib.metrics import evaluate_samples, inception_metrics, load_samples, mean_ci
from sftlib.readers import read_json
from unet import build_unet

# Each variant: flags on top of the CPU defaults, every recipe key pinned. "old" is the CPU recipe before
# the eps skip, "new" the default since: the eps-skip recipe at the 10-minute budget (1700 steps: 600 s /
# 0.33 s per step, calibrated here).
OLD = dict(ch=16, ch_mult="1,2,4", num_res_blocks=1, attn_res="8", ddpm_batch=64, ddpm_lr=1e-3, ddpm_min_snr=0.0,
           ddpm_lr_schedule="constant", ddpm_ema=0.999, ddpm_warmup=100, eps_skip=False)
VARIANTS = {
    "old900": dict(OLD, ddpm_steps=900),  # the old default as it was: 900 steps, whatever their wall time
    "old1700": dict(OLD, ddpm_steps=1700),  # the old recipe at the new default's steps: the eps skip's control
    "old": OLD,
    "minsnr5": dict(OLD, ddpm_min_snr=5.0),
    "skip": dict(OLD, eps_skip=True),
    "old_seed1": dict(OLD, seed=1),  # the seed-to-seed spread of the old recipe: the ablations' noise
    "cosine": dict(OLD, ddpm_lr_schedule="cosine"),
    "lr2e-3": dict(OLD, ddpm_lr=2e-3),
    "b32": dict(OLD, ddpm_batch=32),
    "b128": dict(OLD, ddpm_batch=128),
    "noattn": dict(OLD, attn_res=""),
    "ch32_122": dict(OLD, ch=32, ch_mult="1,2,2"),
    "ch24_122": dict(OLD, ch=24, ch_mult="1,2,2"),
    "new": dict(OLD, eps_skip=True, ddpm_steps=1700),  # the eps-skip recipe at the 10-minute budget (the default)
    # the architecture, on top of the eps skip (the default): depth, width, where attention sits
    "skip_seed1": dict(OLD, eps_skip=True, seed=1),  # the seed-to-seed spread of the eps-skip recipe
    # more trainings (seeds) of the three 10-minute rows, for an interval on the recipe's FID gain (train_ddpm.py
    # applies --seed since commit 0df51eb; the results files from before hold unseeded, independent trainings)
    "old900_seed1": dict(OLD, ddpm_steps=900, seed=1),
    "old900_seed2": dict(OLD, ddpm_steps=900, seed=2),
    "new_seed1": dict(OLD, eps_skip=True, ddpm_steps=1700, seed=1),
    "new_seed2": dict(OLD, eps_skip=True, ddpm_steps=1700, seed=2),
    "old1700_seed1": dict(OLD, ddpm_steps=1700, seed=1),
    "skip_noattn": dict(OLD, eps_skip=True, attn_res=""),
    "skip_attn16": dict(OLD, eps_skip=True, attn_res="16"),
    "skip_res2": dict(OLD, eps_skip=True, num_res_blocks=2),
    "skip_ch24": dict(OLD, eps_skip=True, ch=24),
}
DEFAULTS = dict(variants=",".join(VARIANTS), fid="", budget_s=600.0, calib_steps=10, n_samples=1000,
                out_dir="out/bench_recipe", data_root="", device="cpu", seed=0, reuse=True,
                pool="",  # results files (comma-separated) to pool by recipe instead of training anything
                baseline="old900")  # with --pool: the variant whose recipe the others are compared with


# what a training step's cost depends on: variants that agree on these share one calibration, so that
# two seeds of one recipe train the same number of steps
COST_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_res", "dropout", "eps_skip", "ddpm_batch", "ddpm_min_snr")


def cost_key(flags):
    cfg = dict(config.DEFAULTS, **flags)
    return json.dumps({k: cfg[k] for k in COST_KEYS}, sort_keys=True)


def calibrate(flag_sets, data, device, n, rounds=3):
    """Seconds per training step of each UNet and batch in `flag_sets` (a list of flags): the median of
    rounds x n timed steps, the rounds interleaved over the variants, so that a machine whose speed drifts
    while it is measured slows every variant alike. Returns [(s_per_step, n_params)]."""
    setups, times = [], []
    for flags in flag_sets:
        cfg = dict(config.DEFAULTS, **flags)
        model = build_unet(cfg).to(device)
        setups.append((cfg, model, torch.optim.Adam(model.parameters(), lr=1e-4)))
        times.append([])
    sched = ddpm.Schedule(device=device)
    for _ in range(rounds):
        for (cfg, model, opt), ts in zip(setups, times):
            for i in range(n + 2):
                t0 = time.perf_counter()
                x0, _ = data.sample(cfg["ddpm_batch"])
                loss = ddpm.eps_loss(model, sched, x0, cfg["ddpm_min_snr"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i >= 2:  # the first steps of a round warm the caches up again
                    ts.append(time.perf_counter() - t0)
    return [(float(np.median(ts)), sum(p.numel() for p in m.parameters())) for (_, m, _), ts in zip(setups, times)]


POOLED = ("fid", "kid", "fd")  # the sample metrics that --pool summarises


def recipe_of(result):
    """A variant's recipe: its flags without the seed, and its step count (the budget), so that the seeds
    of one recipe at one budget are its trainings."""
    return json.dumps(dict({k: v for k, v in result["flags"].items() if k != "seed"}, ddpm_steps=result["steps"]),
                      sort_keys=True)


def pool(results, baseline, n_boot=2000, seed=0, level=0.95):
    """results: {variant: result} (with "flags" and "steps"), pooled by recipe (`recipe_of`). Returns one row per
    recipe, in the order first seen: dict(variants, n, and per metric m of POOLED that all its trainings have:
    m = (mean over the trainings, [lo, hi] percentile bootstrap interval resampling the trainings), and where
    the baseline's trainings have it too, m_change = (1 - mean / the baseline recipe's mean, its interval:
    both recipes' trainings resampled independently) and m_p = Welch's t-test p-value of the two recipes'
    trainings (None with fewer than two of either, or without scipy)). baseline: a variant name; its recipe
    is the reference. FIDs and KIDs of different sample counts are not comparable: a UserError."""
    groups = {}
    for v, r in results.items():
        groups.setdefault(recipe_of(r), []).append(v)
    if baseline not in results:
        raise UserError(f"--baseline={baseline} is not in the pooled results: one of {', '.join(results)}")
    counts = {r["fid_n"] for r in results.values() if "fid_n" in r}
    if len(counts) > 1:
        raise UserError(f"the pooled results score different sample counts {sorted(counts)}: pool one count at a time")
    ref = groups[recipe_of(results[baseline])]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    rng = np.random.default_rng(seed)
    draw = lambda v: v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)  # (n_boot,) resampled means, for a ratio
    rows = []
    for names in groups.values():
        row = dict(variants=names, n=len(names))
        for m in POOLED:
            if not all(m in results[v] for v in names):
                continue
            x = np.array([results[v][m] for v in names], float)
            row[m] = mean_ci(x, n_boot, seed, level)
            if not all(m in results[v] for v in ref):
                continue
            b = np.array([results[v][m] for v in ref], float)
            row[m + "_change"] = (float(1 - x.mean() / b.mean()),
                                  [float(t) for t in np.percentile(1 - draw(x) / draw(b), q)])
            row[m + "_p"] = welch_p(x, b) if names != ref else None
        rows.append(row)
    return rows


def welch_p(x, b):
    """Two-sided p-value of Welch's t-test (unequal variances) between two sets of trainings; None with fewer
    than two in either, or where scipy is not installed (it is optional)."""
    if len(x) < 2 or len(b) < 2:
        return None
    try:
        from scipy import stats
    except ImportError:
        return None
    return float(stats.ttest_ind(x, b, equal_var=False).pvalue)


def pool_table(rows, baseline):
    """The rows of `pool` as markdown: intervals only where there are two trainings or more to resample."""
    n_ref = next(r["n"] for r in rows if baseline in r["variants"])

    def cell(r, m, f):
        if m not in r:
            return "-"
        mean, (lo, hi) = r[m]
        return f.format(mean) + (f" [{f.format(lo)}, {f.format(hi)}]" if r["n"] > 1 else "")

    def change(r, m):
        if baseline in r["variants"]:
            return "(baseline)"
        if m + "_change" not in r:
            return "-"
        c, (lo, hi) = r[m + "_change"]  # 1 - mean / baseline's: shown as the change in per cent (negative = lower)
        p = r[m + "_p"]
        return (f"{-100 * c:+.0f} %" + (f" [{-100 * hi:+.0f}, {-100 * lo:+.0f}]" if r["n"] > 1 and n_ref > 1 else "")
                + (f", p {p:.2g}" if p is not None else ""))

    out = [f"| recipe (trainings) | n | Inception FID | vs {baseline} | KID | vs {baseline} | evaluator FD |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {', '.join(r['variants'])} | {r['n']} | {cell(r, 'fid', '{:.1f}')} | {change(r, 'fid')} "
                   f"| {cell(r, 'kid', '{:.3f}')} | {change(r, 'kid')} | {cell(r, 'fd', '{:.2f}')} |")
    return "\n".join(out + ["Means over the trainings with percentile bootstrap 95 % intervals over them (none "
                            "for one training; with two or three trainings the interval is about their range, and "
                            "covers the true mean less often than 95 %); a change is the means', its interval "
                            "resampling both recipes' trainings; p: Welch's t-test of the two recipes' trainings."])


def run(cmd):
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - t0


def main(argv):
    a = dict(DEFAULTS, **config.parse_overrides(argv, DEFAULTS, description=__doc__))
    if a["pool"]:
        results = {}
        for path in a["pool"].split(","):
            if not os.path.isfile(path):
                raise UserError(f"--pool: no results file {path}")
            for v, r in read_json(path, {}, "results").items():  # torn or not an object: one line
                if not isinstance(r, dict) or "flags" not in r:  # a note ("_note"), not a variant
                    continue
                if v in results and results[v] != r:
                    raise UserError(f"--pool: variant {v} has different results in two files")
                results[v] = r
        print(pool_table(pool(results, a["baseline"]), a["baseline"]))
        return
    names = [v for v in a["variants"].split(",") if v]
    fid_names = [v for v in a["fid"].split(",") if v]
    for v in names + fid_names:
        if v not in VARIANTS:
            raise UserError(f"unknown variant {v!r}: one of {', '.join(VARIANTS)}")
    if a["budget_s"] <= 0 or a["n_samples"] < 2 or a["calib_steps"] < 1:
        raise UserError("--budget_s must be > 0, --n_samples >= 2 and --calib_steps >= 1")
    data_root = a["data_root"] or os.environ.get("SHORTFT_CIFAR", "data")
    device = pick_device(a["device"])
    out = os.path.abspath(a["out_dir"])
    os.makedirs(out, exist_ok=True)
    res_path = os.path.join(out, "results.json")
    results = read_json(res_path, {}, "results") if a["reuse"] and os.path.isfile(res_path) else {}
    # the judge: the shipped held-out evaluator (installed with the other classroom models)
    judge = os.path.join(out, "judge")
    if not os.path.isfile(os.path.join(judge, "evaluator", "ckpt.pt")):
        from sftlib import pretrained
        pretrained.install(dict(config.DEFAULTS, out_dir=judge, data_root=data_root))

    x, y = load_cifar10(data_root, "train", 0, os.path.join(out, "cache"))
    data = DeviceBatches(x, y, device)
    # calibration first, on the machine as idle as it is now: one per step cost, shared by the variants
    # that agree on it (seeds of one recipe), of every variant without a result yet
    todo = [v for v in names if "s_per_step" not in results.get(v, {}) or results[v].get("flags") != VARIANTS[v]]
    keys = sorted({cost_key(VARIANTS[v]) for v in todo})
    measured = dict(zip(keys, calibrate([json.loads(k) for k in keys], data, device, a["calib_steps"]) if keys else []))
    for v in todo:
        r = results.setdefault(v, {})
        r.clear()
        r["flags"] = VARIANTS[v]
        r["s_per_step"], r["params"] = measured[cost_key(VARIANTS[v])]
        r["steps"] = VARIANTS[v].get("ddpm_steps") or max(1, round(a["budget_s"] / r["s_per_step"]))
        print(f"[recipe] {v}: {r['params'] / 1e6:.2f}M parameters, {r['s_per_step']:.3f} s/step "
              f"-> {r['steps']} steps in {a['budget_s']:.0f} s", flush=True)
    write_text(res_path, json.dumps(results, indent=1))

    for v in names:
        r = results[v]
        vdir = os.path.join(out, v)
        flags = [f"--{k}={val}" for k, val in r["flags"].items() if k != "ddpm_steps"]
        common = [f"--data_root={data_root}", f"--device={a['device']}"] + ([] if "seed" in r["flags"] else [f"--seed={a['seed']}"])
        if "ddpm_wall_s" not in r:
            r["ddpm_wall_s"] = run([sys.executable, "train_ddpm.py", f"--out_dir={vdir}", f"--ddpm_steps={r['steps']}",
                                    f"--sample_every={r['steps']}", f"--ddpm_ckpt_every={max(1, r['steps'] // 4)}",
                                    "--log_every=50", "--preset=cpu"] + flags + common)
            write_text(res_path, json.dumps(results, indent=1))
        npz = os.path.join(vdir, "samples.npz")
        if "sample_img_per_s" not in r:
            wall = run([sys.executable, "train_toy.py", "sample", f"--ckpt={vdir}/ddpm/ckpt.pt",
                        f"--n={a['n_samples']}", f"--out={npz}", "--seed=0", f"--device={a['device']}"])
            r["sample_img_per_s"] = a["n_samples"] / wall  # includes the process start (~2 s)
        images = load_samples(npz)
        save_grid(torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1, os.path.join(vdir, "grid.png"))
        if "fd" not in r:
            m = evaluate_samples(images, judge, device)
            r.update(fd=m["fd"], fd_floor_same_n=m["fd_floor_same_n"], diversity=m["diversity"],
                     class_entropy=m["evaluator_class_entropy"])
        if v in fid_names and r.get("fid_n") != len(images):
            r.update(inception_metrics(images, judge, device))
        write_text(res_path, json.dumps(results, indent=1))
        print(f"[recipe] {v}: {json.dumps({k: r[k] for k in r if k != 'flags'})}", flush=True)
    print(table(results, names))


def table(results, names):
    rows = ["| variant | params | s/step | steps | DDPM wall s | evaluator FD (floor) | diversity | FID | KID | sample img/s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for v in names:
        r = results[v]
        fid = f"{r['fid']:.1f}" if "fid" in r else "-"
        kid = f"{r['kid']:.4f} ± {r['kid_std']:.4f}" if "kid" in r else "-"
        rows.append(f"| {v} | {r['params'] / 1e6:.2f}M | {r['s_per_step']:.3f} | {r['steps']} | {r['ddpm_wall_s']:.0f} "
                    f"| {r['fd']:.2f} ({r['fd_floor_same_n']:.2f}) | {r['diversity']:.2f} | {fid} | {kid} "
                    f"| {r['sample_img_per_s']:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    run_main(main)
