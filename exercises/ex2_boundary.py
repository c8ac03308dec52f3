"""Exercise 2: the consistency boundary parameterisation of the shortcut (PAPER.md Sec. 4, item 2; consistency.py).

Fill in the gaps marked TODO(student), then check:  python -m pytest exercises/check_ex2_boundary.py
The shortcut S(x_t, t -> s_j) jumps from t to the segment edge s_j below it. The student network
predicts eps and the jump is one DDIM step (Song et al. 2021, Eq. 12, eta = 0; use ddpm.ddim_step or
your exercise 1), so the boundary condition of consistency models (Song et al. 2023, Sec. 3),
S(x_s, s -> s) = x_s, must hold exactly, whatever the network outputs. Do not call consistency.edge_of
or consistency.jump: they are what your answer is compared with.
"""
import torch

import ddpm


def edge_of(t, edges):
    """The edge a timestep jumps to (Hyper-SD segments): the largest edge strictly below t, or -1
    (= x_0) when no edge lies below t. t: int; edges: descending ints, e.g. [761, 501, 261, 1]."""
    # TODO(student): e.g. edge_of(762) = 761, edge_of(761) = 501, edge_of(1) = -1
    raise NotImplementedError("exercise 2: edge_of")


def as_vec(t, x):
    """An int or (B,) tensor of timesteps as a (B,) long tensor on x's device."""
    return torch.as_tensor(t, dtype=torch.long, device=x.device).expand(x.shape[0])  # (B,)


def jump(student, sched, x_t, t, s):
    """The shortcut S(x_t, t -> s): Song et al. 2021, Eq. 12 (eta = 0) with the student's eps, and exactly
    x_t where t == s (Song et al. 2023, Sec. 3, the boundary condition). t, s: int or (B,) long tensors."""
    t, s = as_vec(t, x_t), as_vec(s, x_t)  # (B,), (B,)
    # TODO(student): the student's eps at (x_t, t), then one DDIM step from t to s (per sample)
    # TODO(student): where t == s, return x_t itself (bit for bit), not the DDIM step's x_s; hint: torch.where
    raise NotImplementedError("exercise 2: jump")
