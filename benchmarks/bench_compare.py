"""ShortFT against the baselines at equal wall-clock compute, plus ablations and gradient norms.

    python bench_compare.py                 # every method and ablation, 2 seeds, 60 s of training each (CPU: ~20 min)
    python bench_compare.py --quick         # a smoke run: 1 seed, 8 s each, 32 evaluation samples
    python bench_compare.py --seconds=600 --n_eval=2000 --seeds=0,1,2   # on a GPU (one run at a time)
    python bench_compare.py ... --fid_n=10000   # plus Inception FID/KID of 10k samples before and after (GPU)

Needs the trained stages in --out_dir (ddpm, shortcut, classifier/evaluator: `python train_toy.py`).
Every run fine-tunes the same base model with the same reward for the same training seconds
(`--ft_seconds`), in its own folder <out_dir>/compare/seed<S>/<name>/<method>, and is scored on DDIM-50
samples of its fine-tuned model from the same fixed noise. Writes <out_dir>/compare/results.md
and reward_vs_time.png.

Equal compute on a CPU (*choice*): `--jobs=0` (auto) runs two fine-tuning processes side by side with one
thread each (`--threads`), so every method gets the same one core for the same seconds. The k = 2
and k = 8 ablations need shortcuts with other segment edges: they are distilled once, starting from
the k = 4 shortcut (`--shortcut_init`), for `--k_shortcut_steps` steps, under <out_dir>/compare/k<k>/.
"""
import json
import os
import re
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python benchmarks/<name>.py` from anywhere: the project's modules live at ROOT

import ddpm
import train_shortft
from rewards import build_reward
from sftlib import config
from sftlib.common import UserError, load_checkpoint, pick_device, plot_lines, run_main
from sftlib.models import build_finetuned, load_shortcut
from shortft import full_chain, shortft_chain

DEFAULTS = dict(out_dir="out", seconds=60.0, seeds="0,1", n_eval=128, quick=False, device="auto", jobs=0,
                threads=1, methods="shortft,draft,draft_lv,alignprop,drtune,shortft_naive,full,full_ckpt,shortft_no_tlora,"
                "shortft_no_ptrain,shortft_k2,shortft_k8", k_shortcut_steps=60, grad_norms=True, child_mem="",
                fid_n=0)  # > 0: also Inception FID/KID of that many DDIM-50 samples per run (~0.4 s/image on a CPU)
# name -> the train_toy.py overrides that make it
RUNS = {"shortft": [], "draft": ["--method=draft"], "draft_lv": ["--method=draft_lv"],
        "alignprop": ["--method=alignprop"], "drtune": ["--method=drtune"], "shortft_naive": ["--method=shortft_naive"],
        "full": ["--method=full"],
        "full_ckpt": ["--method=full", "--full_checkpoint"],
        "shortft_no_tlora": ["--tlora=false"], "shortft_no_ptrain": ["--progressive=false"],
        "shortft_k2": [], "shortft_k8": []}  # ShortFT on a shortcut of k = 2 / 8 segments (k_of)


def k_of(name):
    """The number of segments of a run's shortcut: 4 (the stage's own), or the _k<k> suffix."""
    m = re.search(r"_k(\d+)$", name)
    return int(m.group(1)) if m else None


def method_of(name):
    return next((a.split("=")[1] for a in RUNS[name] if a.startswith("--method=")), "shortft")


def step_memory(name, out_dir, device):
    """Peak memory of one training step (stage 0) in a fresh child process: on CUDA the peak allocated
    above what was allocated before the step; on a CPU the rise of the process's peak RSS in its first
    step with gradients, over its peak after the same chain ran once without them (the warm-up). The
    warm-up must not build a graph: its peak would hide the step's (ru_maxrss never goes down)."""

    cfg = config.resolve([f"--out_dir={out_dir}", *RUNS[name]], torch.cuda.is_available())
    k = k_of(name)
    shortcut = os.path.join(out_dir, "compare", f"k{k}", "shortcut") if k else os.path.join(out_dir, "shortcut")
    student, _, _, edges = load_shortcut(os.path.join(shortcut, "ckpt.pt"), device)
    reward = build_reward(cfg["reward"], out_dir, device)
    ft, sched = build_finetuned(cfg, os.path.join(out_dir, "ddpm", "ckpt.pt"), edges, device)
    ft.unet.eval()
    x_T = torch.randn(cfg["ft_batch"], 3, 32, 32, device=device)
    with torch.no_grad():  # warm-up: the same forward calls (buffers, kernels), but no graph kept
        reward(train_shortft.method_chain(cfg, ft, student, sched, x_T, 0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reward(train_shortft.method_chain(cfg, ft, student, sched, x_T, 0)).mean().backward()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - base) / 2**20


def grad_norm_vs_chain(out_dir, device, n=8):
    """|d reward / d LoRA| at the start of fine-tuning: full backprop through DDIM-10/20/50 vs ShortFT."""

    cfg = config.resolve([f"--out_dir={out_dir}", "--lora_rank=4"], torch.cuda.is_available())
    student, _, _, edges = load_shortcut(os.path.join(out_dir, "shortcut", "ckpt.pt"), device)
    reward = build_reward(cfg["reward"], out_dir, device)
    cfg["method"] = "full"  # one plain LoRA, so every chain differentiates the same parameters
    ft, sched = build_finetuned(cfg, os.path.join(out_dir, "ddpm", "ckpt.pt"), edges, device)
    ft.unet.eval()
    for p in ft.unet.parameters():  # a small random B so that d/dB is not a degenerate zero-LoRA case
        if p.requires_grad and p.dim() >= 2 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=1e-3)
    params = [p for p in ft.unet.parameters() if p.requires_grad]
    x_T = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    chains = [(f"full backprop, DDIM-{s}", lambda s=s: full_chain(ft, sched, x_T, ddpm.ddim_timesteps(sched.T, s)))
              for s in (10, 20, 50)]
    chains.append(("ShortFT chain (stage 0)", lambda: shortft_chain(ft, student, sched, x_T, ft.groups, 0)))
    for name, chain in chains:
        ft.unet.zero_grad(set_to_none=True)
        reward(chain()).mean().backward()
        rows.append((name, float(torch.cat([p.grad.flatten() for p in params]).norm())))
    return rows


@torch.no_grad()  # a measurement of the forward chain only
def chain_fidelity(out_dir, device, n=64):
    """How close the ShortFT chain's x_0 is to the real DDIM-50 x_0 of the untuned base model from the
    same x_T (mean squared error per pixel), next to the same chain with the teacher's own one-jump
    DDIM in place of the shortcut, and to the distance between samples of different noise."""

    cfg = config.resolve([f"--out_dir={out_dir}"], torch.cuda.is_available())
    student, _, _, edges = load_shortcut(os.path.join(out_dir, "shortcut", "ckpt.pt"), device)
    ft, sched = build_finetuned(cfg, os.path.join(out_dir, "ddpm", "ckpt.pt"), edges, device)
    x_T = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    real = ddpm.ddim_sample(ft, sched, x_T, ddpm.ddim_timesteps(sched.T, 50))  # (n, 3, 32, 32)
    mse = lambda a: float((a - real).pow(2).mean())
    return [("ShortFT chain (distilled shortcut)", mse(shortft_chain(ft, student, sched, x_T, ft.groups))),
            ("same chain, naive jump (the base model's one DDIM step)", mse(shortft_chain(ft, ft.unet, sched, x_T, ft.groups))),
            ("DDIM-50 samples of other noise (scale)", mse(real.roll(1, 0)))]


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
          f"--shortcut_steps={opts['k_shortcut_steps']}", f"--data_root={data_root}",
          f"--shortcut_init={os.path.join(base, 'shortcut', 'ckpt.pt')}", f"--device={device.type}",
          "--sample_every=1000000", "--resume"], f"distilling the k = {k} shortcut")
    return os.path.join(out, "shortcut")


def run(name, seed, opts, device):
    """One fine-tuning run in its own out_dir, <out_dir>/compare/seed<S>/<name>, whose stage folders
    link to the shared trained ones: runs that train the same method never share a folder."""
    base = os.path.abspath(opts["out_dir"])
    k = k_of(name)
    out = os.path.join(base, "compare", f"seed{seed}", name)
    os.makedirs(out, exist_ok=True)
    for stage in ("ddpm", "shortcut", "classifier", "evaluator"):  # the shared, already trained stages
        if not os.path.exists(os.path.join(base, stage, "ckpt.pt")):
            raise UserError(f"{base}/{stage}/ckpt.pt is missing: run `python train_toy.py` first")
        src = os.path.join(base, "compare", f"k{k}", stage) if stage == "shortcut" and k else os.path.join(base, stage)
        if not os.path.exists(os.path.join(out, stage)):
            os.symlink(src, os.path.join(out, stage))
    run_dir = os.path.join(out, method_of(name))  # where train_shortft writes: <out>/<method>
    args = [f"--out_dir={out}", "--stages=shortft", f"--seed={seed}", f"--ft_seconds={opts['seconds']}",
            f"--n_eval={opts['n_eval']}", f"--device={device.type}", "--ft_ckpt_every=1000000", *RUNS[name]]
    if opts["fid_n"] > 0:
        args.append(f"--fid_n={opts['fid_n']}")
    if not os.path.isfile(os.path.join(run_dir, "metrics.json")):
        print(f"[compare] {name}, seed {seed}: {opts['seconds']:.0f} s of training", flush=True)
        if os.path.isdir(run_dir):  # a killed run: start it over (a time budget cannot be resumed fairly)
            for f in os.listdir(run_dir):
                os.remove(os.path.join(run_dir, f))
        call([os.path.join(ROOT, "train_toy.py"), *args], f"{name}, seed {seed}", env=child_env(opts))
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    with open(os.path.join(run_dir, "log.csv")) as f:
        rows = np.loadtxt(f, delimiter=",", skiprows=1, ndmin=2)  # step, stage, reward, grad_norm, ms
    return m, rows


def main(argv):
    given = config.parse_overrides(argv, DEFAULTS)
    quick = dict(seconds=8.0, seeds="0", n_eval=32, k_shortcut_steps=4) if given.get("quick") else {}
    opts = {**DEFAULTS, **quick, **given}  # --quick's smaller sizes, unless given explicitly
    device = pick_device(opts["device"])
    if opts["child_mem"]:
        print(json.dumps(step_memory(opts["child_mem"], opts["out_dir"], device)))
        return
    names = opts["methods"].split(",")
    bad = [n for n in names if n not in RUNS]
    if bad:
        raise UserError(f"unknown method {bad[0]!r}: choose from {', '.join(RUNS)}")
    try:
        seeds = [int(s) for s in opts["seeds"].split(",")]
    except ValueError:
        raise UserError(f"--seeds must be a comma list of integers, e.g. 0,1,2; got {opts['seeds']!r}") from None
    if not seeds or min(seeds) < 0:
        raise UserError(f"--seeds must be non-negative integers, got {opts['seeds']!r}")
    if opts["jobs"] == 0:  # auto: two one-thread runs side by side on a CPU, one run at a time on a GPU
        opts["jobs"] = 2 if device.type == "cpu" else 1
    if opts["jobs"] < 1 or opts["threads"] < 1:
        raise UserError("--jobs and --threads must be at least 1 (--jobs=0: 2 on a CPU, 1 on a GPU)")
    for k in sorted({k_of(n) for n in names if k_of(n)}):  # the k-ablation shortcuts first (all cores)
        shortcut_for_k(k, opts, device)
    if opts["fid_n"] > 0:  # fail early without the Inception weights; the test split's statistics once for all runs
        from sftlib import fid, metrics
        try:
            fid.load_inception(device)
            metrics.fid_reference(opts["out_dir"], device)
        except fid.FIDError as e:
            raise UserError(str(e)) from None
    # the runs are independent: --jobs of them at a time, each on --threads threads
    with ThreadPoolExecutor(opts["jobs"]) as pool:
        futures = {(n, s): pool.submit(run, n, s, opts, device) for n in names for s in seeds}
        results = {n: [futures[n, s].result() for s in seeds] for n in names}
    lines = [f"Equal compute: {opts['seconds']:.0f} s of fine-tuning per run on {device} ({opts['jobs']} runs at a "
             f"time, {opts['threads']} thread(s) each), seeds {seeds}, scored on {opts['n_eval']} DDIM-50 samples of "
             f"the fine-tuned base model (medians over seeds; gain = after - before, per seed in brackets).", "",
             "| method | steps | ms/step | step peak MiB | grad norm (median) | held-out target rate before → after "
             "| gain | held-out log p(target) after | reward after | Fréchet dist. before → after | diversity |"
             + (f" Inception FID ({opts['fid_n']}) before → after | KID after |" if opts["fid_n"] > 0 else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if opts["fid_n"] > 0 else "")]
    def child_mem(n):  # one training step's peak memory, measured in a fresh process per method
        p = subprocess.run([sys.executable, __file__, f"--child_mem={n}", f"--out_dir={opts['out_dir']}",
                            f"--device={device.type}"], capture_output=True, text=True, cwd=ROOT,
                           env=child_env(opts))
        return float(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else float("nan")

    with ThreadPoolExecutor(opts["jobs"] if device.type == "cpu" else 1) as pool:  # one GPU: one at a time
        mems = dict(zip(results, pool.map(child_mem, results)))
    gains = {}
    for n, runs in results.items():
        med = lambda f: float(np.median([f(m, r) for m, r in runs]))
        mem = mems[n]
        b, a = runs[0][0]["before"], lambda m: m["after"]
        gains[n] = med(lambda m, r: a(m)["evaluator_target_rate"] - b["evaluator_target_rate"])
        per_seed = " ".join(f"{m['after']['evaluator_target_rate'] - b['evaluator_target_rate']:+.3f}" for m, _ in runs)
        lines.append(f"| {n} | {med(lambda m, r: m['steps']):.0f} | {med(lambda m, r: m['ms_per_step_median']):.0f} "
                     f"| {mem:.0f} | {med(lambda m, r: np.median(r[:, 3])):.3g} "
                     f"| {b['evaluator_target_rate']:.3f} → {med(lambda m, r: a(m)['evaluator_target_rate']):.3f} "
                     f"| {gains[n]:+.3f} ({per_seed}) "
                     f"| {b['evaluator_mean_logp_target']:.2f} → "
                     f"{med(lambda m, r: a(m)['evaluator_mean_logp_target']):.2f} | {med(lambda m, r: a(m)['reward_mean']):.3f} "
                     f"| {b['fd']:.2f} → {med(lambda m, r: a(m)['fd']):.2f} "
                     f"| {b.get('diversity', float('nan')):.2f} → {med(lambda m, r: a(m).get('diversity', float('nan'))):.2f} |"
                     + (f" {b['fid']:.2f} → {med(lambda m, r: a(m)['fid']):.2f} | {med(lambda m, r: a(m)['kid']):.4f} |"
                        if opts["fid_n"] > 0 else ""))
    baselines = [n for n in gains if method_of(n) != "shortft"]
    if "shortft" in gains and baselines:
        best = max(baselines, key=gains.get)
        lines += ["", f"ShortFT's gain / the best baseline's ({best}): {gains['shortft']:+.3f} / {gains[best]:+.3f}"
                  + (f" = {gains['shortft'] / gains[best]:.2f}x" if gains[best] > 0 else "")]
    if opts["grad_norms"]:
        lines += ["", "Gradient norm of the reward w.r.t. the LoRA at initialisation (8 samples):", "",
                  "| chain | grad norm |", "|---|---|"]
        lines += [f"| {name} | {g:.4g} |" for name, g in grad_norm_vs_chain(opts["out_dir"], device)]
    lines += ["", "Fidelity of the short chain: MSE to the untuned base model's DDIM-50 x_0 from the same x_T "
              "(64 samples):", "", "| chain | MSE |", "|---|---|"]
    lines += [f"| {name} | {v:.4f} |" for name, v in chain_fidelity(opts["out_dir"], device)]
    report = "\n".join(lines)
    print(report)
    path = os.path.join(opts["out_dir"], "compare", "results.md")
    with open(path, "w") as f:
        f.write(report + "\n")
    plot(results, os.path.join(opts["out_dir"], "compare", "reward_vs_time.png"))
    print(f"\nwritten: {path}")


def plot(results, path):
    """Batch reward against training seconds, one line per run (its first seed)."""
    plot_lines({n: (np.cumsum(runs[0][1][:, 4]) / 1000, runs[0][1][:, 2]) for n, runs in results.items()}, path,
               "training seconds", "batch reward", smooth=10)


if __name__ == "__main__":
    run_main(main)
