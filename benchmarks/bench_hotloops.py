"""The hot loops, counted: aten ops and host syncs per training step of each stage and per DDIM-50 batch,
and the CPU preset's step times, for two source trees side by side (the code before and after a change).

    git worktree add --detach /tmp/before <commit>          # the code before
    python benchmarks/bench_hotloops.py --trees=before=/tmp/before,after=. --out=benchmarks/results/hotloops_cpu

A GPU runs ahead of Python only while Python does not wait for it. These make the host wait, and each is
counted as a sync (TorchDispatchMode sees every aten op a step dispatches, its backward and the
optimizer's included; the counts do not depend on the device, so a CPU counts what a GPU would do):
  aten._local_scalar_dense   .item(), float(t), int(t), bool(t): a device-to-host read
  aten.lift_fresh            torch.tensor / torch.as_tensor of Python data: a host-to-device copy from pageable
                             memory, which waits for the stream
  aten.nonzero               a result whose size is data (boolean indexing, torch.nonzero)
Per step = (counts of a run of b steps - counts of a run of a steps) / (b - a), each run a fresh stage in its
own folder: set-up, the first and last sample grids, the checkpoint and the export cancel, and what remains
is the loop with its log rows at the stage's log_every. The counting runs use the `gpu` preset's UNet layout
(--count_arch; op counts depend on the layout, not on the width or batch, so a narrow one counts fast).
Step times: the same difference of wall-clock times, on the CPU preset's own sizes, the trees alternating,
on one thread (`--threads`).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(ROOT)  # appended: a worker's tree ($PYTHONPATH) comes first

from sftlib.common import run_main  # noqa: E402
SYNC_OPS = ("aten._local_scalar_dense", "aten.lift_fresh", "aten.nonzero")
COUNT_ARCH = "--ch=16 --ch_mult=1,2,2,2 --num_res_blocks=2 --attn_res=16"  # the gpu preset's layout, narrow
TINY_CLS = ["--classifier_width=4", "--evaluator_width=4", "--judge_width=4", "--classifier_steps=2",
            "--evaluator_steps=2", "--judge_steps=2", "--cls_batch=8"]
QUIET = ["--sample_every=100000", "--ddpm_ckpt_every=100000", "--shortcut_ckpt_every=100000", "--ft_ckpt_every=100000",
         "--grid_ddpm=2", "--grid_shortcut=2", "--grid_ft=2", "--n_eval=2", "--sample_batch=2"]


# ------------------------------------------------------------------------------------- the worker (one tree)

OPTIMIZERS = []  # every Adam built while counting (emulate_cuda_defaults)


def emulate_cuda_defaults():
    """Count what CUDA would run. Where the user names no implementation, Adam picks multi-tensor (foreach) kernels
    on CUDA but a per-parameter loop on the CPU; here it takes CUDA's choice. Its step counters stay on the host
    on CUDA (unless fused or capturable), so reading them (bias corrections) is no device sync: `counter` leaves
    those reads out, recognising them through OPTIMIZERS."""
    import torch
    import torch.optim.adam as adam

    adam._default_to_fused_or_foreach = lambda params, differentiable, use_fused=False: (False, not differentiable)
    init = torch.optim.Adam.__init__

    def registered(self, *args, **kwargs):
        init(self, *args, **kwargs)
        OPTIMIZERS.append(self)
    torch.optim.Adam.__init__ = registered


def _host_step_counter(t):
    """Whether t is a step counter of a non-fused Adam (a host tensor on CUDA)."""
    return any(not o.defaults.get("fused") and any(st.get("step") is t for st in o.state.values()) for o in OPTIMIZERS)


def counter():
    """A TorchDispatchMode that counts every aten op by name (a host read of an Adam step counter apart)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name == "aten._local_scalar_dense" and _host_step_counter(args[0]):
                name = "host read of an Adam step counter"
            self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    return Count()


def summary(ops):
    return dict(ops=sum(ops.values()), syncs=sum(ops[k] for k in SYNC_OPS), **{k.split(".")[-1]: ops[k] for k in SYNC_OPS})


def run_stage(argv, count):
    """One in-process `train_toy.py` run: (wall seconds, op Counter or None)."""
    import train_toy

    t0 = time.perf_counter()
    if count:
        with counter() as c:
            train_toy.run_pipeline(argv)
        return time.perf_counter() - t0, c.ops
    train_toy.run_pipeline(argv)
    return time.perf_counter() - t0, None


