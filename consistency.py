"""The shortcut: segment-wise consistency distillation of the DDPM into a few-step model.

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
- Parameterisation (*choice*, PAPER.md Sec. 4, item 2): the student predicts eps, like the teacher it is
  initialised from, and jumps with the DDIM formula from t to the edge (`jump`). At t = edge the
  jump is the identity, so the boundary condition S(x_s, s -> s) = x_s holds exactly.
- Training (Song et al. 2023, "Consistency Models", Algorithm 2, with the segment edge as the
  boundary): one teacher ODE step t_{n+1} -> t_n on the DDIM-50 grid, then the target network from
  t_n to the edge is the target for the student from t_{n+1} to the same edge. The distance is the
  pseudo-Huber one of the improved recipe (Song & Dhariwal 2023); the target network is an EMA of the
  student, mu = 0.95 (Song et al. 2023; --cd_target_ema). *Choice*: the improved recipe's target, the
  stop-gradient student itself (mu = 0), distils a plain-eps base but not the eps-skip base of the CPU
  preset: its loss climbs away in the first steps and stays there (docs/results.md, "The first
  steps of consistency distillation"). A slower EMA of the student is kept for sampling and for ShortFT (Song et al. 2023 keep one too).
- Where x_{t_{n+1}} comes from (*choice*, TeacherChains): half of each batch from q(x_t | x_0) on
  real data as in Alg. 2, half from the teacher's own DDIM-50 chains, where ShortFT will use it.
- x0-clipping: the teacher's chain, the teacher steps and the jumps all go through ddpm.ddim_step,
  so they clip x0_hat exactly when the schedule does (--clip_x0, ddpm.py); the student learns the
  trajectory of the sampler the teacher is used with.

The training loop is the `shortcut` stage, train_shortcut.py; this module holds the concept only.
"""
import functools
import math

import torch

import ddpm
from ddpm import N_CHAIN  # the chain ShortFT fine-tunes through is the grid the student is distilled on


def segment_edges(T, n_steps, k):
    """The k segment edges on the DDIM chain (Hyper-SD's trajectory segments), descending: the last
    timestep of each of k groups of consecutive DDIM timesteps; group j ends after floor((j+1) n / k)
    steps. T = 1000, n_steps = 50, k = 4 -> [761, 501, 261, 1] (groups of 12, 13, 12, 13 steps)."""
    if not 1 <= k <= n_steps:
        raise ValueError(f"k_segments must be between 1 and the {n_steps} steps of the DDIM chain, got {k}")
    ts = ddpm.ddim_timesteps(T, n_steps)  # 981, 961, ..., 1 for T = 1000, n_steps = 50
    return [ts[(j + 1) * n_steps // k - 1] for j in range(k)]


def edge_of(t, edges):
    """The edge a timestep jumps to: the largest edge strictly below t, or -1 (= x_0) for t <= the
    lowest edge. Segment j is (s_{j+1}, s_j] (the top one up to T - 1), so an edge belongs to the
    segment below it: edge_of(761) = 501, edge_of(760) = 501, edge_of(762) = 761, edge_of(1) = -1.
    t: int or (B,) long tensor; returns the same kind."""
    if not torch.is_tensor(t):
        return max([e for e in edges if e < t], default=-1)
    e = on_device(tuple(sorted(edges)), t.device)  # (k,) ascending
    i = torch.searchsorted(e, t)  # (B,) how many edges lie strictly below t
    return torch.where(i > 0, e[(i - 1).clamp(min=0)], torch.full_like(t, -1))  # (B,)


def _vec(t, x):
    """An int or (B,) tensor of timesteps as a (B,) long tensor on x's device."""
    return t.expand(x.shape[0]) if torch.is_tensor(t) else ddpm.t_batch(t, x)  # (B,)


@functools.lru_cache(maxsize=None)
def on_device(values, device):
    """A tuple of ints as a long tensor on `device`, built once: a tensor made from Python data in every step
    is a host-to-device copy that makes a GPU wait."""
    return torch.tensor(values, dtype=torch.long, device=device)


def chain_grid(T, device):
    """The DDIM-50 grid of timesteps and x_0 below it, (51,) on the device: 981, 961, ..., 1, -1 for T = 1000."""
    return on_device(tuple(ddpm.ddim_timesteps(T, N_CHAIN)) + (-1,), torch.device(device))


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
        self.grid = chain_grid(sched.T, device)  # (51,)
        self.n = torch.arange(m, device=device) * N_CHAIN // m  # (m,) grid positions, evenly staggered
        self.x = torch.randn(m, 3, 32, 32, device=device)  # (m, 3, 32, 32) x_T, taken as x at grid[0]
        with torch.no_grad():  # the teacher only walks its chains: no gradients
            for j in range(N_CHAIN - 1):  # bring chain i down to its position n_i
                t, s = self.grid[j].expand(m), self.grid[j + 1].expand(m)  # (m,), (m,)
                x_s = ddpm.ddim_step(sched, self.x, teacher(self.x, t), t, s)  # (m, 3, 32, 32)
                self.x = torch.where((self.n > j).view(-1, 1, 1, 1), x_s, self.x)

    def state_dict(self):
        """Where the chains are (a checkpoint holds it, so a resumed distillation goes on exactly)."""
        return {"n": self.n.cpu(), "x": self.x.cpu()}

    def load_state_dict(self, state):
        if state["x"].shape != self.x.shape:
            raise ValueError(f"the checkpoint's {len(state['x'])} teacher chains do not match this run's {len(self.x)}")
        self.n, self.x = state["n"].to(self.n.device), state["x"].to(self.x.device)

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
    grid = chain_grid(sched.T, x0.device)  # (51,) 981..1, -1
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
    raise ValueError(f"--cd_loss must be l2 or huber, got {loss!r}")


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
