"""ShortFT against the baselines at equal compute, compared along reward-quality frontiers.

    python benchmarks/bench_compare.py --out_dir=DIR          # ship reward, 5 arms x 3 lrs x 3 seeds (51 min, 2 cores)
    python benchmarks/bench_compare.py --out_dir=DIR --rewards=brightness --methods=shortft,shortft_naive,draft
    python benchmarks/bench_compare.py --out_dir=DIR --methods=shortft,shortft_tlora,shortft_tlora_ptrain   # ablations
    python benchmarks/bench_compare.py --out_dir=DIR --quick  # a smoke run: 2 methods, 2 lrs, 2 seeds, one reward
    python benchmarks/bench_compare.py --out_dir=DIR --report_only   # the report of the runs already done

Needs the trained stages in DIR (ddpm, shortcut, classifier, evaluator and the judge: `python train_toy.py
--stages=ddpm,shortcut,classifier --out_dir=DIR`). Every run fine-tunes the same base with one reward for the
same compute: `--seconds` of its arm's step time, measured first for every arm alone (calibrate), as a number
of optimizer steps. Each run has its own folder DIR/compare/<reward>/seed<S>/<arm>_lr<lr>/ and is scored every
`--eval_every_s` of those seconds on DDIM-50 samples of the fine-tuned model from the same fixed noise
(benchmarks/ft_probe.py; the seed changes the training noise and the LoRA initialisation).

The protocol (*choices*, the same for every arm):
  1. Two axes, both held out: the value (the judge's target-class rate for a classifier reward, the samples'
     mean brightness for `brightness`) and the quality cost (the judge's Fréchet distance to the real test
     split, as a rise over the base's), in the features of the judge, a third network that never served as
     a reward or for tuning (sftlib/judge.py). The evaluator's scores are kept as secondary columns.
  2. Frontiers, not one lr per method: every arm runs at every lr of --lrs (at most 2x apart) on every seed;
     its frontier is the best value any of its runs reached at a cost <= c (benchmarks/frontier.py). The
     headline reads every arm at the same costs (--cost_levels, as fractions of the base's judge FD), mean
     over seeds with bootstrap 95 % intervals; an arm whose runs never reach a cost is *unbracketed* there.
  3. Arms at parity: ShortFT trains one LoRA like every baseline; T-LoRA and P-Training are ablations on top
     (shortft_tlora, shortft_tlora_ptrain). Controls: the naive jump (shortft_naive) and the perfect shortcut
     (shortft_perfect: the frozen base's real DDIM steps in place of each jump, checkpointed).
  4. Equal compute, in optimizer steps: each arm's step is timed alone (one thread on a CPU), and its budget is
     --seconds of that time, so a run that shares the machine trains as far as one that does not. `--jobs=0`
     (auto) runs two one-thread processes side by side on a CPU, --gpu_jobs on a GPU. P-Training's phases
     split these steps equally.

Writes DIR/compare/results.md (the matched-cost, equal-lr and ablation tables), results.json (every run's
curve), frontier_<reward>.png and grid_<reward>.png (8 samples per arm from the same noise, each arm's
first-seed run nearest the middle cost level).
"""
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python benchmarks/<name>.py` from anywhere: the project's modules live at ROOT
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # and its siblings, also when imported as benchmarks.bench_compare

from sftlib import config  # noqa: E402
from sftlib.common import UserError, load_checkpoint, pick_device, run_main, write_text  # noqa: E402
from sftlib.readers import read_json  # noqa: E402
from frontier import check_grid  # noqa: E402
from frontier_report import figures, inception_rows, render, summarise  # noqa: E402
from ft_probe import chain_fidelity, step_memory, step_ms  # noqa: E402

SINGLE = ["--tlora=false", "--progressive=false"]  # one plain LoRA, no phases: the baselines' parameters
# arm -> the train_toy.py overrides that make it
RUNS = {"shortft": SINGLE, "shortft_tlora": ["--progressive=false"], "shortft_tlora_ptrain": [],
        "shortft_naive": ["--method=shortft_naive", *SINGLE], "shortft_perfect": ["--method=shortft_perfect", *SINGLE],
        "draft": ["--method=draft"], "draft_lv": ["--method=draft_lv"], "alignprop": ["--method=alignprop"],
        "drtune": ["--method=drtune"], "full": ["--method=full", "--full_checkpoint"],
        "draft10": ["--method=draft", "--draft_k=10"],  # DRaFT-K deeper: does truncation's depth change the frontier?
        "shortft_k2": SINGLE, "shortft_k8": SINGLE}  # ShortFT on a shortcut of k = 2 / 8 segments (k_of)
MAIN = "shortft,shortft_naive,shortft_perfect,draft,drtune"  # + draft_lv,alignprop in the GPU run (gpu_jobs.py)
DEFAULTS = dict(out_dir="out", rewards="classifier:ship", methods=MAIN,  # the default: 45 runs, 51 min on 2 shared cores
                ablations="",  # arms run on the first reward only, e.g. shortft_tlora,shortft_tlora_ptrain
                other_methods="shortft,shortft_naive,draft",  # the arms of the rewards after the first
                lrs="1e-3,2e-3,4e-3",  # at most 2x apart; its ends are checked by bracketing, not assumed
                seeds="0,1,2", seconds=20.0, eval_every_s=10.0, n_eval=48,
                cost_levels="0.25,0.5,1.0",  # where the frontiers are read: judge FD rise / the base's judge FD
                ft_batch=8, quick=False, device="auto", jobs=0, gpu_jobs=1, threads=1, k_shortcut_steps=60,
                child_mem="", child_ms="", n_boot=2000,
                inception=True,  # Inception FID/KID (and within the target class) of each grid run's samples, at the end
                report_only=False,  # no new runs: the report from the runs already done (a killed benchmark's)
                child_args="")  # more train_toy.py flags for every fine-tuning run
QUICK = dict(rewards="classifier:ship", methods="shortft,draft", ablations="", other_methods="", lrs="1e-3,4e-3", seeds="0,1",
             seconds=4.0, eval_every_s=2.0, n_eval=16, k_shortcut_steps=4, inception=False)


def k_of(name):
    """The number of segments of a run's shortcut: 4 (the stage's own), or the _k<k> suffix."""
    m = re.search(r"_k(\d+)$", name)
    return int(m.group(1)) if m else None


def method_of(name):
    return next((a.split("=")[1] for a in RUNS[name] if a.startswith("--method=")), "shortft")


def reward_tag(spec):
    return re.sub(r"[^A-Za-z0-9.]+", "-", spec).strip("-")


def child_env(opts):
    """The environment of a fine-tuning child: --threads CPU threads (one per job on 2 cores)."""
    return dict(os.environ, OMP_NUM_THREADS=str(opts["threads"]), MKL_NUM_THREADS=str(opts["threads"]))


def call(args, what, env=None):
    """Run `python ARGS` from here, quietly; a failure becomes one UserError line (its last stderr line)."""
    p = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, env=env)
    if p.returncode != 0:
        raise UserError(f"{what} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")


STAGES = ("ddpm", "shortcut", "classifier", "evaluator", "judge")  # the shared, already trained stages


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
    call([os.path.join(ROOT, "train_toy.py"), "--stages=shortcut", f"--out_dir={out}", f"--k_segments={k}",
          f"--shortcut_steps={opts['k_shortcut_steps']}", f"--data_root={data_root}", "--preset=cpu",
          f"--shortcut_init={os.path.join(base, 'shortcut', 'ckpt.pt')}", f"--device={device.type}",
          "--sample_every=1000000", "--resume"], f"distilling the k = {k} shortcut")


def run(name, reward, seed, lr, opts, device):
    """One fine-tuning run in its own out_dir, DIR/compare/<reward>/seed<S>/<name>_lr<lr>, whose stage folders
    link to the shared trained ones. Done runs (same arguments) are read back, not rerun."""
    base = os.path.abspath(opts["out_dir"])
    k = k_of(name)
    out = os.path.join(base, "compare", reward_tag(reward), f"seed{seed}", f"{name}_lr{lr:g}")
    os.makedirs(out, exist_ok=True)
    out = os.path.realpath(out)  # where the run is, also through a linked folder (a report made from another view)
    for stage in STAGES:
        src = os.path.join(base, "compare", f"k{k}", stage) if stage == "shortcut" and k else os.path.join(base, stage)
        if os.path.exists(src) and not os.path.lexists(os.path.join(out, stage)):
            os.symlink(src, os.path.join(out, stage))
    run_dir = os.path.join(out, method_of(name))  # where train_shortft writes: <out>/<method>
    steps = opts["budget"][name]  # equal compute: opts["seconds"] of this arm's calibrated step time (calibrate)
    every = max(1, round(steps * opts["eval_every_s"] / opts["seconds"]))
    args = [f"--out_dir={out}", "--preset=cpu", f"--reward={reward}", f"--seed={seed}", f"--ft_lr={lr:g}",
            f"--ft_steps={steps}", f"--ft_eval_every={every}", f"--n_eval={opts['n_eval']}",
            f"--ft_batch={opts['ft_batch']}", f"--device={device.type}", "--ft_ckpt_every=1000000", "--grid_ft=8",
            "--sample_batch=64", *RUNS[name], *opts["child_args"].split()]
    stamp = os.path.join(out, "args.json")  # a finished run is reused only if it ran with these arguments
    same = False
    if os.path.isfile(stamp):
        same = read_json(stamp, None, "arguments stamp") == args
    if not (same and os.path.isfile(os.path.join(run_dir, "metrics.json"))):
        if opts["report_only"]:
            return None
        print(f"[compare] {time.strftime('%H:%M:%S')} {reward}: {name}, lr {lr:g}, seed {seed}", flush=True)
        if os.path.isdir(run_dir):  # a killed run: start it over (a time budget cannot be resumed fairly)
            for f in os.listdir(run_dir):
                os.remove(os.path.join(run_dir, f))
        t0 = time.time()
        call([os.path.join(ROOT, "benchmarks", "ft_probe.py"), *args], f"{name}, lr {lr:g}, seed {seed}", env=child_env(opts))
        write_text(os.path.join(out, "wall_s.json"), json.dumps(time.time() - t0))  # the run's wall time, whole process
        write_text(stamp, json.dumps(args))
    m = read_json(os.path.join(run_dir, "metrics.json"), {"steps": int, "ms_per_step_median": (int, float),
                                                          "curve": list}, "metrics")
    wall = os.path.join(out, "wall_s.json")
    wall_s = read_json(wall, None, "wall time") if os.path.isfile(wall) else None
    return dict(name=name, reward=reward, seed=seed, lr=lr, steps=m["steps"], ms=m["ms_per_step_median"],
                curve=m["curve"], dir=os.path.relpath(run_dir, base), wall_s=wall_s)


def calibrate(arms, opts, device):
    """Each arm's median step time, measured one arm at a time in a fresh one-thread process (ft_probe.step_ms),
    and its budget in optimizer steps: --seconds of that time (at least 2). The times are kept in
    DIR/compare/budget.json (per batch and device) and reused: a busy machine then slows a run without shortening
    its training, which a budget of wall-clock seconds would do."""
    path = os.path.join(opts["out_dir"], "compare", "budget.json")
    key = dict(ft_batch=opts["ft_batch"], device=device.type)
    ms = {}
    if os.path.isfile(path):
        old = read_json(path, {"ms": dict}, "step times")
        ms = old["ms"] if old.get("key") == key else {}  # arms timed before, at this batch on this device
    missing = [n for n in arms if n not in ms]
    if missing and opts["report_only"]:
        raise UserError(f"--report_only: {path} has no step time of {', '.join(missing)}")
    for n in missing:
        p = subprocess.run([sys.executable, __file__, f"--child_ms={n}", f"--out_dir={opts['out_dir']}",
                            f"--device={device.type}", f"--ft_batch={opts['ft_batch']}"], capture_output=True, text=True,
                           cwd=ROOT, env=child_env(opts))
        if p.returncode != 0:
            raise UserError(f"timing a step of {n} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        ms[n] = float(p.stdout.strip().splitlines()[-1])
        print(f"[compare] {n}: {ms[n]:.0f} ms per step of batch {opts['ft_batch']}", flush=True)
        write_text(path, json.dumps(dict(key=key, ms=ms), indent=1))  # after each arm: a killed benchmark keeps them
    return {n: ms[n] for n in arms}, {n: max(2, round(opts["seconds"] * 1000 / ms[n])) for n in arms}


def floats(opts, key):
    try:
        return [float(s) for s in opts[key].split(",") if s]
    except ValueError:
        raise UserError(f"--{key} must be a comma list of numbers, e.g. 1e-3,2e-3; got {opts[key]!r}") from None


def parse_opts(argv):
    given = config.parse_overrides(argv, DEFAULTS, description=__doc__)
    opts = {**DEFAULTS, **(QUICK if given.get("quick") else {}), **given}  # the mode's sizes, unless given explicitly
    names = [n for n in opts["methods"].split(",") if n]
    ablations = [n for n in opts["ablations"].split(",") if n]
    others = [n for n in opts["other_methods"].split(",") if n]
    for n in names + ablations + others:
        if n not in RUNS:
            raise UserError(f"unknown method {n!r}: choose from {', '.join(RUNS)}")
    try:
        seeds = [int(s) for s in opts["seeds"].split(",")]
    except ValueError:
        raise UserError(f"--seeds must be a comma list of integers, e.g. 0,1,2; got {opts['seeds']!r}") from None
    if min(seeds) < 0:
        raise UserError(f"--seeds must be non-negative, got {opts['seeds']!r}")
    lrs, levels = floats(opts, "lrs"), floats(opts, "cost_levels")
    try:
        check_grid(lrs, seeds)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not levels or any(not (c > 0 and math.isfinite(c)) for c in levels):
        raise UserError(f"--cost_levels must be positive numbers (fractions of the base's judge FD), got {opts['cost_levels']!r}")
    rewards = [r for r in opts["rewards"].split(",") if r]
    if not rewards:
        raise UserError("--rewards needs at least one reward spec, e.g. classifier:ship,brightness")
    for r in rewards:
        config.check({**config.DEFAULTS, "reward": r})  # a malformed spec: one line, before any run
    if not (0 < opts["seconds"] < 1e5 and 0 < opts["eval_every_s"] <= opts["seconds"]):
        raise UserError("--seconds must be in (0, 1e5) and --eval_every_s in (0, --seconds]")
    if opts["n_eval"] < 2 or opts["n_boot"] < 100 or opts["ft_batch"] < 1:
        raise UserError("--n_eval must be >= 2, --n_boot >= 100, --ft_batch >= 1")
    if opts["jobs"] < 0 or opts["gpu_jobs"] < 1 or opts["threads"] < 1:
        raise UserError("--jobs must be >= 0 (0: 2 on a CPU, --gpu_jobs on a GPU), --gpu_jobs and --threads >= 1")
    return opts, names, ablations, others, rewards, seeds, lrs, levels


def main(argv):
    opts, names, ablations, others, rewards, seeds, lrs, levels = parse_opts(argv)
    device = pick_device(opts["device"])
    if opts["child_mem"] or opts["child_ms"]:  # one measurement in this fresh process (child_mems, calibrate)
        n = opts["child_mem"] or opts["child_ms"]
        k = k_of(n)
        shortcut = os.path.join(opts["out_dir"], "compare", f"k{k}", "shortcut") if k else os.path.join(opts["out_dir"], "shortcut")
        if opts["child_ms"]:
            print(json.dumps(step_ms([*RUNS[n], f"--ft_batch={opts['ft_batch']}"], shortcut, opts["out_dir"], device)))
        else:
            print(json.dumps(step_memory(RUNS[n], shortcut, opts["out_dir"], device)))
        return
    for stage in STAGES:
        if not os.path.isfile(os.path.join(opts["out_dir"], stage, "ckpt.pt")):
            raise UserError(f"{opts['out_dir']}/{stage}/ckpt.pt is missing: run `python train_toy.py "
                            f"--stages=ddpm,shortcut,classifier --out_dir={opts['out_dir']}` first")
    if opts["jobs"] == 0:
        opts["jobs"] = 2 if device.type == "cpu" else opts["gpu_jobs"]
    t_start = time.time()
    arms = {r: names + ablations if i == 0 else others for i, r in enumerate(rewards)}  # ablations: the first reward
    for k in sorted({k_of(n) for a in arms.values() for n in a if k_of(n)} if not opts["report_only"] else ()):
        shortcut_for_k(k, opts, device)
    every = list(dict.fromkeys(n for a in arms.values() for n in a))
    opts["step_ms"], opts["budget"] = calibrate(every, opts, device)
    jobs = [(n, r, s, lr) for r in rewards for s in seeds for lr in lrs for n in arms[r]]  # waves mix the arms
    with ThreadPoolExecutor(opts["jobs"]) as pool:
        runs = [x for x in pool.map(lambda j: run(*j, opts, device), jobs) if x is not None]
    if opts["report_only"]:  # a killed benchmark: only the seeds every arm finished at every lr, so curves stay paired
        full = lambda s: all(any(x["name"] == n and x["reward"] == r and x["seed"] == s and x["lr"] == lr for x in runs)
                             for r in rewards for n in arms[r] for lr in lrs)
        seeds = [s for s in seeds if full(s)]
        if len(seeds) < 2:
            raise UserError("--report_only: fewer than 2 seeds have every run finished: no interval yet")
        runs = [x for x in runs if x["seed"] in seeds]
    t_done = time.time()
    mems = child_mems(every, opts, device) if not opts["report_only"] else {n: float("nan") for n in every}
    res = dict(opts=opts, device=str(device), seeds=seeds, lrs=lrs, cost_levels=levels, rewards=rewards, arms=arms,
               runs=runs, step_peak_mib=mems, chain_fidelity=chain_fidelity(opts["out_dir"], device),
               wall_s=dict(runs=t_done - t_start, total=time.time() - t_start))
    res["summary"] = summarise(res)
    folder = os.path.join(opts["out_dir"], "compare")
    figures(res, folder, device)  # and res["grid_runs"]: the run behind each arm's row of the grids
    if opts["inception"]:  # Inception at the end, on the grids' runs (sftlib/fid.py; --inception=false: off)
        t0 = time.time()
        res["inception"] = inception_rows(res, device)
        res["wall_s"]["inception"] = time.time() - t0
    write_text(os.path.join(folder, "results.json"), json.dumps(res, indent=1))
    report = render(res)
    write_text(os.path.join(folder, "results.md"), report + "\n")
    print(report)
    print(f"\nwritten: {folder}/results.md, results.json, frontier_*.png, grid_*.png")


def child_mems(names, opts, device):
    """One training step's peak memory per arm, each in a fresh process, --jobs at a time (a peak RSS and
    CUDA's allocator both count per process)."""
    def one(n):
        p = subprocess.run([sys.executable, __file__, f"--child_mem={n}", f"--out_dir={opts['out_dir']}",
                            f"--device={device.type}"], capture_output=True, text=True, cwd=ROOT, env=child_env(opts))
        return float(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else float("nan")
    with ThreadPoolExecutor(opts["jobs"]) as pool:
        return dict(zip(names, pool.map(one, names)))


if __name__ == "__main__":
    run_main(main)
