"""Exercise 6: vary the number of segments k (PAPER.md Sec. 3; consistency.segment_edges, shortft.segment_groups).

Reference solution. The DDIM-50 chain 981, 961, ..., 1 is cut into k groups of consecutive timesteps,
as even as possible: group j ends after floor((j + 1) n / k) steps. Its last timestep is the edge s_j
(k = 4: 761, 501, 261, 1). The ShortFT chain runs segment 1 for real, then one shortcut jump and one
base step per later segment.
"""
import ddpm

PREDICTION = "more segments: the x_0 gets closer to the real one and the cosine rises, at the price of a longer path"


def segment_edges(T, n_steps, k):
    """The k segment edges on the DDIM-n chain, descending (Hyper-SD's trajectory segments):
    the timestep at position floor((j + 1) n / k) - 1 of the chain, j = 0 .. k - 1."""
    if not 1 <= k <= n_steps:
        raise ValueError(f"k must be in [1, {n_steps}], got {k}")
    ts = ddpm.ddim_timesteps(T, n_steps)  # (n,) 981, 961, ..., 1 for T = 1000, n = 50
    return [ts[(j + 1) * n_steps // k - 1] for j in range(k)]


def segment_groups(timesteps, edges):
    """Split a descending chain of timesteps into consecutive groups, each ending at an edge:
    981..1 with edges [761, 501, 261, 1] -> [[981, ..., 761], [741, ..., 501], [481, ..., 261], [241, ..., 1]]."""
    if not edges or edges[-1] != timesteps[-1] or not set(edges) <= set(timesteps):
        raise ValueError(f"edges {edges} must lie on the chain and end at its last timestep {timesteps[-1]}")
    groups, current = [], []
    for t in timesteps:
        current.append(t)
        if t in edges:  # the edge closes its group
            groups.append(current)
            current = []
    return groups


def table():
    """What the chain costs and how far each shortcut jumps, for k = 1 .. 50 (no network needed)."""
    for k in (1, 2, 4, 8, 25, 50):
        groups = segment_groups(ddpm.ddim_timesteps(1000, 50), segment_edges(1000, 50, k))
        calls = len(groups[0]) + 2 * (k - 1)  # segment 1 for real, then a jump and a base step per segment
        on_path = 1 + 2 * (k - 1)  # the calls the gradient passes through (phase 0)
        longest = max(len(g) - 1 for g in groups[1:]) if k > 1 else 0  # DDIM steps one shortcut jump replaces
        edges = [g[-1] for g in groups]
        print(f"k = {k:2d}: {calls:2d} network calls, {on_path:2d} on the gradient path, longest shortcut "
              f"{longest:2d} steps; edges {edges if k <= 8 else edges[:3] + ['...']}")


def experiment(quick=False):
    """k on the classroom base, noise by noise: for each k, the ShortFT chain (phase 0) built from your
    segments, with the naive shortcut (the base's own DDIM step over each segment: only k = 4 has a distilled
    one, shown too), against the real DDIM-50 chain from the same noise (one LoRA). Columns, each the mean over
    the noises [95 % bootstrap interval]: the distance of the chain's x_0 to the real x_0; the cosine of the
    reward's gradient at the chain's x_0, dr/dx_0, with that at the real x_0; the cosine of the chain's LoRA
    gradient with the full DDIM-50 gradient; and the same with the real x_0's dr/dx_0 carried back through the
    chain, so that only the chain's Jacobians differ from full backprop; and the last two's difference, noise by
    noise (a paired interval)."""
    import numpy as np
    import torch

    import baselines
    import shortft
    from exercises import lab

    lab.show_prediction(PREDICTION)
    clock, L = lab.Clock(), lab.load()
    ft = lab.finetunable(L, tlora=False)
    params = lab.lora_parameters(ft)
    x_T = lab.noise(1 if quick else 16, seed=0)
    chains = [(str(k), k, L.base) for k in ((1, 4) if quick else (1, 2, 4, 8))]
    chains.insert(chains.index(("4", 4, L.base)) + 1, ("4, distilled", 4, L.shortcut))
    cols = {name: dict(d=[], a=[], g=[], jac=[]) for name, _, _ in chains}

    def dr_dx0(x0):
        x0 = x0.detach().requires_grad_(True)
        return torch.autograd.grad(L.reward(x0).sum(), x0)[0]  # (1, C, H, W)

    for n in range(len(x_T)):  # one noise at a time: a cosine per noise, then their mean and its interval
        x = x_T[n:n + 1]  # (1, C, H, W)
        real = baselines.full_chain(ft, L.sched, x, L.steps)  # every step with a graph
        a_real = dr_dx0(real)
        full = lab.flat(torch.autograd.grad(real, params, a_real, allow_unused=True), params)  # d r(real x_0) / d LoRA
        for name, k, jumper in chains:
            groups = segment_groups(L.steps, segment_edges(1000, 50, k))
            x0 = shortft.shortft_chain(ft, jumper, L.sched, x, groups, phase=0)
            a = dr_dx0(x0)
            g = lab.flat(torch.autograd.grad(x0, params, a, retain_graph=True, allow_unused=True), params)
            g_jac = lab.flat(torch.autograd.grad(x0, params, a_real, allow_unused=True), params)  # the real dr/dx_0
            c = cols[name]
            c["d"].append(float((x0.detach() - real.detach()).pow(2).mean()))
            c["a"].append(lab.cos(a, a_real))
            c["g"].append(lab.cos(g, full))
            c["jac"].append(lab.cos(g_jac, full))
    print(f"the classroom base, reward log p(ship), one LoRA; mean over {len(x_T)} noises [95 % bootstrap interval]; "
          f"naive shortcut unless named")
    print(f"{'k':>12s} {'path':>4s} {'jump':>4s} {'|x_0 - real x_0|^2':>27s} {'cos dr/dx_0, real x_0':>22s} "
          f"{'cos with full gradient':>22s} {'same, real dr/dx_0':>22s} {'difference, paired':>22s}")
    for name, k, _ in chains:
        groups = segment_groups(L.steps, segment_edges(1000, 50, k))
        longest = max(len(grp) - 1 for grp in groups[1:]) if k > 1 else 0
        c = cols[name]
        print(f"{name:>12s} {1 + 2 * (k - 1):4d} {longest:4d} {lab.mean_ci(c['d'], 5):>27s} {lab.mean_ci(c['a'], 2, True):>22s} "
              f"{lab.mean_ci(c['g'], 2, True):>22s} {lab.mean_ci(c['jac'], 2, True):>22s} "
              f"{lab.mean_ci(np.subtract(c['jac'], c['g']), 2, True):>22s}")
    print("path: the calls on the gradient path; jump: the longest jump in DDIM steps; difference: the last cosine minus "
          "the one before, noise by noise. k = 50 is DDIM-50 itself (every jump t -> t the identity: cosine 1, as the "
          "check shows)")
    print(f"({clock})")


if __name__ == "__main__":  # python -m exercises.ex6_segments [--quick]: the table, then the experiment
    from exercises import lab

    lab.quick_flag()  # an unknown option stops here, before the table
    table()
    lab.run(experiment)