def per_step(make_argv, a, b, count, work):
    """(seconds per step, per-step op summary) from a run of a steps and one of b steps, each in a fresh copy of
    the upstream folder `work/base` (make_argv(out_dir, steps) -> the command line)."""
    runs = []
    for n in (a, b):
        out = tempfile.mkdtemp(dir=work)
        if os.path.isdir(os.path.join(work, "base")):
            shutil.copytree(os.path.join(work, "base"), out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("lock"))
        runs.append(run_stage(make_argv(out, n), count))
        shutil.rmtree(out, ignore_errors=True)
    (ta, ca), (tb, cb) = runs
    s = (tb - ta) / (b - a)
    if not count:
        return s, None
    diff = Counter({k: cb[k] - ca.get(k, 0) for k in cb})
    return s, {k: v / (b - a) for k, v in summary(diff).items()}


def worker(opts):
    """Measure the tree this process imports from (sys.path[0]); print one JSON line."""
    import torch

    torch.set_num_threads(opts.threads)
    sys.argv = ["train_toy.py"]
    data = f"--data_root={opts.data_root}"
    work = tempfile.mkdtemp(prefix="hotloops_")
    rows = {}
    devnull = open(os.devnull, "w")
    real_stdout, sys.stdout = sys.stdout, devnull  # the stages' progress bars and lines
    try:
        if opts.job == "count":
            emulate_cuda_defaults()
            arch = COUNT_ARCH.split()
            common = ["--preset=cpu", "--device=cpu", data, "--n_train=200", "--n_test=100", "--log_every=20", *arch,
                      *QUIET, *TINY_CLS]
            run_stage([f"--out_dir={work}/base", "--stages=ddpm,shortcut,classifier", "--ddpm_steps=2",
                       "--shortcut_steps=2", "--ddpm_batch=2", "--shortcut_batch=2", *common], False)
            rows["ddpm"] = per_step(lambda o, n: [f"--out_dir={o}/ddpm_only", "--stages=ddpm", f"--ddpm_steps={n}",
                                                  "--ddpm_batch=2", *common], 20, 40, True, work)[1]
            rows["shortcut"] = per_step(lambda o, n: [f"--out_dir={o}", "--stages=shortcut",
                                                      f"--shortcut_steps={n}", "--shortcut_batch=4", *common],
                                        20, 40, True, _without(work, "shortcut"))[1]
            for method in opts.methods.split(","):
                rows[f"shortft:{method}"] = per_step(
                    lambda o, n: [f"--out_dir={o}", "--stages=shortft", f"--method={method}", f"--ft_steps={n}",
                                  "--ft_batch=2", *common], 2, 6, True, work)[1]
            rows["ddim50_batch"] = ddim50_counts(f"{work}/base/ddpm/ckpt.pt")
        else:  # time: the CPU preset's sizes
            common = ["--preset=cpu", "--device=cpu", data, "--n_train=500", "--n_test=100", *QUIET, *TINY_CLS]
            run_stage([f"--out_dir={work}/base", "--stages=ddpm,shortcut,classifier", "--ddpm_steps=2",
                       "--shortcut_steps=2", *common], False)
            rows["ddpm"] = per_step(lambda o, n: [f"--out_dir={o}/ddpm_only", "--stages=ddpm", f"--ddpm_steps={n}",
                                                  *common], 5, 25, False, work)[0]
            rows["shortcut"] = per_step(lambda o, n: [f"--out_dir={o}", "--stages=shortcut", f"--shortcut_steps={n}",
                                                      *common], 2, 8, False, _without(work, "shortcut"))[0]
            rows["shortft"] = per_step(lambda o, n: [f"--out_dir={o}", "--stages=shortft", f"--ft_steps={n}", *common],
                                       2, 10, False, work)[0]
    finally:
        sys.stdout = real_stdout
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rows))


def _without(work, stage):
    """A second work folder whose base lacks `stage` (so the stage trains anew in each copy)."""
    other = tempfile.mkdtemp(dir=work)
    shutil.copytree(os.path.join(work, "base"), os.path.join(other, "base"),
                    ignore=shutil.ignore_patterns("lock", stage))
    return other


