"""Exercise 8 (experiment): the distilled shortcut vs the naive jump (PAPER.md Sec. 2 and 4, item 2;
consistency.py, benchmarks/bench_shortcut.py).
Reference solution.

Inside the ShortFT chain a shortcut jumps over a whole segment, from its first timestep to its edge
(741 -> 501, 481 -> 261, 241 -> 1 for k = 4). The naive jump is one DDIM step of the base model over
the whole span; the distilled student was trained to land where the base model's real DDIM steps land.
Measure, from states on the base model's own DDIM-50 chains, how far each jump lands from the real
chain's point at the edge, for the distilled student and for the naive jump.

    python -m pytest exercises/check_ex8_shortcut.py     # is the measurement right? (seconds)
    python -m exercises.ex8_shortcut                     # the experiment (about a minute on a laptop CPU)
"""

import torch

import ddpm
from consistency import jump

PREDICTION = "the distilled student lands closer on every span, by a factor of about 2"


def real_chain(base, sched, x_t, t, s, timesteps):
    """The base model's real DDIM steps (eta = 0) from timestep t down to s along the chain `timesteps`
    (both t and s on it, or s = -1 for x_0): len(timesteps between t and s) network calls."""
    if t not in timesteps or (s != -1 and s not in timesteps) or not s < t:
        raise ValueError(f"t = {t} and s = {s} must lie on the chain (s = -1: x_0), s below t")
    i = timesteps.index(t)
    x = x_t  # (B, C, H, W)
    while True:
        t_i = timesteps[i]
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x = ddpm.ddim_step(sched, x, base(x, torch.full((x.shape[0],), t_i, dtype=torch.long)), t_i, t_next)
        if t_next == s:
            return x
        i += 1


def span_error(jumper, base, sched, x_t, t, s, timesteps):
    """Per sample (B,): the mean squared distance, over the C x H x W values, between one jump of
    `jumper` from t to s (consistency.jump) and the base model's real chain from the same x_t to s."""
    target = real_chain(base, sched, x_t, t, s, timesteps)  # (B, C, H, W)
    return (jump(jumper, sched, x_t, t, s) - target).pow(2).flatten(1).mean(1)  # (B,)


@torch.no_grad()  # measurements only
def experiment(quick=False):
    from exercises import lab

    lab.show_prediction(PREDICTION)
    clock, L = lab.Clock(), lab.load()
    x = lab.noise(2 if quick else 24, seed=0)
    spans = [(g[0], g[-1]) for g in L.groups[1:]]  # the ShortFT chain's jumps: 741 -> 501, 481 -> 261, 241 -> 1
    starts, i = {}, 0  # the base model's own chain, stopped at each span's start
    for t, s in [(L.steps[0], L.groups[0][-1])] + spans:  # 981 -> 761, then one base step, then a span, ...
        if t != L.steps[0]:
            x = real_chain(L.base, L.sched, x, L.steps[i - 1], t, L.steps)  # the base step onto the span's start
        starts[t] = x
        x = real_chain(L.base, L.sched, x, t, s, L.steps)
        i = L.steps.index(s) + 1
    print(f"the classroom base and its distilled shortcut; {len(x)} noises; mean squared distance to the real chain")
    print(f"{'span':>12s} {'DDIM steps':>10s} {'distilled':>10s} {'naive':>10s} {'mean per-noise ratio distilled / naive [95 % CI]':>48s}")
    for t, s in [(L.steps[0], L.groups[0][-1])] + spans:
        d = span_error(L.shortcut, L.base, L.sched, starts[t], t, s, L.steps)
        n = span_error(L.base, L.base, L.sched, starts[t], t, s, L.steps)
        ratio, ci = lab.bootstrap((d / n).numpy())
        note = "   (the sampler's first span; ShortFT runs it for real)" if t == L.steps[0] else ""
        print(f"{f'{t} -> {s}':>12s} {L.steps.index(s) - L.steps.index(t):10d} {float(d.mean()):10.5f} "
              f"{float(n.mean()):10.5f} {ratio:30.2f} [{ci[0]:.2f}, {ci[1]:.2f}]{note}")
    print(f"({clock})")


if __name__ == "__main__":
    from exercises import lab

    lab.run(experiment)
