"""Stage 2: the shortcut. Segment-wise consistency distillation of the DDPM into a few-step model.

ShortFT (PAPER.md Sec. 2) needs a frozen network S(x_t, t -> s) that lands on the *base model's own*
DDIM trajectory, so that one jump can stand in for many DDIM steps, forward and backward. At SD
scale the paper uses Hyper-SD (trajectory-segmented consistency distillation); this module builds
the same thing at toy scale from our own DDPM teacher:

- Segments (Hyper-SD, Ren et al. 2024; PCM, Wang et al. 2024): the DDIM-50 chain 981, 961, ..., 1
  is split into k groups of consecutive timesteps; the *edges* are the last timestep of each group
  (k = 4: 761, 501, 261, 1, the timesteps of PAPER.md Sec. 3). The student's consistency function
  maps x_t to the teacher's trajectory point at the next edge strictly below t (edge_of), or to
  x_0 below the last edge. So from an edge it jumps to the next edge (761 -> 501), and from the
  step after an edge it gives the ShortFT shortcuts 741 -> 501, 481 -> 261, 241 -> 1.
- Parameterisation (*choice*, PAPER.md Sec. 4.2): the student predicts eps, like the teacher it is
  initialised from, and jumps with the DDIM formula from t to the edge (`jump`). At t = edge the
  jump is the identity, so the boundary condition S(x_s, s -> s) = x_s holds exactly.
- Training (Song et al. 2023, "Consistency Models", Algorithm 2, with the segment edge as the
  boundary): one teacher ODE step t_{n+1} -> t_n on the DDIM-50 grid, then the target network from
  t_n to the edge is the target for the student from t_{n+1} to the same edge. Defaults follow the
  improved recipe (Song & Dhariwal 2023): pseudo-Huber distance, target = the stop-gradient student
  (mu = 0; Song et al. 2023 use an EMA, mu = 0.95: --cd_target_ema). A slower EMA of the student is
  kept for sampling and for ShortFT (Song et al. 2023 keep one too).
- Where x_{t_{n+1}} comes from (*choice*, TeacherChains): half of each batch from q(x_t | x_0) on
  real data as in Alg. 2, half from the teacher's own DDIM-50 chains, where ShortFT will use it.
- x0-clipping: the teacher's chain, the teacher steps and the jumps all go through ddpm.ddim_step,
  so they clip x0_hat exactly when the schedule does (--clip_x0, ddpm.py); the student learns the
  trajectory of the sampler the teacher is used with.

Writes <out_dir>/distill/ckpt.pt = {kind: "shortcut", model, ema, target, opt, step, config, rng,
edges, teacher, elapsed}, <out_dir>/distill/samples_{step}.png (top half: teacher DDIM-50; bottom
half: the (k+1)-call shortcut sampler, same noise) and <out_dir>/distill/log.csv (step, loss, img/s).
"""
import copy
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import ddpm
from common import (UserError, bf16_autocast, ema_update, load_checkpoint, open_log, rng_state, save_atomic,
                     save_grid, set_rng_state)
from data import DeviceBatches, load_cifar10
from train_ddpm import MODEL_KEYS, load_ddpm
from unet import build_unet

N_CHAIN = 50  # the chain ShortFT fine-tunes through, and the grid the student is distilled on: DDIM-50


