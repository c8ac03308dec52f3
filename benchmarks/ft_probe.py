"""One fine-tuning run with the comparison's measurements around it: the shortft stage's own loop
(train_shortft.train) with a probe that sets a budget in training seconds (equal compute across methods),
scores the fine-tuned model along training, measures the chain gap and the peak memory, and caches the
base model's scores (the same for every method and seed).

    python benchmarks/ft_probe.py --out_dir=RUN --method=draft --ft_seconds=25 --ft_eval_every_s=5

Takes every key of `python train_toy.py --help` (the stage's config) and the three below. Writes what the
stage writes in <out_dir>/<method>/, and in addition eval.csv (held-out scores at the start, along
training and at the end) and, in metrics.json, `curve`, `chain_gap` (before/after) and `peak_memory_mib`.
benchmarks/bench_compare.py runs one of these per method, lr and seed.
"""
import hashlib
import json
import os
import resource
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python benchmarks/ft_probe.py` from anywhere: the project's modules live at ROOT

import train_shortft  # noqa: E402
from shortft import merge_for_sampling, shortft_chain  # noqa: E402
from sftlib import config  # noqa: E402
from sftlib.common import UserError, adam, atomic_path, pick_device, run_main, seed_all, write_text  # noqa: E402
from sftlib.fid import to_uint8  # noqa: E402
from sftlib.stage import lock_folder  # noqa: E402
from sftlib.metrics import ddim50, evaluate_model  # noqa: E402
from baselines import SHORT_CHAIN  # noqa: E402
from sftlib.models import build_finetuned, load_naive_shortcut, load_reward, load_shortcut  # noqa: E402
from sftlib.readers import NUMBER, read_json  # noqa: E402

PROBE_DEFAULTS = dict(
    ft_seconds=0.0,  # > 0: a budget of training seconds instead of ft_steps (equal compute across methods)
    ft_eval_every=0,  # > 0: also score DDIM-50 samples every this many steps (eval.csv: the reward/quality curve)
    ft_eval_every_s=0.0,  # > 0: ... or every this many training seconds (curves of equal-time runs share their x)
)
N_GAP = 16  # samples behind chain_gap
BEFORE_SCHEMA = {"n_samples": int, "fd": NUMBER, "diversity": NUMBER}  # what a cached score of the base must hold


@torch.no_grad()  # a measurement, no training
def chain_gap(cfg, ft, student, sched, x_T, x0_real, phase):
    """What P-Training exists to shrink: the mean squared distance between the training chain's x_0
    (ShortFT's short chain at `phase`, the fine-tuned base inside it) and the fine-tuned base model's
    real DDIM-50 x_0 from the same noise x_T. NaN for the long-chain baselines (their chain is the real one)."""
    if cfg["method"] not in SHORT_CHAIN:
        return float("nan")
    x0 = shortft_chain(ft, student, sched, x_T, ft.groups, phase, perfect=cfg["method"] == "shortft_perfect")
    return float((x0 - x0_real).pow(2).mean())


def step_memory(run_args, shortcut_dir, out_dir, device):
    """Peak memory of one training step (phase 0) of the run `run_args` (train_toy.py flags) in a fresh
    process: on CUDA the peak allocated above what was allocated before the step; on a CPU the rise of
    the process's peak RSS in its first step with gradients, over its peak after the same chain ran once
    without them (the warm-up). The warm-up must not build a graph: its peak would hide the step's
    (ru_maxrss never goes down)."""
    cfg = config.resolve([f"--out_dir={out_dir}", "--preset=cpu", *run_args], torch.cuda.is_available())
    student, _, _, edges = load_shortcut(os.path.join(shortcut_dir, "ckpt.pt"), device)
    if cfg["method"] in ("shortft_naive", "shortft_perfect"):  # the controls: the frozen base makes the jump
        student = load_naive_shortcut(os.path.join(out_dir, "ddpm", "ckpt.pt"), device)
    reward = load_reward(cfg["reward"], out_dir, device)
    ft, sched = build_finetuned(cfg, os.path.join(out_dir, "ddpm", "ckpt.pt"), edges, device)
    ft.unet.eval()
    x_T = torch.randn(cfg["ft_batch"], 3, 32, 32, device=device)
    with torch.no_grad():  # warm-up: the same forward calls (buffers, kernels), but no graph kept
        reward(train_shortft.training_chain(cfg, ft, student, sched, x_T, 0))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reward(train_shortft.training_chain(cfg, ft, student, sched, x_T, 0)).mean().backward()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - base) / 2**20


def step_ms(run_args, shortcut_dir, out_dir, device, n=4):
    """The median time (ms) of one training step of the run `run_args` (train_toy.py flags): the chain, the
    reward, backward and the Adam step, timed n times after one warm-up step. On a CPU the process's own CPU
    time (time.process_time: with one thread, the compute the step took, whatever else shares the cores), on
    a GPU the wall time after a synchronize. The comparison's budgets in optimizer steps come from it
    (bench_compare.calibrate), so that a run's share of a busy machine does not decide how far it trains."""
    import time

    clock = time.perf_counter if device.type == "cuda" else time.process_time

    cfg = config.resolve([f"--out_dir={out_dir}", "--preset=cpu", *run_args], torch.cuda.is_available())
    student, _, _, edges = load_shortcut(os.path.join(shortcut_dir, "ckpt.pt"), device)
    if cfg["method"] in ("shortft_naive", "shortft_perfect"):
        student = load_naive_shortcut(os.path.join(out_dir, "ddpm", "ckpt.pt"), device)
    reward = load_reward(cfg["reward"], out_dir, device)
    ft, sched = build_finetuned(cfg, os.path.join(out_dir, "ddpm", "ckpt.pt"), edges, device)
    ft.unet.eval()
    params = [p for p in ft.unet.parameters() if p.requires_grad]
    opt = adam(params, cfg["ft_lr"])  # the fine-tuning stage's own optimizer (fused where it can be)
    times = []
    for i in range(n + 1):
        t0 = clock()
        x_T = torch.randn(cfg["ft_batch"], 3, 32, 32, device=device)
        opt.zero_grad(set_to_none=True)
        (-reward(train_shortft.training_chain(cfg, ft, student, sched, x_T, 0)).mean()).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((clock() - t0) * 1000)
    return sorted(times[1:])[n // 2]


@torch.no_grad()  # a measurement of the forward chain only
def chain_fidelity(out_dir, device, n=64):
    """How close the ShortFT chain's x_0 is to the real DDIM-50 x_0 of the untuned base model from the
    same x_T (mean squared error per pixel), next to the same chain with the teacher's own one-jump
    DDIM in place of the shortcut, and to the distance between samples of different noise."""
    cfg = config.resolve([f"--out_dir={out_dir}", "--preset=cpu"], torch.cuda.is_available())
    student, _, _, edges = load_shortcut(os.path.join(out_dir, "shortcut", "ckpt.pt"), device)
    ft, sched = build_finetuned(cfg, os.path.join(out_dir, "ddpm", "ckpt.pt"), edges, device)
    x_T = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    real = ddim50(ft, sched, x_T)  # (n, 3, 32, 32)
    mse = lambda a: float((a - real).pow(2).mean())  # noqa: E731
    return [("ShortFT chain (distilled shortcut)", mse(shortft_chain(ft, student, sched, x_T, ft.groups))),
            ("same chain, naive jump (the base model's one DDIM step)", mse(shortft_chain(ft, ft.unet, sched, x_T, ft.groups))),
            ("DDIM-50 samples of other noise (scale)", mse(real.roll(1, 0)))]


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (Linux: KiB)


# the held-out scores each point of eval.csv keeps (NaN when a run folder lacks the judge stage)
POINT_KEYS = dict(reward="reward_mean", target_rate="evaluator_target_rate", fd="fd", diversity="diversity",
                  fd_matched="fd_matched", fd_target="fd_target", diversity_target="diversity_target",
                  judge_target_rate="judge_target_rate", judge_fd="judge_fd", judge_diversity="judge_diversity",
                  judge_fd_target="judge_fd_target", chain_gap="chain_gap")


def point(step, train_s, m):
    """One row of eval.csv: where the run is, and the held-out scores of its DDIM-50 samples there."""
    return dict(step=step, train_s=train_s, **{k: float(m.get(src, float("nan"))) for k, src in POINT_KEYS.items()})


class Probe:
    """The hooks train_shortft.train calls: before (the base's scores), budget, during (every step),
    finish (after the stage's own report); state/load carry the curve through a resume."""

    def __init__(self, cfg, opts, device):
        self.cfg, self.opts, self.device, self.curve = cfg, opts, device, []

    def budget(self, step, train_s):
        """The fraction of the budget used: training seconds with --ft_seconds, else optimizer steps."""
        if self.opts["ft_seconds"] > 0:
            return train_s / self.opts["ft_seconds"]
        return step / self.cfg["ft_steps"]

    def total_steps(self):
        """The progress bar's end: none is known under a budget of seconds."""
        return None if self.opts["ft_seconds"] > 0 else self.cfg["ft_steps"]

    def before(self, ft, student, sched, x_eval, base_path):
        """The base model's held-out scores (the LoRA starts at zero, so ft is the base), cached beside the
        base checkpoint while its inputs stay the same; plus the chain gap at the start."""
        cfg = self.cfg
        judges = [os.path.join(cfg["out_dir"], k, "ckpt.pt") for k in ("evaluator", "judge")]
        stamp = [cfg["reward"], cfg["n_eval"], os.path.getmtime(base_path)] + [os.path.getmtime(p) for p in judges
                                                                                if os.path.isfile(p)]
        if cfg["fid_n"] > 0:  # scores with Inception FID: a cache of their own
            stamp += [cfg["fid_n"], cfg["fid_ref_n"]]
        cache = os.path.join(os.path.dirname(base_path), "before_" + hashlib.sha1(str(stamp).encode()).hexdigest()[:10] + ".json")
        before = None
        if os.path.isfile(cache):
            try:
                before = read_json(cache, BEFORE_SCHEMA, "score cache")
            except UserError as e:  # a torn or wrong cache: say so, and score again
                print(f"[probe] {e}: scoring again")
        if not isinstance(before, dict):
            print(f"[probe] scoring the base model: DDIM-50 samples of {cfg['n_eval']} fixed noises")
            before = evaluate_model(ft, sched, x_eval, cfg, self.device, cfg["fid_n"])[0]
            write_text(cache, json.dumps(before))
        before["chain_gap"] = chain_gap(cfg, ft, student, sched, x_eval[:N_GAP],
                                        ddim50(ft, sched, x_eval[:N_GAP], cfg["sample_batch"]), 0)
        return before

    def during(self, step, train_s, ft, student, sched, x_eval, phase, say):
        """Score the fine-tuned model every --ft_eval_every steps or --ft_eval_every_s training seconds."""
        o = self.opts
        due = (o["ft_eval_every"] > 0 and step % o["ft_eval_every"] == 0) or \
            (o["ft_eval_every_s"] > 0 and train_s >= (len(self.curve) + 1) * o["ft_eval_every_s"])
        if due and self.budget(step, train_s) < 1:
            m, x0 = evaluate_model(merge_for_sampling(ft), sched, x_eval, self.cfg, self.device)
            m["chain_gap"] = chain_gap(self.cfg, ft, student, sched, x_eval[:N_GAP], x0[:N_GAP], phase)
            self.curve.append(point(step, train_s, m))
            say(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in self.curve[-1].items()
                                              if k not in ("step", "train_s")))

    def finish(self, ft, student, sched, x_eval, x_after, before, after, history, out):
        """eval.csv, and the probe's entries of metrics.json."""
        phase = history[-1]["phase"] if history else 0
        after["chain_gap"] = chain_gap(self.cfg, ft, student, sched, x_eval[:N_GAP], x_after[:N_GAP], phase)
        train_s = sum(h["ms"] for h in history) / 1000
        curve = [point(0, 0.0, before)] + self.curve + [point(len(history), train_s, after)]
        with atomic_path(os.path.join(out, "samples_after.npz")) as tmp:  # the scored samples, for grids and Inception
            with open(tmp, "wb") as f:
                np.savez(f, x=to_uint8(x_after))
        write_text(os.path.join(out, "eval.csv"), ",".join(curve[0]) + "\n" + "".join(
            ",".join(f"{v:.5g}" for v in c.values()) + "\n" for c in curve))
        return dict(curve=curve, peak_memory_mib=peak_memory_mib(self.device))

    def state(self):
        return dict(curve=self.curve, opts=self.opts)

    def load(self, state):
        """Go on from a checkpoint's probe state: the same budget and cadence, or a one-line error."""
        if state.get("opts", self.opts) != self.opts:
            raise UserError(f"this run was measured with {state['opts']}, not {self.opts}: pass the same probe "
                            f"options to --resume it, or use another --out_dir")
        self.curve = list(state.get("curve", []))


def main(argv):
    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\nProbe options:\n" + "\n".join(f"  --{k} (default: {v!r})" for k, v in PROBE_DEFAULTS.items())
              + "\n\nStage options: every key of python train_toy.py --help")
        return
    ns, rest = config.parser(PROBE_DEFAULTS, prog="ft_probe.py", source=__file__).parse_known_args(list(argv))
    opts = dict(PROBE_DEFAULTS, **vars(ns))  # --key=value and --key value alike; the rest is the stage's config
    for key, value in opts.items():
        if not 0 <= value < float("inf"):
            raise UserError(f"--{key} must be a finite number >= 0, got {value}")
    cfg = config.resolve(rest, torch.cuda.is_available(), description=__doc__)
    lock_folder(cfg["out_dir"])  # one run per output folder
    if cfg["pretrained"]:  # the shipped classroom checkpoints as this run's complete upstream stages
        from sftlib import pretrained

        pretrained.install(cfg)
    seed_all(cfg["seed"])
    device = pick_device(cfg["device"])
    train_shortft.train(cfg, device, probe=Probe(cfg, opts, device))


if __name__ == "__main__":
    run_main(main)
