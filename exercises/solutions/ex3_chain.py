"""Exercise 3: the ShortFT chain (PAPER.md Sec. 3; shortft.py).

Reference solution. One ShortFT sample for k segments (groups of the DDIM-50 chain, each ending at
its edge s_j), in progressive phase `phase` (0-based):

    segments 0 .. phase-1:  real base DDIM steps, no gradient at all
    segment  phase:         real base DDIM steps, only the last one (at the edge) keeps a graph
    each later segment j:   shortcut jump g[0] -> s_j (frozen student), then one base step at s_j

For k = 4, phase 0: x_T --(981..761)--> x_741 --[741->501]--> x_501 --(501)--> x_481 --[481->261]-->
x_261 --(261)--> x_241 --[241->1]--> x_1 --(1)--> x_0.
"""
import torch

from consistency import jump
from shortft import base_step, next_t


def shortft_chain(model, student, sched, x_T, groups, phase=0):
    """x_0 of one ShortFT sample (PAPER.md Sec. 3, the diagram). model, student: eps-predictors
    (x, t_vec) -> eps; groups: the segments, lists of descending timesteps, e.g. [[981..761], ..., [241..1]]."""
    x = x_T  # (B, C, H, W), at the chain's first timestep groups[0][0]
    for j in range(phase + 1):  # the real part: segments 0 .. phase
        g = groups[j]
        with torch.no_grad():  # truncated backprop: every step before the segment's last keeps no graph
            for i, t in enumerate(g[:-1]):
                x = base_step(model, sched, x, t, next_t(groups, j, i))
        with torch.set_grad_enabled(j == phase):  # the edge step of segment `phase` carries the gradient
            x = base_step(model, sched, x, g[-1], next_t(groups, j, len(g) - 1))
    for j in range(phase + 1, len(groups)):  # the short part
        g = groups[j]
        x = jump(student, sched, x, g[0], g[-1])  # shortcut g[0] -> s_j: frozen, the gradient passes through x
        x = base_step(model, sched, x, g[-1], next_t(groups, j, len(g) - 1))  # the base step at s_j
    return x  # (B, C, H, W) x_0
