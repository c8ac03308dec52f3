"""Exercise 8 (experiment): the distilled shortcut vs the naive jump (PAPER.md Sec. 2 and 4, item 2;
consistency.py, benchmarks/bench_shortcut.py).

Inside the ShortFT chain a shortcut jumps over a whole segment, from its first timestep to its edge
(741 -> 501, 481 -> 261, 241 -> 1 for k = 4). The naive jump is one DDIM step of the base model over
the whole span; the distilled student was trained to land where the base model's real DDIM steps land.
Measure, from states on the base model's own DDIM-50 chains, how far each jump lands from the real
chain's point at the edge, for the distilled student and for the naive jump.

Fill in the gaps marked TODO(student) and write your PREDICTION first, then:

    python -m pytest exercises/check_ex8_shortcut.py     # is the measurement right? (seconds)
    python -m exercises.ex8_shortcut                     # the experiment (about a minute on a laptop CPU)
"""

import torch

import ddpm
from consistency import jump

# TODO(student): before you run it, predict in a sentence: on which spans does distillation help most, and
# by how much? Is the distilled student closer than the naive jump everywhere?
PREDICTION = ""


def real_chain(base, sched, x_t, t, s, timesteps):
    """The base model's real DDIM steps (Song et al. 2021, Eq. 12, eta 0) from timestep t down to s along the
    descending chain `timesteps` (t on it; s on it, or -1 for x_0): what the shortcut t -> s stands in for."""
    # TODO(student): x_s, shape (B, C, H, W): one base call and one DDIM step per timestep of the chain from t
    # down to the last one above s, each step landing on the chain's next timestep (the last one on s). The
    # network is called as the samplers call it, with a (B,) long tensor of the timestep
    raise NotImplementedError("exercise 8: real_chain")


def span_error(jumper, base, sched, x_t, t, s, timesteps):
    """Per sample (B,): the mean squared distance, over the C x H x W values, between where the shortcut
    S(x_t, t -> s) of `jumper` lands (PAPER.md Sec. 4, item 2; the jump of consistency.py) and where the base
    model's real chain from the same x_t lands at s."""
    # TODO(student): a (B,) tensor, one error per noise (the experiment bootstraps over them): 0 for a jumper
    # that preserves the base's trajectory exactly. Which network jumps and which one draws the target matters
    raise NotImplementedError("exercise 8: span_error")


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