def segment_edges(T, n_steps, k):
    """The k segment edges on the DDIM chain (Hyper-SD's trajectory segments), descending: the last
    timestep of each of k groups of consecutive DDIM timesteps; group j ends after floor((j+1) n / k)
    steps. T = 1000, n_steps = 50, k = 4 -> [761, 501, 261, 1] (groups of 12, 13, 12, 13 steps)."""
    if not 1 <= k <= n_steps:
        raise UserError(f"k_segments must be between 1 and the {n_steps} steps of the DDIM chain, got {k}")
    ts = ddpm.ddim_timesteps(T, n_steps)  # 981, 961, ..., 1 for T = 1000, n_steps = 50
    return [ts[(j + 1) * n_steps // k - 1] for j in range(k)]


def edge_of(t, edges):
    """The edge a timestep jumps to: the largest edge strictly below t, or -1 (= x_0) for t <= the
    lowest edge. Segment j is (s_{j+1}, s_j] (the top one up to T - 1), so an edge belongs to the
    segment below it: edge_of(761) = 501, edge_of(760) = 501, edge_of(762) = 761, edge_of(1) = -1.
    t: int or (B,) long tensor; returns the same kind."""
    if not torch.is_tensor(t):
        return max([e for e in edges if e < t], default=-1)
    e = torch.tensor(sorted(edges), device=t.device)  # (k,) ascending
    i = torch.searchsorted(e, t)  # (B,) how many edges lie strictly below t
    return torch.where(i > 0, e[(i - 1).clamp(min=0)], torch.full_like(t, -1))  # (B,)


def _vec(t, x):
    """An int or (B,) tensor of timesteps as a (B,) long tensor on x's device."""
    return torch.as_tensor(t, dtype=torch.long, device=x.device).expand(x.shape[0])  # (B,)


def jump(student, sched, x_t, t, s):
    """The shortcut S(x_t, t -> s): one DDIM jump (Song et al. 2021, Eq. 12, eta = 0) with the
    student's eps, from t down to s (per sample); the exact identity where t == s (the boundary
    condition of Song et al. 2023, Sec. 3). Differentiable w.r.t. x_t; a frozen student
    (requires_grad_(False)) gets no gradient. t, s: int or (B,) long tensors, s = -1 means x_0."""
    t, s = _vec(t, x_t), _vec(s, x_t)  # (B,), (B,)
    x_s = ddpm.ddim_step(sched, x_t, student(x_t, t), t, s)  # (B, C, H, W)
    return torch.where((t == s).view(-1, 1, 1, 1), x_t, x_s)  # (B, C, H, W)


def teacher_step(teacher, sched, x_t, t, s, solver="ddim"):
    """One step of the teacher's probability-flow ODE from t to s (the Phi of Song et al. 2023, Alg. 2).
    ddim: Euler in the DDIM variables (Song et al. 2021, Eq. 12-14). heun: Karras et al. 2022,
    Algorithm 1, in the same variables; the DDIM update is linear in eps, so Heun is DDIM with the
    average of the eps at both ends. Where s = -1 (x_0) Heun falls back to Euler, as Karras does at
    sigma = 0. t, s: (B,) long tensors."""
    eps_1 = teacher(x_t, t)  # (B, C, H, W)
    x_euler = ddpm.ddim_step(sched, x_t, eps_1, t, s)  # (B, C, H, W)
    if solver == "ddim":
        return x_euler
    eps_2 = teacher(x_euler, s.clamp(min=0))  # (B, C, H, W) eps at the end point
    x_heun = ddpm.ddim_step(sched, x_t, (eps_1 + eps_2) / 2, t, s)  # (B, C, H, W)
    return torch.where((s < 0).view(-1, 1, 1, 1), x_euler, x_heun)


class TeacherChains:
    """*Choice*, not in Song et al. 2023 (who draw x_{t_{n+1}} from q(x_t | x_0) on real data): m states
    walking down the teacher's own DDIM-50 chains from fresh noise, one grid step per training step, so
    the student also learns on the states it meets inside the chain: a small, briefly trained teacher's
    chains can leave the data manifold, where real noisy images never go. The chains' next step is the
    teacher step of the CD loss: they cost no extra network call."""

    def __init__(self, teacher, sched, m, device):
        self.grid = torch.tensor(ddpm.ddim_timesteps(sched.T, N_CHAIN) + [-1], device=device)  # (51,)
        self.n = torch.arange(m, device=device) * N_CHAIN // m  # (m,) grid positions, evenly staggered
        self.x = torch.randn(m, 3, 32, 32, device=device)  # (m, 3, 32, 32) x_T, taken as x at grid[0]
        with torch.no_grad():  # the teacher only walks its chains: no gradients
            for j in range(N_CHAIN - 1):  # bring chain i down to its position n_i
                t, s = self.grid[j].expand(m), self.grid[j + 1].expand(m)  # (m,), (m,)
                x_s = ddpm.ddim_step(sched, self.x, teacher(self.x, t), t, s)  # (m, 3, 32, 32)
                self.x = torch.where((self.n > j).view(-1, 1, 1, 1), x_s, self.x)

    def advance(self, x_n):
        """Step every chain down to x_n (the CD loss's teacher step); those that reached x_0 restart."""
        self.n = self.n + 1  # (m,)
        done = self.n == N_CHAIN  # (m,)
        self.x = torch.where(done.view(-1, 1, 1, 1), torch.randn_like(x_n), x_n)  # (m, 3, 32, 32)
        self.n = torch.where(done, torch.zeros_like(self.n), self.n)


def cd_loss(student, target, teacher, sched, x0, edges, loss="l2", solver="ddim", chains=None):
    """The consistency distillation loss (Song et al. 2023, Algorithm 2), with the segment
    edge as the boundary (Hyper-SD / PCM): d(S_phi(x_{t_{n+1}}, t_{n+1} -> e), S_{phi^-}(x_{t_n}, t_n -> e)),
    e = edge_of(t_{n+1}), x_{t_n} = one teacher ODE step from x_{t_{n+1}} ~ q(x_t | x_0), n uniform.
    With chains (TeacherChains), their m states are appended to the batch of real ones.
    d: mean squared error (l2) or pseudo-Huber (Song & Dhariwal 2023, improved consistency training)."""
    grid = torch.tensor(ddpm.ddim_timesteps(sched.T, N_CHAIN) + [-1], device=x0.device)  # (51,) 981..1, -1
    n = torch.randint(0, N_CHAIN, (x0.shape[0],), device=x0.device)  # (B,) uniform over the grid
    x_next = ddpm.q_sample(sched, x0, grid[n], torch.randn_like(x0))  # (B, C, H, W) x_{t_{n+1}}
    if chains is not None:
        n, x_next = torch.cat([n, chains.n]), torch.cat([x_next, chains.x])  # (B + m,), (B + m, C, H, W)
    t_next, t_n = grid[n], grid[n + 1]  # (B',) t_{n+1} and the grid point below it, t_n (B' = B + m)
    e = edge_of(t_next, edges)  # (B',) the edge both jumps land on
    with torch.no_grad():  # the teacher is fixed: its step is data for the student, not a path for gradients
        x_n = teacher_step(teacher, sched, x_next, t_next, t_n, solver)  # (B', C, H, W) x^phi_{t_n}
    if chains is not None:
        chains.advance(x_n[x0.shape[0]:])
    with torch.no_grad():  # stop-gradient target of CD: the target network (theta^- in Song et al. 2023)
        x_target = jump(target, sched, x_n, t_n, e)  # (B', C, H, W); = x_{t_n} itself where t_n == e
    pred = jump(student, sched, x_next, t_next, e)  # (B', C, H, W)
    if loss == "l2":
        return (pred - x_target).pow(2).mean()
    if loss == "huber":  # sqrt(||x - y||^2 + c^2) - c with c = 0.00054 sqrt(d) (Song & Dhariwal 2023)
        c = 0.00054 * math.sqrt(pred[0].numel())
        return ((pred - x_target).pow(2).flatten(1).sum(1) + c**2).sqrt().sub(c).mean()
    raise UserError(f"--cd_loss must be l2 or huber, got {loss!r}")


def shortcut_sample(student, sched, x_T, edges):
    """The few-step shortcut sampler (Song et al. 2023, Algorithm 1, multistep, with segment edges
    as the intermediate times): x_T is treated as x at the first DDIM-50 timestep (981), then
    jumps 981 -> s_0 -> s_1 -> ... -> s_{k-1} (761, 501, 261, 1 for k = 4) and one final student
    step s_{k-1} -> x_0. That is k + 1 network calls. Deterministic; differentiable."""
    t, x = ddpm.ddim_timesteps(sched.T, N_CHAIN)[0], x_T  # x: (B, C, H, W)
    for s in list(edges) + [-1]:
        x = jump(student, sched, x, t, s) if s < t else x  # an edge at 981 itself (k = 50) costs nothing
        t = s
    return x


def load_shortcut(path, device, use_ema=True):
    """(student, schedule, config, edges) from a shortcut checkpoint: frozen and in eval mode, ready to
    be used as the shortcut inside a fine-tuning chain. The EMA weights unless use_ema=False. The
    schedule clips x0_hat (or not) as during distillation: jump with it to stay on that trajectory."""
    ckpt = load_checkpoint(path, "shortcut")
    cfg = ckpt["config"]
    student = build_unet(cfg)
    try:
        student.load_state_dict(ckpt["ema" if use_ema else "model"])
    except RuntimeError:
        raise UserError(f"{path}: weights do not match the UNet its config describes") from None
    sched = ddpm.Schedule(cfg["T"], cfg["beta_1"], cfg["beta_T"], device, cfg.get("clip_x0", True))
    return student.to(device).eval().requires_grad_(False), sched, cfg, list(ckpt["edges"])


@torch.no_grad()  # sampling grids for a look: no gradients needed
def sample_grid(teacher, student, sched, x_T, edges, path):
    """Top half: the teacher's DDIM-50 samples; bottom half: the shortcut sampler on the same noise."""
    x_teacher = ddpm.ddim_sample(teacher, sched, x_T, ddpm.ddim_timesteps(sched.T, N_CHAIN))  # (B, 3, 32, 32)
    save_grid(torch.cat([x_teacher, shortcut_sample(student, sched, x_T, edges)]), path)


def train(cfg, device):
    out = os.path.join(cfg["out_dir"], "distill")
    ckpt_path = os.path.join(out, "ckpt.pt")
    teacher_path = os.path.join(cfg["out_dir"], "ddpm", "ckpt.pt")
    if not os.path.isfile(teacher_path):
        raise UserError(f"[distill] no teacher at {teacher_path}: run the ddpm stage first "
                        f"(python train_toy.py --stages=ddpm --out_dir={cfg['out_dir']})")
    teacher, sched, teacher_cfg = load_ddpm(teacher_path, device)  # the DDPM's EMA weights
    teacher.requires_grad_(False)
    edges = segment_edges(sched.T, N_CHAIN, cfg["k_segments"])
    for key, allowed in (("cd_loss", ("l2", "huber")), ("teacher_solver", ("ddim", "heun"))):
        if cfg[key] not in allowed:
            raise UserError(f"--{key} must be {' or '.join(allowed)}, got {cfg[key]!r}")
    if not 0 <= cfg["teacher_chain_frac"] <= 1:
        raise UserError(f"--teacher_chain_frac must be in [0, 1], got {cfg['teacher_chain_frac']}")
    cfg.update({k: teacher_cfg[k] for k in MODEL_KEYS})  # the student is the teacher's UNet

    student = copy.deepcopy(teacher).requires_grad_(True)  # initialised from the teacher (Song et al. 2023)
    if cfg["distill_init"]:  # *choice* for ablations: re-segment a distilled shortcut (e.g. k = 4 -> 8) briefly
        init = load_checkpoint(cfg["distill_init"], "shortcut")
        try:
            student.load_state_dict(init["ema"])
        except RuntimeError:
            raise UserError(f"--distill_init={cfg['distill_init']} is a shortcut of another UNet than the teacher") from None
    opt = torch.optim.Adam(student.parameters(), lr=cfg["distill_lr"])
    step, elapsed = 0, 0.0
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, "shortcut")
        if ckpt["step"] >= ckpt["config"]["distill_steps"] and ckpt["step"] >= cfg["distill_steps"]:
            print(f"[distill] {ckpt_path} is complete ({ckpt['step']} steps): skipping the stage")
            return ckpt_path
        if not cfg["resume"]:
            raise UserError(f"{ckpt_path} holds an unfinished run (step {ckpt['step']}): "
                            f"pass --resume to continue it, or choose another --out_dir")
        if list(ckpt["edges"]) != edges:
            raise UserError(f"cannot resume {ckpt_path}: it was distilled with edges {ckpt['edges']}, not {edges}")
        cfg.update({k: v for k, v in ckpt["config"].items() if k not in ("distill_steps", "resume", "device")})
        student.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        print(f"[distill] resuming {ckpt_path} from step {step} (with fresh teacher chains)")
    sched.clip_x0 = cfg["clip_x0"]  # teacher steps and jumps clip x0_hat as this run says (ddpm.py)
    target = copy.deepcopy(student).eval().requires_grad_(False)  # the target network phi^- of CD
    ema = copy.deepcopy(student).eval().requires_grad_(False)  # a slower average, the weights we sample
    if step > 0:
        target.load_state_dict(ckpt["target"])
        ema.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"])

    x, y = load_cifar10(cfg["data_root"], "train", cfg["n_train"], os.path.join(cfg["out_dir"], "cache"))
    data = DeviceBatches(x, y, device)
    print(f"[distill] k={cfg['k_segments']} segments, edges {edges}; {cfg['distill_steps']} steps of batch "
          f"{cfg['distill_batch']}, {cfg['cd_loss']} loss, {cfg['teacher_solver']} teacher, on {device}")
    g = torch.Generator().manual_seed(1234)  # fixed noise for the grids, the same after a resume
    x_T = torch.randn(16, 3, 32, 32, generator=g).to(device)  # (16, 3, 32, 32)

    m = round(cfg["teacher_chain_frac"] * cfg["distill_batch"])  # batch rows on the teacher's own chains
    chains = TeacherChains(teacher, sched, m, device) if m > 0 else None
    net = torch.compile(student) if cfg["compile"] and device.type == "cuda" else student
    autocast = bf16_autocast(cfg, device)
    log, new_log = open_log(out, "step,loss,img_per_s", fresh=step == 0)
    if new_log:
        # step 0: the student is still the teacher, so this grid shows the naive k-jump DDIM sampler
        sample_grid(teacher, ema, sched, x_T, edges, os.path.join(out, "samples_0.png"))

    def save():
        save_atomic(dict(kind="shortcut", model=student.state_dict(), ema=ema.state_dict(),
                         target=target.state_dict(), opt=opt.state_dict(), step=step, config=dict(cfg),
                         rng=rng_state(), edges=edges, teacher=teacher_path, elapsed=elapsed), ckpt_path)

    student.train()
    bar = tqdm(file=sys.stdout, total=cfg["distill_steps"], initial=step, desc="distill", dynamic_ncols=True, mininterval=1.0)
    t_last, loss_sum, n_sum = time.time(), 0.0, 0
    while step < cfg["distill_steps"]:
        t0 = time.time()
        x0, _ = data.sample(cfg["distill_batch"] - m)  # (B - m, 3, 32, 32) in [-1, 1]
        with autocast:
            loss = cd_loss(net, target, teacher, sched, x0, edges, cfg["cd_loss"], cfg["teacher_solver"], chains)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg["grad_clip"])
        opt.step()
        step += 1
        ema_update(target, student, cfg["cd_target_ema"])  # phi^- <- mu phi^- + (1 - mu) phi (Alg. 2)
        ema_update(ema, student, min(cfg["distill_ema"], (1 + step) / (10 + step)))  # with warmup, as the DDPM's
        loss_val = loss.item()
        if not math.isfinite(loss_val):
            raise UserError(f"[distill] loss became {loss_val} at step {step}; the last good checkpoint "
                            f"is kept at {ckpt_path}: lower --distill_lr and --resume")
        elapsed += time.time() - t0
        loss_sum, n_sum = loss_sum + loss_val, n_sum + 1
        bar.update(1)
        if step % cfg["log_every"] == 0 or step == cfg["distill_steps"]:
            ips = n_sum * cfg["distill_batch"] / (time.time() - t_last)
            bar.set_postfix(loss=f"{loss_sum / n_sum:.5f}", img_s=f"{ips:.0f}")
            log.write(f"{step},{loss_sum / n_sum:.6f},{ips:.1f}\n")
            log.flush()
            t_last, loss_sum, n_sum = time.time(), 0.0, 0
        if step % cfg["sample_every"] == 0 or step == cfg["distill_steps"]:
            sample_grid(teacher, ema, sched, x_T, edges, os.path.join(out, f"samples_{step}.png"))
        if step % cfg["ckpt_every"] == 0 or step == cfg["distill_steps"]:
            save()
    bar.close()
    log.close()
    print(f"[distill] done: {step} steps in {elapsed / 60:.1f} min of training; checkpoint {ckpt_path}")
    return ckpt_path
