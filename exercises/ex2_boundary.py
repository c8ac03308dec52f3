"""Exercise 2: the consistency boundary parameterisation of the shortcut (PAPER.md Sec. 4, item 2; consistency.py).

Fill in the gaps marked TODO(student), then check:  python -m pytest exercises/check_ex2_boundary.py
The shortcut S(x_t, t -> s_j) jumps from t to the segment edge s_j below it. The student network
predicts eps and the jump is one DDIM step (Song et al. 2021, Eq. 12, eta 0: ddpm.ddim_step, or your
exercise 1), so the boundary condition of consistency models (Song et al. 2023, Sec. 3),
S(x_s, s -> s) = x_s, must hold exactly, whatever the network outputs. Do not call consistency.edge_of
or consistency.jump: they are what your answer is compared with. Hints: exercises/README.md, exercise 2.
"""
import torch

import ddpm


def edge_of(t, edges):
    """The edge a timestep jumps to (Hyper-SD segments): the largest edge strictly below t, or -1
    (= x_0) when no edge lies below t. t: int; edges: descending ints, e.g. [761, 501, 261, 1]."""
    # TODO(student): an int. Segment j is (s_{j+1}, s_j], so an edge belongs to the segment below it:
    # 762 jumps to 761, 761 to 501, and 1 (the last edge) to -1, the clean image
    raise NotImplementedError("exercise 2: edge_of")


def as_vec(t, x):
    """An int or (B,) tensor of timesteps as a (B,) long tensor on x's device."""
    return torch.as_tensor(t, dtype=torch.long, device=x.device).expand(x.shape[0])  # (B,)


def jump(student, sched, x_t, t, s):
    """The shortcut S(x_t, t -> s) of Song et al. 2023, Sec. 3, parameterised by one DDIM step (Song et al.
    2021, Eq. 12, eta 0) with the student's eps. t, s: int or (B,) long tensors, one pair per sample."""
    # TODO(student): x_s, shape (B, C, H, W), sample by sample: the DDIM jump with the student's eps at (x_t, t)
    # where t lies above s, and x_t itself, bit for bit, where t equals s (the boundary condition must not rely
    # on a step from s to s being the identity: it is, only in exact arithmetic). The gradient must reach
    # x_t through both the DDIM formula and the student's input
    raise NotImplementedError("exercise 2: jump")
