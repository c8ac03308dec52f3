"""Exercise 6: vary the number of segments k (PAPER.md Sec. 3; consistency.segment_edges, shortft.segment_groups).

Fill in the gaps marked TODO(student), then check:  python -m pytest exercises/check_ex6_segments.py
and print the table for k = 1 .. 50:  python -m exercises.ex6_segments
The DDIM-50 chain 981, 961, ..., 1 is cut into k groups of consecutive timesteps,
as even as possible: group j ends after floor((j + 1) n / k) steps. Its last timestep is the edge s_j
(k = 4: 761, 501, 261, 1). The ShortFT chain runs segment 1 for real, then one shortcut jump and one
base step per later segment.
"""
import ddpm

# TODO(student): before you run the experiment, predict in a sentence: as k grows from 1 to 50, what happens
# to the distance between the chain's x_0 and the real one, and to the cosine with the full gradient?
PREDICTION = ""


def segment_edges(T, n_steps, k):
    """The k segment edges on the DDIM-n chain, descending (Hyper-SD's trajectory segments):
    the timestep at position floor((j + 1) n / k) - 1 of the chain, j = 0 .. k - 1."""
    ts = ddpm.ddim_timesteps(T, n_steps)  # (n,) 981, 961, ..., 1 for T = 1000, n = 50
    # TODO(student): raise ValueError unless 1 <= k <= n_steps; then the k edges, descending
    raise NotImplementedError("exercise 6: segment_edges")


def segment_groups(timesteps, edges):
    """Split a descending chain of timesteps into consecutive groups, each ending at an edge:
    981..1 with edges [761, 501, 261, 1] -> [[981, ..., 761], [741, ..., 501], [481, ..., 261], [241, ..., 1]]."""
    # TODO(student): walk the chain, closing a group at every edge; return the list of groups
    raise NotImplementedError("exercise 6: segment_groups")


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
    """k on the classroom base: for each k, the ShortFT chain (phase 0) built from your segments, with the
    naive shortcut (the base's own DDIM step over each segment: only k = 4 has a distilled one, shown too).
    Columns: the calls on the gradient path, the longest jump, the distance of the chain's x_0 to the real
    DDIM-50 x_0, and the cosine of the chain's gradient with the full DDIM-50 gradient (one LoRA)."""
    import torch

    import baselines
    import shortft
    from exercises import lab

    lab.show_prediction(PREDICTION)
    clock, L = lab.Clock(), lab.load()
    ft = lab.finetunable(L, tlora=False)
    params = lab.lora_parameters(ft)
    x_T = lab.noise(1 if quick else 4, seed=0)

    def gradient(x0):
        g = torch.autograd.grad(L.reward(x0).mean(), params, allow_unused=True)
        return torch.cat([(a if a is not None else torch.zeros_like(p)).reshape(-1) for a, p in zip(g, params)])

    real = baselines.full_chain(ft, L.sched, x_T, L.steps)  # every step with a graph
    full = gradient(real)
    real = real.detach()
    print(f"the classroom base, {len(x_T)} noises, reward log p(ship); naive shortcut unless named")
    print(f"{'k':>12s} {'calls on the path':>17s} {'longest jump':>12s} {'|x_0 - real x_0|^2':>18s} {'cos with full':>13s}")
    for k in ((1, 4) if quick else (1, 2, 4, 8, 16, 50)):
        groups = segment_groups(L.steps, segment_edges(1000, 50, k))
        for name, jumper in [(str(k), L.base)] + ([("4, distilled", L.shortcut)] if k == 4 else []):
            x0 = shortft.shortft_chain(ft, jumper, L.sched, x_T, groups, phase=0)
            g = gradient(x0)
            d = (x0.detach() - real).pow(2).flatten(1).mean(1)  # (B,)
            cos = float(torch.dot(g, full) / (g.norm() * full.norm()))
            longest = max(len(grp) - 1 for grp in groups[1:]) if k > 1 else 0
            print(f"{name:>12s} {1 + 2 * (k - 1):17d} {longest:12d} {float(d.mean()):18.5f} {cos:13.3f}")
    print(f"({clock})")


if __name__ == "__main__":  # python -m exercises.ex6_segments [--quick]: the table, then the experiment
    from exercises import lab

    table()
    lab.run(experiment)
