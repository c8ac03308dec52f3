"""Exercise 2: the consistency boundary parameterisation of the shortcut (PAPER.md Sec. 4, item 2; consistency.py).

Reference solution. The shortcut S(x_t, t -> s_j) jumps from t to the segment edge s_j below it. The
student network predicts eps and the jump is one DDIM step (Song et al. 2021, Eq. 12, eta = 0), so
the boundary condition of consistency models (Song et al. 2023, Sec. 3), S(x_s, s -> s) = x_s,
holds exactly, whatever the network outputs.
"""
import torch

import ddpm


def edge_of(t, edges):
    """The edge a timestep jumps to (Hyper-SD segments): the largest edge strictly below t, or -1
    (= x_0) when no edge lies below t. t: int; edges: descending ints, e.g. [761, 501, 261, 1]."""
    below = [e for e in edges if e < t]  # the edges strictly below t
    return max(below) if below else -1


def as_vec(t, x):
    """An int or (B,) tensor of timesteps as a (B,) long tensor on x's device."""
    return torch.as_tensor(t, dtype=torch.long, device=x.device).expand(x.shape[0])  # (B,)


def jump(student, sched, x_t, t, s):
    """The shortcut S(x_t, t -> s): Song et al. 2021, Eq. 12 (eta = 0) with the student's eps, and exactly
    x_t where t == s (Song et al. 2023, Sec. 3, the boundary condition). t, s: int or (B,) long tensors."""
    t, s = as_vec(t, x_t), as_vec(s, x_t)  # (B,), (B,)
    eps = student(x_t, t)  # (B, C, H, W)
    x_s = ddpm.ddim_step(sched, x_t, eps, t, s)  # (B, C, H, W)
    same = (t == s).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return torch.where(same, x_t, x_s)  # (B, C, H, W): not "close to" x_t at the boundary, x_t itself
