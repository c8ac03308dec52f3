"""Benchmark: what consistency distillation does to the student in its first steps, on a given base.

    python benchmarks/cd_dynamics.py --models=DIR[,DIR2] [--lrs=1e-3,3e-4,1e-4] [--steps=80] [--warmup=0]
                                     [--target_ema=0] [--out=FILE.json]

DIR holds a ddpm/ckpt.pt (and its cache/ of CIFAR-10). For each base and lr: the student starts as the
teacher (as train_shortcut.py starts it) and trains with consistency.cd_loss (pseudo-Huber, k = 4
segments, real images only, batch 64, Adam, gradient clip 1, a linear lr warmup over --warmup steps),
with the target network an EMA of the student at rate --target_ema (0: the stop-grad student itself, the
default of the shortcut stage). Printed along the way: the CD loss of the online student against itself
on 4 fixed batches of 64 training images (the same noise each time), at steps 0 (the naive student, the
teacher itself), 5, 10, 20, 40, 80, ..., and the gradient norm before clipping. A loss above step 0's
means distillation has made the student a worse shortcut than the teacher it started from.
"""
import copy
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from consistency import cd_loss, segment_edges  # noqa: E402
from sftlib import config  # noqa: E402
from sftlib.common import UserError, ema_update, run_main, write_text  # noqa: E402
from sftlib.data import load_cifar10  # noqa: E402
from sftlib.models import load_ddpm  # noqa: E402

DEFAULTS = dict(models="", lrs="1e-3,3e-4,1e-4", steps=80, warmup=0, target_ema=0.0, data_root="", threads=2, out="")


def evaluate(student, teacher, sched, batches, edges):
    with torch.random.fork_rng(), torch.no_grad():  # the same t and noise for every evaluation; training's RNG untouched
        torch.manual_seed(123)
        return sum(float(cd_loss(student, student, teacher, sched, b, edges, "huber")) for b in batches) / len(batches)


def main(argv):
    a = dict(DEFAULTS, **config.parse_overrides(argv, DEFAULTS, description=__doc__))
    models = [m for m in a["models"].split(",") if m]
    if not models:
        raise UserError("--models=DIR[,DIR2]: run folders with ddpm/ckpt.pt")
    try:
        lrs = [float(x) for x in a["lrs"].split(",") if x]
    except ValueError:
        raise UserError(f"--lrs must be a comma list of numbers, got {a['lrs']!r}") from None
    torch.set_num_threads(a["threads"])
    root = a["data_root"] or os.environ.get("SHORTFT_CIFAR") or config.DEFAULTS["data_root"]
    checkpoints = [s for s in (5, 10, 20, 40, 50, 80, 150, 300) if s <= a["steps"]]
    out = {}
    for folder in models:
        path = os.path.join(folder, "ddpm", "ckpt.pt")
        if not os.path.isfile(path):
            raise UserError(f"--models: no {path}")
        teacher, sched, cfg = load_ddpm(path, "cpu")
        teacher.requires_grad_(False)
        edges = segment_edges(sched.T, 50, 4)
        x, _ = load_cifar10(root, "train", 0, os.path.join(folder, "cache"))
        x = x[:6000].float() / 127.5 - 1  # (6000, 3, 32, 32) in [-1, 1]; the first 256 are the evaluation batches
        batches = [x[i * 64:(i + 1) * 64] for i in range(4)]
        for lr in lrs:
            torch.manual_seed(0)
            student = copy.deepcopy(teacher).requires_grad_(True)
            target = copy.deepcopy(student).requires_grad_(False)
            opt = torch.optim.Adam(student.parameters(), lr=lr)
            curve, norms, t0 = [(0, evaluate(student.eval(), teacher, sched, batches, edges))], [], time.time()
            student.train()
            for step in range(1, a["steps"] + 1):
                for g in opt.param_groups:
                    g["lr"] = lr * min(1.0, step / a["warmup"]) if a["warmup"] > 0 else lr
                loss = cd_loss(student, target if a["target_ema"] > 0 else student, teacher, sched,
                               x[torch.randint(256, len(x), (64,))], edges, "huber")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                norms.append(float(torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)))
                opt.step()
                if a["target_ema"] > 0:
                    ema_update(target, student, a["target_ema"])
                if step in checkpoints:
                    curve.append((step, evaluate(student.eval(), teacher, sched, batches, edges)))
                    student.train()
            key = f"{folder} (eps_skip={bool(cfg.get('eps_skip'))}) lr={lr:g}"
            out[key] = dict(curve=curve, grad_norm=norms, warmup=a["warmup"], target_ema=a["target_ema"])
            print(f"{key}: CD loss " + ", ".join(f"{s}: {v:.3f}" for s, v in curve)
                  + f"; grad norm first 5 {[round(n, 1) for n in norms[:5]]}, last 5 {[round(n, 1) for n in norms[-5:]]}"
                  + f" ({time.time() - t0:.0f} s)", flush=True)
    if a["out"]:
        write_text(a["out"], json.dumps(dict(args=a, runs=out), indent=1))


if __name__ == "__main__":
    run_main(main)