def ddim50_counts(ckpt):
    """Ops and syncs of one DDIM-50 batch of the ddpm checkpoint's model (sftlib.metrics.ddim50)."""
    import torch

    from sftlib.metrics import ddim50
    from sftlib.models import load_ddpm

    model, sched, _ = load_ddpm(ckpt, torch.device("cpu"))
    x_T = torch.randn(2, 3, 32, 32)
    ddim50(model, sched, x_T, 2)  # warm
    with counter() as c:
        ddim50(model, sched, x_T, 2)
    return summary(c.ops)


# ------------------------------------------------------------------------------------- the driver

def measure(tree, job, opts):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS=str(opts.threads))
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={job}", f"--data_root={opts.data_root}",
           f"--methods={opts.methods}", f"--threads={opts.threads}"]
    p = subprocess.run(cmd, cwd=os.path.abspath(tree), env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"error: the {job} worker on {tree} failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(results, names):
    lines = ["| per step | " + " | ".join(f"{n}: ops | {n}: syncs" for n in names) + " | syncs: item / lift_fresh / "
             "nonzero (" + names[-1] + ") |", "|---|" + "---|---|" * len(names) + "---|"]
    for row in results[names[0]]["count"]:
        cells = [f"{results[n]['count'][row]['ops']:.1f} | {results[n]['count'][row]['syncs']:.2f}" for n in names]
        last = results[names[-1]]["count"][row]
        lines.append(f"| {row} | " + " | ".join(cells) +
                     f" | {last['_local_scalar_dense']:.2f} / {last['lift_fresh']:.2f} / {last['nonzero']:.2f} |")
    lines += ["", "| CPU preset, s/step (median of repeats) | " + " | ".join(names) + " | ratio " +
              f"{names[-1]}/{names[0]} |", "|---|" + "---|" * (len(names) + 1)]
    for row in results[names[0]]["time"][0]:
        med = {n: sorted(r[row] for r in results[n]["time"])[len(results[n]["time"]) // 2] for n in names}
        lines.append(f"| {row} | " + " | ".join(f"{med[n]:.3f}" for n in names) +
                     f" | {med[names[-1]] / med[names[0]]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", default=f"now={ROOT}", help="name=path,...: the source trees to compare, in order")
    p.add_argument("--out", default="", help="writes OUT.json and OUT.md (default: print only)")
    p.add_argument("--data_root", default=os.environ.get("SHORTFT_CIFAR", "data"))
    p.add_argument("--methods", default="shortft,draft", help="the fine-tuning methods whose step is counted")
    p.add_argument("--repeats", type=int, default=2, help="timing runs per tree, alternating between trees")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip_time", action="store_true", help="count only")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.worker:
        opts.job = opts.worker
        return worker(opts)
    if opts.repeats < 1 or opts.threads < 1:
        raise SystemExit("error: --repeats and --threads must be at least 1")
    trees = dict(t.split("=", 1) for t in opts.trees.split(","))
    for name, path in trees.items():
        if not os.path.isfile(os.path.join(path, "train_toy.py")):
            raise SystemExit(f"error: --trees: {name}={path} holds no train_toy.py")
    t0 = time.time()
    results = {n: dict(tree=os.path.abspath(t), count=measure(t, "count", opts), time=[]) for n, t in trees.items()}
    for _ in range(0 if opts.skip_time else opts.repeats):
        for n, t in trees.items():
            results[n]["time"].append(measure(t, "time", opts))
    names = list(trees)
    import torch

    meta = dict(torch=torch.__version__, threads=opts.threads, cpu=os.cpu_count(), load=os.getloadavg(),
                wall_s=time.time() - t0, command="python benchmarks/bench_hotloops.py " + " ".join(argv))
    text = table(results, names) if not opts.skip_time else json.dumps(results, indent=1)
    print(text)
    if opts.out:
        with open(opts.out + ".json", "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
        with open(opts.out + ".md", "w") as f:
            f.write(f"`{meta['command']}` (torch {meta['torch']}, {opts.threads} thread(s), load {meta['load'][0]:.1f}, "
                    f"{meta['wall_s'] / 60:.1f} min)\n\n" + text)


if __name__ == "__main__":
    run_main(main)
