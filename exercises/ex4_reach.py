"""Exercise 4: where does the reward gradient reach? DRaFT-K vs ShortFT (PAPER.md Sec. 1-2; shortft.py).

Fill in the gaps marked TODO(student), then check:  python -m pytest exercises/check_ex4_reach.py
and print the ablation table:  python -m exercises.ex4_reach
A probe measures, for every network call of a sampling chain, whether the
reward's gradient reaches that call's output eps, and whether it reaches the initial noise x_T.
The table covers DRaFT-K, AlignProp, full backprop and the ShortFT chain, on a tiny random UNet.
"""
import torch


class Probe:
    """Wraps an eps-predictor (x, t_vec) -> eps. Each call gives back the wrapped network's eps, unchanged in
    value, and appends (t, a tensor) to self.calls such that, after the reward's backward pass, that tensor's
    .grad is dr/d(eps of that call) (B, C, H, W), or None when the call ran without a graph (under no_grad)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t):
        # TODO(student): the wrapped network's eps at (x, t), (B, C, H, W), the same values, and a record
        # (the timestep as an int, the tensor whose gradient after backward is dr/d eps of this very call).
        # Measure that gradient without changing it: the eps you give back must carry the network's own graph
        raise NotImplementedError("exercise 4: Probe.__call__")


def gradient_reach(chain, model, x_T):
    """Run the chain on the probed model from x_T, backpropagate the reward r (the sum of x_0's values), and give back
    (the timesteps whose eps received a nonzero gradient, descending, each once; whether x_T received one)."""
    # TODO(student): a pair (list of ints, bool). x_T as given may be anything (no gradient, or part of another
    # graph): measure on a copy that can receive a gradient of its own. A call, or x_T, counts as reached only
    # when a gradient exists and is not all zero; a chain that ran entirely without a graph reaches nothing
    raise NotImplementedError("exercise 4: gradient_reach")


if __name__ == "__main__":  # the ablation table: which network calls each method's gradient reaches
    import functools

    import ddpm  # run from the repository root (python -m exercises.ex4_reach), which puts it on sys.path
    import baselines
    import shortft
    from exercises.checklib import schedule64, tiny_unet

    sched, steps = schedule64(), ddpm.ddim_timesteps(1000, 50)
    groups = shortft.segment_groups(steps, [761, 501, 261, 1])
    model, student = tiny_unet(0), tiny_unet(1).requires_grad_(False)
    x_T = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    methods = {}  # name -> chain(model, x_T) -> x_0; functools.partial fixes each one's K or phase
    for K in (1, 10, 38, 39):
        methods[f"DRaFT-{K}"] = functools.partial(lambda m, x, K: baselines.draft_chain(m, sched, x, steps, K), K=K)
    methods["AlignProp (cut at step 40)"] = lambda m, x: baselines.alignprop_chain(m, sched, x, steps, (40, 40))
    methods["full backprop"] = lambda m, x: baselines.full_chain(m, sched, x, steps)
    for i in range(4):
        methods[f"ShortFT, phase {i}"] = functools.partial(
            lambda m, x, i: shortft.shortft_chain(m, student, sched, x, groups, phase=i), i=i)
    print(f"{'method':28s} {'calls reached':>13s} {'segment 1 (981..761)':>21s} {'x_T':>4s}   timesteps reached")
    for name, chain in methods.items():
        reached, x_T_reached = gradient_reach(chain, model, x_T)
        seg1 = any(t in groups[0] for t in reached)
        shown = reached if len(reached) <= 6 else reached[:3] + ["..."] + reached[-2:]
        print(f"{name:28s} {len(reached):13d} {str(seg1):>21s} {str(x_T_reached):>4s}   {shown}")
