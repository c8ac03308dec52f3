"""Benchmark: does the distilled shortcut stay on the teacher's DDIM-50 trajectory, and how fast is
distillation? Run it on the checkpoints of `python train_toy.py` (the ddpm and shortcut stages):

    python benchmarks/bench_shortcut.py --out_dir=out [--n=256] [--seed=0] [--device=auto] [--rewards=brightness]

For the same x_T (n samples from a fixed seed, x_T taken as x at t = 981, as in the chain) the teacher
runs DDIM-50 and its trajectory point x_t is kept at every timestep. Then, for each span a -> b:

- one-jump error: start from the TRUE teacher point x_a and jump once to b, with the student
  (consistency.jump) and with the naive teacher (one DDIM step of the teacher from a to b, the
  student's initialisation); report MSE(jump, teacher x_b) for both and the ratio student / naive.
  Spans: those of the shortcut sampler (981 -> 761 -> 501 -> 261 -> 1 -> x_0) and the shortcuts the
  ShortFT chain uses (741 -> 501, 481 -> 261, 241 -> 1; PAPER.md Sec. 3).
- accumulated error: the chained shortcut sampler from x_T (k + 1 calls), and the naive chain (the
  teacher's DDIM over the same timesteps), compared with the teacher's DDIM-50 point at every edge.

MSE is per pixel, images in [-1, 1]. Then, per reward of --rewards, whether the short chain's gradient points
where the real chain's does (same x_T; the ShortFT chain at P-Training phase 0 with the untuned base; mean and
bootstrap 95 % interval over the samples of a per-sample cosine):
- x0 reward-gradient cosine: cos(dr/dx_0 at the short chain's x_0, dr/dx_0 at the DDIM-50 x_0), for the distilled
  shortcut and the naive jump; the perfect shortcut (the base's real steps as the jump) has the DDIM-50 x_0
  itself, so its cosine is 1 by construction. For a reward linear in x_0 (brightness) dr/dx_0 is the same
  everywhere: 1 for any chain, so only the next measure says anything there.
- x_741 adjoint cosine: cos(dr/dx_741 through the short chain, dr/dx_741 through DDIM-50's last 37 steps), x_741
  the state where the jumps start (segment 1 is real in both): the backward path, the Jacobians of the jumps
  against those of the real steps (perfect: 1 by construction, the same steps).
Last, the img/s of one distillation step (consistency.cd_loss,
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
from rewards import parse_reward_spec
from sftlib.common import UserError, ema_update, pick_device, run_main
from sftlib.metrics import mean_ci
from sftlib.models import load_ddpm, load_reward, load_shortcut
from shortft import base_step, next_t, real_segment, segment_groups

BENCH_DEFAULTS = dict(out_dir="out", n=256, seed=0, device="auto", speed_steps=10, rewards="classifier:ship,brightness",
                      grad_batch=16)


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


def reward_gradient_cosines(teacher, student, sched, x_T, edges, reward, batch=16):
    """Per-sample cosines of the reward's gradient, short chain against DDIM-50 from the same x_T (module
    docstring): {"x0": {"student": [...], "naive": [...]}, "x741": {...}}, each a list of n cosines."""
    groups = segment_groups(ddpm.ddim_timesteps(sched.T, N_CHAIN), edges)
    rest = [t for g in groups[1:] for t in g]  # the real chain's timesteps after x_741: 741, ..., 1

    def real(x):
        for i, t in enumerate(rest):
            x = base_step(teacher, sched, x, t, rest[i + 1] if i + 1 < len(rest) else -1)
        return x

    def short(jumper):
        def chain(x):
            for j in range(1, len(groups)):
                g = groups[j]
                x = base_step(teacher, sched, jump(jumper, sched, x, g[0], g[-1]), g[-1], next_t(groups, j, len(g) - 1))
            return x
        return chain

    out = {"x0": {"student": [], "naive": []}, "x741": {"student": [], "naive": []}}
    for i in range(0, len(x_T), batch):  # a graph through 37 steps: a few samples at a time
        with torch.no_grad():
            x_start = real_segment(teacher, sched, x_T[i:i + batch], groups, 0, grad_last=False)  # x_741
        grads = {}
        for name, chain in (("real", real), ("student", short(student)), ("naive", short(teacher))):
            x = x_start.clone().requires_grad_(True)
            x0 = chain(x)
            grads[name] = torch.autograd.grad(reward(x0).sum(), [x0, x])  # per sample: r_b depends on x0_b only
        for name in ("student", "naive"):
            for j, key in enumerate(("x0", "x741")):
                cos = torch.nn.functional.cosine_similarity(grads[name][j].flatten(1), grads["real"][j].flatten(1), dim=1)
                out[key][name] += cos.tolist()
    return out


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
    specs = [x for x in opts["rewards"].split(",") if x]
    for spec in specs:
        try:
            parse_reward_spec(spec)
        except ValueError as e:
            raise UserError(f"--rewards: {e}") from None
    if opts["n"] < 1 or opts["grad_batch"] < 1:
        raise UserError("--n and --grad_batch must be positive")
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
    grad_rows = []
    print("\nreward-gradient cosine, short chain vs DDIM-50 from the same x_T: mean [bootstrap 95 %] over samples")
    print(f"{'reward':18s} {'at':5s} {'distilled shortcut':>24s} {'naive jump':>24s}  perfect")
    for spec in specs:
        cos = reward_gradient_cosines(teacher, student, sched, x_T, edges, load_reward(spec, opts["out_dir"], device),
                                      opts["grad_batch"])
        row = dict(reward=spec, **{k: {n: mean_ci(v) for n, v in d.items()} for k, d in cos.items()})
        grad_rows.append(row)
        for key in ("x0", "x741"):
            cells = [f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, (lo, hi) in (row[key]["student"], row[key]["naive"])]
            print(f"{spec:18s} {key:5s} {cells[0]:>24s} {cells[1]:>24s}  1 (by construction)")
    ips = shortcut_speed(teacher, student, sched, edges, cfg, device, opts["speed_steps"])
    print(f"\ndistillation step: {ips:.1f} img/s (batch {cfg['shortcut_batch']}, {cfg['cd_loss']} loss, "
          f"{cfg['teacher_solver']} teacher, {device}, {torch.get_num_threads()} CPU threads)")
    print(json.dumps(dict(edges=edges, jumps=rows, chained=chained, reward_gradients=grad_rows, shortcut_img_per_s=ips)))


if __name__ == "__main__":
    run_main(main)
