"""Benchmark: does the distilled shortcut stay on the teacher's DDIM-50 trajectory, and how fast is
distillation? Run it on the checkpoints of `python train_toy.py` (the ddpm and shortcut stages):

    python benchmarks/bench_shortcut.py --out_dir=out [--n=256] [--seed=0] [--device=auto]

For the same x_T (n samples from a fixed seed, x_T taken as x at t = 981, as in the chain) the teacher
runs DDIM-50 and its trajectory point x_t is kept at every timestep. Then, for each span a -> b:

- one-jump error: start from the TRUE teacher point x_a and jump once to b, with the student
  (consistency.jump) and with the naive teacher (one DDIM step of the teacher from a to b, the
  student's initialisation); report MSE(jump, teacher x_b) for both and the ratio student / naive.
  Spans: those of the shortcut sampler (981 -> 761 -> 501 -> 261 -> 1 -> x_0) and the shortcuts the
  ShortFT chain uses (741 -> 501, 481 -> 261, 241 -> 1; PAPER.md Sec. 3).
- accumulated error: the chained shortcut sampler from x_T (k + 1 calls), and the naive chain (the
  teacher's DDIM over the same timesteps), compared with the teacher's DDIM-50 point at every edge.

MSE is per pixel, images in [-1, 1]. Last, the img/s of one distillation step (consistency.cd_loss,
backward, Adam, EMA) at the checkpoint's batch size, timed on random images (speed does not depend on
the pixels). The last line is the same numbers as JSON.
"""
import copy
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python benchmarks/<name>.py` from anywhere: the project's modules live at ROOT

import ddpm
from consistency import TeacherChains, cd_loss, edge_of, jump, shortcut_sample
from ddpm import N_CHAIN
from sftlib import config
from sftlib.common import ema_update, pick_device, run_main
from sftlib.models import load_ddpm, load_shortcut

BENCH_DEFAULTS = dict(out_dir="out", n=256, seed=0, device="auto", speed_steps=10)


def mse(a, b):
    return (a - b).pow(2).mean().item()


@torch.no_grad()  # measurements only: no gradients anywhere here
def trajectory_errors(teacher, student, sched, x_T, edges):
    grid = ddpm.ddim_timesteps(sched.T, N_CHAIN)  # 981, 961, ..., 1
    traj = {grid[0]: x_T}  # t -> the teacher's DDIM-50 point x_t, each (n, 3, 32, 32)
    for t, s in zip(grid, grid[1:] + [-1]):
        traj[s] = ddpm.ddim_step(sched, traj[t], teacher(traj[t], torch.full((len(x_T),), t, device=x_T.device)), t, s)
    sampler_spans = list(zip([grid[0]] + edges, edges + [-1]))  # (981, 761), ..., (1, -1)
    shortft_spans = [(grid[grid.index(e) + 1], edge_of(grid[grid.index(e) + 1], edges)) for e in edges[:-1]]
    rows = []
    for kind, spans in (("sampler", sampler_spans), ("shortft", shortft_spans)):
        for a, b in spans:
            student_mse = mse(jump(student, sched, traj[a], a, b), traj[b])
            naive_mse = mse(jump(teacher, sched, traj[a], a, b), traj[b])  # one teacher DDIM step a -> b
            ratio = student_mse / naive_mse if naive_mse else None  # None: one DDIM step, naive = teacher
            rows.append(dict(kind=kind, span=f"{a}->{b}", ddim_steps=(a - max(b, 1)) // 20 + (b < 0),
                             student=student_mse, naive=naive_mse, ratio=ratio))
    chained = []  # the whole few-step samplers from x_T, compared at every edge and at x_0
    x_student, x_naive, t = x_T, x_T, grid[0]
    for s in edges + [-1]:
        x_student, x_naive = jump(student, sched, x_student, t, s), jump(teacher, sched, x_naive, t, s)
        chained.append(dict(at=s, student=mse(x_student, traj[s]), naive=mse(x_naive, traj[s])))
        t = s
    assert torch.allclose(x_student, shortcut_sample(student, sched, x_T, edges), atol=1e-5)
    return rows, chained


def shortcut_speed(teacher, student, sched, edges, cfg, device, steps):
    """img/s of one distillation step, as train_shortcut.train runs it (fp32, no compile)."""
    student = copy.deepcopy(student).train().requires_grad_(True)
    target, ema = copy.deepcopy(student).requires_grad_(False), copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=cfg["shortcut_lr"])
    B, m = cfg["shortcut_batch"], round(cfg["teacher_chain_frac"] * cfg["shortcut_batch"])
    chains = TeacherChains(teacher, sched, m, device) if m > 0 else None
    x0 = torch.rand(B - m, 3, 32, 32, device=device) * 2 - 1  # (B - m, 3, 32, 32) random "images" in [-1, 1]
    for i in range(steps + 1):
        if i == 1:  # the first step is a warm-up (allocations, kernel choice)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
        loss = cd_loss(student, target, teacher, sched, x0, edges, cfg["cd_loss"], cfg["teacher_solver"], chains)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(target, student, cfg["cd_target_ema"])
        ema_update(ema, student, cfg["shortcut_ema"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * B / (time.time() - t0)


def main(args):
    opts = dict(BENCH_DEFAULTS)
    opts.update(config.parse_overrides(args, BENCH_DEFAULTS))
    device = pick_device(opts["device"])
    teacher, _, _ = load_ddpm(os.path.join(opts["out_dir"], "ddpm", "ckpt.pt"), device)
    # the student's schedule: x0-clipping on or off as during its distillation (ddpm.py, --clip_x0)
    student, sched, cfg, edges = load_shortcut(os.path.join(opts["out_dir"], "shortcut", "ckpt.pt"), device)
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(opts["seed"])
    x_T = torch.randn(opts["n"], 3, 32, 32, generator=g).to(device)  # (n, 3, 32, 32)
    rows, chained = trajectory_errors(teacher, student, sched, x_T, edges)

    print(f"teacher {opts['out_dir']}/ddpm/ckpt.pt, student {opts['out_dir']}/shortcut/ckpt.pt "
          f"(k={len(edges)}, edges {edges}); {opts['n']} samples, seed {opts['seed']}, {device}, "
          f"clip_x0={sched.clip_x0}")
    print("\none jump from the teacher's DDIM-50 point at the span's start; MSE to its DDIM-50 point at the end")
    print(f"{'':8s} {'span':>9s} {'DDIM steps':>10s} {'student':>10s} {'naive':>10s} {'ratio':>7s}")
    for r in rows:
        ratio = f"{r['ratio']:7.3f}" if r["ratio"] else "    n/a  (one DDIM step: the naive jump is the teacher itself)"
        print(f"{r['kind']:8s} {r['span']:>9s} {r['ddim_steps']:>10d} {r['student']:10.2e} {r['naive']:10.2e} {ratio}")
    print("\nchained from x_T (shortcut sampler vs the teacher's DDIM over the same timesteps); MSE to DDIM-50")
    print(f"{'at t':>5s} {'student':>10s} {'naive':>10s} {'ratio':>7s}")
    for c in chained:
        print(f"{c['at']:5d} {c['student']:10.2e} {c['naive']:10.2e} {c['student'] / max(c['naive'], 1e-20):7.3f}")
    ips = shortcut_speed(teacher, student, sched, edges, cfg, device, opts["speed_steps"])
    print(f"\ndistillation step: {ips:.1f} img/s (batch {cfg['shortcut_batch']}, {cfg['cd_loss']} loss, "
          f"{cfg['teacher_solver']} teacher, {device}, {torch.get_num_threads()} CPU threads)")
    print(json.dumps(dict(edges=edges, jumps=rows, chained=chained, shortcut_img_per_s=ips)))


if __name__ == "__main__":
    run_main(main)
