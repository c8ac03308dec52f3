"""Exercise 3: the ShortFT chain (PAPER.md Sec. 3; shortft.py).

Fill in the gaps marked TODO(student), then check:  python -m pytest exercises/check_ex3_chain.py
One ShortFT sample for k segments (groups of the DDIM-50 chain, each ending at its edge s_j), in
progressive phase `phase` (0-based):

    segments 0 .. phase-1:  real base DDIM steps
    segment  phase:         real base DDIM steps
    each later segment j:   shortcut jump from its first timestep to s_j (frozen student), then one base step at s_j

For k = 4, phase 0: x_T --(981..761)--> x_741 --[741->501]--> x_501 --(501)--> x_481 --[481->261]-->
x_261 --(261)--> x_241 --[241->1]--> x_1 --(1)--> x_0.
The building blocks are imported below: base_step and next_t (shortft.py), jump (consistency.py, or your
exercise 2). Do not call shortft.shortft_chain or shortft.real_segment: they are what your answer is
compared with. Hints: exercises/README.md, exercise 3.
"""
import torch

from consistency import jump
from shortft import base_step, next_t


def shortft_chain(model, student, sched, x_T, groups, phase=0):
    """x_0 of one ShortFT sample (PAPER.md Sec. 3, the diagram). model, student: eps-predictors
    (x, t_vec) -> eps; groups: the segments, lists of descending timesteps, e.g. [[981..761], ..., [241..1]]."""
    # TODO(student): x_0, shape (B, C, H, W), of the diagram above, differentiable into the model's LoRA.
    # Where the reward's gradient may flow (PAPER.md Sec. 3): into the base model's call at the last timestep
    # of segment `phase` (truncated backprop: no earlier call of that segment, and nothing of the segments
    # before it, which P-Training has finished with), into every base call after it, and through each frozen
    # shortcut's input. It must never reach x_T, and no call it cannot reach may build a graph
    raise NotImplementedError("exercise 3: shortft_chain")
