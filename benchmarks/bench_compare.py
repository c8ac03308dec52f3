"""ShortFT against the baselines at equal wall-clock compute: each method at its own tuned learning rate,
several seeds, bootstrap 95 % intervals, and the reward-vs-quality (Pareto) plot.

    python benchmarks/bench_compare.py            # 6 methods, lr grid of 3, 5 seeds, 25 s each (2-core CPU: ~28 min)
    python benchmarks/bench_compare.py --quick    # a smoke run: 2 methods, 2 lrs, 2 seeds, 6 s each
    python benchmarks/bench_compare.py --full     # + full backprop and the ablations, 120 s each, 512 samples, eval curves
    python benchmarks/bench_compare.py --out_dir=out_classroom   # on `train_toy.py --pretrained --stages=ddpm` models

Needs the trained stages in --out_dir (ddpm, shortcut, classifier, evaluator: `python train_toy.py`, or
`python train_toy.py --pretrained --stages=ddpm` for the classroom checkpoints). Every run fine-tunes the
same base model with the same reward for the same training seconds (`--ft_seconds`), in its own folder
<out_dir>/compare/seed<S>/<method>_lr<lr>/, and is scored by the held-out evaluator on DDIM-50 samples of
its fine-tuned model from the same fixed noise (train_shortft.py: the evaluation noise is paired across
methods and seeds; the seed changes the training noise and the LoRA initialisation).

The protocol (*choices*, stated so that every method is treated alike):
  1. Tuning. Every method runs at every learning rate of --lrs on the --tune_seeds, which are disjoint
     from the reported seeds (no selection bias in what is reported). The rule (choose_lr): every method
     pays the same quality cost. Its lr is the one at which its class-matched Fréchet distance after
     fine-tuning (mean over the tuning seeds) reaches --fd_tol times the base model's, interpolated in
     log lr between the grid's lrs; so the reported gains are gains at (about) equal damage, one point
     of each method's reward-quality curve. Class-matched (sftlib/metrics.class_matched): the intended
     class shift is not counted as damage.
  2. Reporting. Every method at its chosen lr on every seed of --seeds. Gain = after - before of the
     held-out target rate; its mean over seeds with a percentile bootstrap 95 % interval over seeds; the
     ShortFT / best-baseline ratio and difference with the best baseline re-chosen in every resample
     (seeds resampled jointly for all methods), so the choice of "best" is inside the interval.
  3. Equal compute. On a CPU, `--jobs=0` (auto) runs two one-thread processes side by side, so every run
     has one core for the same seconds; on a GPU it runs --gpu_jobs processes side by side, submitted
     method by method so that every wave mixes the methods.

Writes <out_dir>/compare/results.md (tables), results.json (every run), pareto.png (held-out target
rate against class-matched Fréchet distance: every tuning point and each method's reported mean with its
intervals) and, with --eval_every_s > 0, curves.png (both along training, and ShortFT's chain_gap with and
without P-Training). The k = 2 and k = 8 ablations (shortft_k2, shortft_k8) distil their shortcuts once,
from the k = 4 one, under <out_dir>/compare/k<k>/.
"""
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python benchmarks/<name>.py` from anywhere: the project's modules live at ROOT
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # and its siblings (compare_report, ft_probe), also when imported as benchmarks.bench_compare

from sftlib import config
from sftlib.common import UserError, load_checkpoint, pick_device, run_main, write_text
from sftlib.metrics import mean_ci
from compare_report import curves, nanmean, pareto, render  # noqa: F401  (figures.py draws with them too)
from ft_probe import chain_fidelity, step_memory

MAIN = "shortft,shortft_naive,draft,draft_lv,alignprop,drtune"  # full backprop: 3 steps in 25 s on a core, in --full
DEFAULTS = dict(out_dir="out", seconds=25.0, seeds="0,1,2,3,4", tune_seeds="100", lrs="3e-4,1e-3,3e-3",
                fd_tol=1.25,  # the tuning rule: each method's lr is where its class-matched FD after reaches fd_tol x the base's
                n_eval=128, quick=False, full=False, device="auto", jobs=0, gpu_jobs=1, threads=1, methods=MAIN,
                eval_every_s=0.0,  # > 0: held-out scores every this many training seconds (curves.png, chain_gap)
                k_shortcut_steps=60, child_mem="", fid_n=0, n_boot=2000,
                report_only=False,  # no new runs: the report from the runs already done (a killed benchmark's)
                child_args="")  # more train_toy.py flags for every fine-tuning run, e.g. "--ft_batch=16"
QUICK = dict(seconds=6.0, seeds="0,1", tune_seeds="100", lrs="1e-3,3e-3", n_eval=32, methods="shortft,draft",
             k_shortcut_steps=4)
FULL = dict(seconds=120.0, n_eval=512, eval_every_s=20.0, lrs="1e-4,3e-4,1e-3,3e-3,1e-2",
            methods=MAIN + ",full_ckpt,full,shortft_no_tlora,shortft_no_ptrain,shortft_k2,shortft_k8")
# name -> the train_toy.py overrides that make it
RUNS = {"shortft": [], "draft": ["--method=draft"], "draft_lv": ["--method=draft_lv"],
        "alignprop": ["--method=alignprop"], "drtune": ["--method=drtune"], "shortft_naive": ["--method=shortft_naive"],
        "full": ["--method=full"],
        "full_ckpt": ["--method=full", "--full_checkpoint"],
        "shortft_no_tlora": ["--tlora=false"], "shortft_no_ptrain": ["--progressive=false"],
        "shortft_k2": [], "shortft_k8": []}  # ShortFT on a shortcut of k = 2 / 8 segments (k_of)
CONTROLS = ("shortft_naive", "shortft_no_tlora", "shortft_no_ptrain", "shortft_k2", "shortft_k8")  # not baselines


def k_of(name):
    """The number of segments of a run's shortcut: 4 (the stage's own), or the _k<k> suffix."""
    m = re.search(r"_k(\d+)$", name)
    return int(m.group(1)) if m else None


def method_of(name):
    return next((a.split("=")[1] for a in RUNS[name] if a.startswith("--method=")), "shortft")


def baselines_of(names):
    """The compared baselines: the long-chain methods (the ShortFT variants and controls are not)."""
    return [n for n in names if n not in CONTROLS and method_of(n) != "shortft"]


# ---- the statistics (pure functions; tests/test_compare_stats.py checks them against hand-worked cases) ----

def choose_lr(points, fd_tol):
    """The tuning rule: every method at the same quality cost. points: {lr: (target rate after,
    class-matched FD after, class-matched FD before)}, each the mean over the tuning seeds. The bound is
    fd_tol x the base's FD; the lr is where the method's FD after first reaches it, interpolated
    linearly in (log lr, FD) between the two grid lrs around the crossing (2 significant digits).
    Returns (lr, why); the grid's smallest lr if it is over the bound already, its largest if no lr
    reaches the bound (then a wider --lrs would give the method more)."""
    lrs = sorted(points)
    bound = fd_tol * points[lrs[0]][2]
    over = [i for i, lr in enumerate(lrs) if points[lr][1] > bound]
    if not over:
        return lrs[-1], "below the FD bound at every lr: the grid's largest"
    i = over[0]
    if i == 0:
        return lrs[0], "over the FD bound at the grid's smallest lr"
    lo, hi = lrs[i - 1], lrs[i]
    frac = (bound - points[lo][1]) / (points[hi][1] - points[lo][1])  # in [0, 1): FD(lo) <= bound < FD(hi)
    lr = math.exp(math.log(lo) + frac * (math.log(hi) - math.log(lo)))
    return float(f"{lr:.2g}"), f"FD bound reached between {lo:g} and {hi:g}"


def versus_best(gains, ours, baselines, n_boot=2000, seed=0, level=0.95):
    """ShortFT against the best baseline. gains: {name: per-seed gains (same seeds, same order)}.
    Resamples the seeds jointly, re-chooses the best baseline (highest mean gain) in every resample, and
    returns dict(best, ratio, ratio_ci, diff, diff_ci, p_ratio_undefined): the ratio is undefined in a
    resample where the best baseline's mean gain is <= 0 (those resamples are left out of its interval)."""
    g = {n: np.asarray(gains[n], float) for n in [ours, *baselines]}
    n = len(g[ours])
    means = lambda idx: {b: g[b][idx].mean() for b in baselines}
    full = means(np.arange(n))
    best = max(full, key=full.get)
    rng = np.random.default_rng(seed)
    ratios, diffs = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        m = means(idx)
        b = max(m, key=m.get)
        o = g[ours][idx].mean()
        diffs.append(o - m[b])
        if m[b] > 0:
            ratios.append(o / m[b])
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    o = float(g[ours].mean())
    return dict(best=best, ratio=o / full[best] if full[best] > 0 else float("nan"),
                ratio_ci=[float(x) for x in np.percentile(ratios, q)] if ratios else [float("nan")] * 2,
                diff=o - float(full[best]), diff_ci=[float(x) for x in np.percentile(diffs, q)],
                p_ratio_undefined=1 - len(ratios) / n_boot)


# ---- the runs ----

def child_env(opts):
    """The environment of a fine-tuning child: --threads CPU threads (one per job on 2 cores)."""
    return dict(os.environ, OMP_NUM_THREADS=str(opts["threads"]), MKL_NUM_THREADS=str(opts["threads"]))


def call(args, what, env=None):
    """Run `python ARGS` from here, quietly; a failure becomes one UserError line (its last stderr line)."""
    p = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, env=env)
    if p.returncode != 0:
        raise UserError(f"{what} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")


def shortcut_for_k(k, opts, device):
    """<out_dir>/compare/k<k>/shortcut: a shortcut with k segments, re-segmented from the k = 4 one."""
    base = os.path.abspath(opts["out_dir"])
    out = os.path.join(base, "compare", f"k{k}")
    os.makedirs(out, exist_ok=True)
    for link in ("ddpm", "cache"):  # the same teacher and the same cached data
        if not os.path.exists(os.path.join(out, link)) and os.path.exists(os.path.join(base, link)):
            os.symlink(os.path.join(base, link), os.path.join(out, link))
    data_root = load_checkpoint(os.path.join(base, "ddpm", "ckpt.pt"), "ddpm")["config"]["data_root"]
    print(f"[compare] the k = {k} shortcut: {opts['k_shortcut_steps']} steps from the k = 4 one", flush=True)
    # --resume: a complete shortcut is skipped, a killed distillation continues, a missing one starts
    call([os.path.join(ROOT, "train_toy.py"), "--stages=shortcut", f"--out_dir={out}", f"--k_segments={k}",
          f"--shortcut_steps={opts['k_shortcut_steps']}", f"--data_root={data_root}", "--preset=cpu",
          f"--shortcut_init={os.path.join(base, 'shortcut', 'ckpt.pt')}", f"--device={device.type}",
          "--sample_every=1000000", "--resume"], f"distilling the k = {k} shortcut")
    return os.path.join(out, "shortcut")


def run(name, seed, lr, opts, device):
    """One fine-tuning run in its own out_dir, <out_dir>/compare/seed<S>/<name>_lr<lr>, whose stage folders
    link to the shared trained ones: runs never share a folder. Done runs are read back, not rerun."""
    base = os.path.abspath(opts["out_dir"])
    k = k_of(name)
    out = os.path.join(base, "compare", f"seed{seed}", f"{name}_lr{lr:g}")
    os.makedirs(out, exist_ok=True)
    for stage in ("ddpm", "shortcut", "classifier", "evaluator"):  # the shared, already trained stages
        src = os.path.join(base, "compare", f"k{k}", stage) if stage == "shortcut" and k else os.path.join(base, stage)
        if not os.path.exists(os.path.join(out, stage)):
            os.symlink(src, os.path.join(out, stage))
    run_dir = os.path.join(out, method_of(name))  # where train_shortft writes: <out>/<method>
    args = [f"--out_dir={out}", "--preset=cpu", f"--seed={seed}", f"--ft_lr={lr:g}",
            f"--ft_seconds={opts['seconds']}", f"--n_eval={opts['n_eval']}", f"--device={device.type}",
            "--ft_ckpt_every=1000000", f"--ft_eval_every_s={opts['eval_every_s']}", "--grid_ft=8", *RUNS[name],
            *opts["child_args"].split()]
    if opts["fid_n"] > 0:
        args.append(f"--fid_n={opts['fid_n']}")
    stamp = os.path.join(out, "args.json")  # a finished run is reused only if it ran with these arguments
    same = False
    if os.path.isfile(stamp):
        with open(stamp) as f:
            same = json.load(f) == args
    if not (same and os.path.isfile(os.path.join(run_dir, "metrics.json"))):
        if opts["report_only"]:
            return None
        print(f"[compare] {time.strftime('%H:%M:%S')} {name}, lr {lr:g}, seed {seed}: {opts['seconds']:g} s", flush=True)
        if os.path.isdir(run_dir):  # a killed run: start it over (a time budget cannot be resumed fairly)
            for f in os.listdir(run_dir):
                os.remove(os.path.join(run_dir, f))
        call([os.path.join(ROOT, "benchmarks", "ft_probe.py"), *args], f"{name}, lr {lr:g}, seed {seed}", env=child_env(opts))
        write_text(stamp, json.dumps(args))
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    rows = np.loadtxt(os.path.join(run_dir, "log.csv"), delimiter=",", skiprows=1, ndmin=2)  # step, phase, reward, grad_norm, ms
    return dict(name=name, seed=seed, lr=lr, steps=m["steps"], ms=m["ms_per_step_median"], before=m["before"],
                after=m["after"], curve=m["curve"], grad_p95=float(np.percentile(rows[:, 3], 95)) if len(rows) else float("nan"),
                grad_max=float(rows[:, 3].max()) if len(rows) else float("nan"))


def parse_opts(argv):
    given = config.parse_overrides(argv, DEFAULTS, description=__doc__)
    if given.get("quick") and given.get("full"):
        raise UserError("--quick and --full exclude each other")
    mode = QUICK if given.get("quick") else FULL if given.get("full") else {}
    opts = {**DEFAULTS, **mode, **given}  # the mode's sizes, unless given explicitly
    names = opts["methods"].split(",")
    bad = [n for n in names if n not in RUNS]
    if bad:
        raise UserError(f"unknown method {bad[0]!r}: choose from {', '.join(RUNS)}")

    def ints(key):
        try:
            v = [int(s) for s in opts[key].split(",")]
        except ValueError:
            raise UserError(f"--{key} must be a comma list of integers, e.g. 0,1,2; got {opts[key]!r}") from None
        if not v or min(v) < 0:
            raise UserError(f"--{key} must be non-negative integers, got {opts[key]!r}")
        return v
    seeds, tune = ints("seeds"), ints("tune_seeds")
    if len(seeds) < 1:
        raise UserError("--seeds needs at least 1 seed")
    if set(seeds) & set(tune):
        raise UserError(f"--tune_seeds must be disjoint from --seeds (the reported runs): both hold "
                        f"{sorted(set(seeds) & set(tune))}")
    try:
        lrs = sorted({float(s) for s in opts["lrs"].split(",")})
    except ValueError:
        raise UserError(f"--lrs must be a comma list of learning rates, e.g. 1e-4,3e-4,1e-3; got {opts['lrs']!r}") from None
    if not lrs or min(lrs) <= 0 or not all(math.isfinite(x) for x in lrs):
        raise UserError(f"--lrs must be positive finite learning rates, got {opts['lrs']!r}")
    if opts["seconds"] <= 0 or opts["n_eval"] < 2 or opts["fd_tol"] <= 0 or opts["n_boot"] < 100:
        raise UserError("--seconds and --fd_tol must be > 0, --n_eval >= 2, --n_boot >= 100")
    if opts["jobs"] < 0 or opts["gpu_jobs"] < 1 or opts["threads"] < 1:
        raise UserError("--jobs must be >= 0 (0: 2 on a CPU, --gpu_jobs on a GPU), --gpu_jobs and --threads >= 1")
    return opts, names, seeds, tune, lrs


def main(argv):
    opts, names, seeds, tune, lrs = parse_opts(argv)
    device = pick_device(opts["device"])
    if opts["child_mem"]:
        n, k = opts["child_mem"], k_of(opts["child_mem"])
        shortcut = os.path.join(opts["out_dir"], "compare", f"k{k}", "shortcut") if k else os.path.join(opts["out_dir"], "shortcut")
        print(json.dumps(step_memory(RUNS[n], shortcut, opts["out_dir"], device)))
        return
    for stage in ("ddpm", "shortcut", "classifier", "evaluator"):
        if not os.path.isfile(os.path.join(opts["out_dir"], stage, "ckpt.pt")):
            raise UserError(f"{opts['out_dir']}/{stage}/ckpt.pt is missing: run `python train_toy.py` "
                            f"(or `python train_toy.py --pretrained --stages=ddpm`) with this --out_dir first")
    if opts["jobs"] == 0:
        opts["jobs"] = 2 if device.type == "cpu" else opts["gpu_jobs"]
    t_start = time.time()
    for k in sorted({k_of(n) for n in names if k_of(n)} if not opts["report_only"] else ()):
        shortcut_for_k(k, opts, device)  # the k-ablation shortcuts first (all cores)
    if opts["fid_n"] > 0:  # fail early without the Inception weights; the test split's statistics once for all runs
        from sftlib import fid, metrics
        try:
            fid.load_inception(device)
            metrics.fid_reference(opts["out_dir"], device)
        except fid.FIDError as e:
            raise UserError(str(e)) from None

    def batch(jobs):  # jobs: [(name, seed, lr)], submitted in this order (waves mix the methods)
        with ThreadPoolExecutor(opts["jobs"]) as pool:
            futs = [pool.submit(run, n, s, lr, opts, device) for n, s, lr in jobs]
            return [r for r in (f.result() for f in futs) if r is not None]  # None: not run (--report_only)

    chosen, tuning = {}, []
    if len(lrs) > 1:  # 1. tuning, on the tuning seeds
        tuning = batch([(n, s, lr) for s in tune for lr in lrs for n in names])
        for n in names:
            pts = {}
            for lr in lrs:
                rs = [r for r in tuning if r["name"] == n and r["lr"] == lr]
                if not rs:
                    raise UserError(f"--report_only: the tuning run of {n} at lr {lr:g} is missing")
                pts[lr] = tuple(float(np.mean([f(r) for r in rs])) for f in (
                    lambda r: r["after"]["evaluator_target_rate"], lambda r: r["after"]["fd_matched"],
                    lambda r: r["before"]["fd_matched"]))
            chosen[n] = choose_lr(pts, opts["fd_tol"])
    else:
        chosen = {n: (lrs[0], "the only lr given") for n in names}
    t_tuned = time.time()
    reported = batch([(n, s, chosen[n][0]) for s in seeds for n in names])  # 2. the reported runs
    if opts["report_only"]:  # a killed benchmark: the seeds every method finished, so that gains stay paired
        seeds = [s for s in seeds if all(any(r["name"] == n and r["seed"] == s for r in reported) for n in names)]
        if not seeds:
            raise UserError("--report_only: no seed has a finished run of every method yet")
        reported = [r for r in reported if r["seed"] in seeds]
    t_done = time.time()
    mems = child_mems(names, opts, device) if not opts["report_only"] else {n: float("nan") for n in names}
    fidelity = chain_fidelity(opts["out_dir"], device)
    res = dict(opts=opts, device=str(device), seeds=seeds, tune_seeds=tune, lrs=lrs,
               chosen={n: dict(lr=c[0], why=c[1]) for n, c in chosen.items()}, tuning=tuning, reported=reported,
               step_peak_mib=mems, chain_fidelity=fidelity,
               wall_s=dict(tuning=t_tuned - t_start, reported=t_done - t_tuned, total=time.time() - t_start))
    res["summary"] = summarise(res, names, opts)
    write_text(os.path.join(opts["out_dir"], "compare", "results.json"), json.dumps(res, indent=1))
    report = render(res, names, opts)
    write_text(os.path.join(opts["out_dir"], "compare", "results.md"), report + "\n")
    print(report)
    pareto(res, names, os.path.join(opts["out_dir"], "compare", "pareto.png"))
    if opts["eval_every_s"] > 0:
        curves(res, names, os.path.join(opts["out_dir"], "compare", "curves.png"))
    print(f"\nwritten: {os.path.join(opts['out_dir'], 'compare')}/results.md, results.json, pareto.png")


def child_mems(names, opts, device):
    """One training step's peak memory per method, each in a fresh process, --jobs at a time (a peak
    RSS and CUDA's allocator both count per process)."""
    def one(n):
        p = subprocess.run([sys.executable, __file__, f"--child_mem={n}", f"--out_dir={opts['out_dir']}",
                            f"--device={device.type}"], capture_output=True, text=True, cwd=ROOT, env=child_env(opts))
        return float(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else float("nan")
    with ThreadPoolExecutor(opts["jobs"]) as pool:
        return dict(zip(names, pool.map(one, names)))


def summarise(res, names, opts):
    """Per method over the reported seeds: means with bootstrap intervals; ShortFT vs the best baseline."""
    s = {}
    for n in names:
        rs = sorted((r for r in res["reported"] if r["name"] == n), key=lambda r: r["seed"])
        a = lambda key: [r["after"].get(key, float("nan")) for r in rs]  # fd_target: absent if no sample is the target
        gain = [r["after"]["evaluator_target_rate"] - r["before"]["evaluator_target_rate"] for r in rs]
        s[n] = dict(lr=res["chosen"][n]["lr"], steps=float(np.median([r["steps"] for r in rs])),
                    ms=float(np.median([r["ms"] for r in rs])), gain=gain,
                    gain_mean_ci=mean_ci(gain, opts["n_boot"]),
                    logp_gain_mean_ci=mean_ci([r["after"]["evaluator_mean_logp_target"] - r["before"]["evaluator_mean_logp_target"]
                                               for r in rs], opts["n_boot"]),
                    rate_after_mean_ci=mean_ci(a("evaluator_target_rate"), opts["n_boot"]),
                    fd_matched_after_mean_ci=mean_ci(a("fd_matched"), opts["n_boot"]),
                    fd_target_after_mean=nanmean(a("fd_target")),
                    diversity_target_after_mean=nanmean(a("diversity_target")),
                    reward_after_mean=float(np.mean(a("reward_mean"))),
                    grad_p95_median=float(np.median([r["grad_p95"] for r in rs])),
                    grad_max=float(max(r["grad_max"] for r in rs)),
                    chain_gap_after_mean=nanmean(a("chain_gap")))
    base = [n for n in baselines_of(names)]
    if "shortft" in names and base:
        s["versus_best"] = versus_best({n: s[n]["gain"] for n in names}, "shortft", base, opts["n_boot"])
    return s


if __name__ == "__main__":
    run_main(main)
