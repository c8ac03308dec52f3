"""Exercise 3: the ShortFT chain (PAPER.md Sec. 3; shortft.py).

Fill in the gaps marked TODO(student), then check:  python -m pytest exercises/check_ex3_chain.py
One ShortFT sample for k segments (groups of the DDIM-50 chain, each ending at its edge s_j), in
progressive phase `phase` (0-based):

    segments 0 .. phase-1:  real base DDIM steps, no gradient at all
    segment  phase:         real base DDIM steps, only the last one (at the edge) keeps a graph
    each later segment j:   shortcut jump g[0] -> s_j (frozen student), then one base step at s_j

For k = 4, phase 0: x_T --(981..761)--> x_741 --[741->501]--> x_501 --(501)--> x_481 --[481->261]-->
x_261 --(261)--> x_241 --[241->1]--> x_1 --(1)--> x_0.
Use base_step, next_t (shortft.py) and jump (consistency.py or your exercise 2); do not call
shortft.shortft_chain or shortft.real_segment: they are what your answer is compared with.
"""
import torch

from consistency import jump
from shortft import base_step, next_t


def shortft_chain(model, student, sched, x_T, groups, phase=0):
    """x_0 of one ShortFT sample (PAPER.md Sec. 3, the diagram). model, student: eps-predictors
    (x, t_vec) -> eps; groups: the segments, lists of descending timesteps, e.g. [[981..761], ..., [241..1]]."""
    x = x_T  # (B, C, H, W), at the chain's first timestep groups[0][0]
    # TODO(student): the real part, segments 0 .. phase: base_step(model, sched, x, t, next_t(groups, j, i))
    # for every timestep; under torch.no_grad() except the last step of segment `phase` (truncated backprop)
    # TODO(student): the short part, each later segment g = groups[j]: jump from g[0] to g[-1] with the
    # student, then one base step at g[-1]
    raise NotImplementedError("exercise 3: shortft_chain")
