"""Does the shortcut stand in for the real chain, in value and in gradient? From 16 fixed noises, the
real DDIM-50 chain runs to x_741 (segment 1); from there the real rest of the chain and ShortFT's
short rest (a jump and a base step per segment) with the distilled shortcut and with the naive one
(the base's own DDIM jump) each run to x_0. Printed: the mean squared distance of each short x_0 to the
real x_0, and the per-sample cosine and norm ratio of dr/dx_741 (r = classifier:ship) through each
short rest against the real one. Needs ddpm/, shortcut/ and classifier/ checkpoints in MODELS_DIR.

    python benchmarks/shortcut_adjoint.py --models=out
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddpm
from sftlib.models import load_ddpm, load_naive_shortcut, load_reward, load_shortcut
from shortft import segment_groups, base_step, next_t
from consistency import jump
from sftlib import config
from sftlib.common import UserError, run_main

DEFAULTS = dict(models="out")


def main(argv):
    M = dict(DEFAULTS, **config.parse_overrides(argv, DEFAULTS, description=__doc__))["models"]
    for stage in ("ddpm", "shortcut", "classifier"):
        if not os.path.isfile(f"{M}/{stage}/ckpt.pt"):
            raise UserError(f"--models={M} has no {stage}/ckpt.pt")
    base, sched, _ = load_ddpm(f'{M}/ddpm/ckpt.pt', 'cpu')
    student, ssched, _, edges = load_shortcut(f'{M}/shortcut/ckpt.pt', 'cpu')
    naive = load_naive_shortcut(f'{M}/ddpm/ckpt.pt', 'cpu')
    reward = load_reward('classifier:ship', M, 'cpu')
    steps = ddpm.ddim_timesteps(1000, 50)
    groups = segment_groups(steps, edges)
    x_T = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x = x_T
        for i, t in enumerate(groups[0]):
            x = base_step(base, sched, x, t, next_t(groups, 0, i))
    x741 = x.clone()
    def real_rest(x):
        for j in range(1, len(groups)):
            for i, t in enumerate(groups[j]):
                x = base_step(base, sched, x, t, next_t(groups, j, i))
        return x
    def short_rest(x, st):
        for j in range(1, len(groups)):
            g = groups[j]
            x = jump(st, sched, x, g[0], g[-1])
            x = base_step(base, sched, x, g[-1], next_t(groups, j, len(g) - 1))
        return x
    out = {}
    for name, f in (('real', real_rest), ('distilled', lambda x: short_rest(x, student)), ('naive', lambda x: short_rest(x, naive))):
        xi = x741.clone().requires_grad_(True)
        x0 = f(xi)
        g, = torch.autograd.grad(reward(x0).sum(), xi)
        out[name] = (g, x0.detach())
    for name in ('distilled', 'naive'):
        g, x0 = out[name]
        gr, x0r = out['real']
        cos = torch.nn.functional.cosine_similarity(g.flatten(1), gr.flatten(1)).mean().item()
        print(f'{name}: per-sample cos(dr/dx741 short, real) {cos:.3f}, norm ratio {(g.flatten(1).norm(dim=1)/gr.flatten(1).norm(dim=1)).mean():.3f}, x0 MSE to real {((x0-x0r)**2).mean():.4f}')
    print('sched clip', sched.clip_x0)


if __name__ == "__main__":
    run_main(main)
