"""Exercise 4: where does the reward gradient reach? DRaFT-K vs ShortFT (PAPER.md Sec. 1-2; shortft.py).

Reference solution. A probe measures, for every network call of a sampling chain, whether the
reward's gradient reaches that call's output eps, and whether it reaches the initial noise x_T.
Run `python -m exercises.solutions.ex4_reach` (or `python -m exercises.ex4_reach` for yours) for
the table of DRaFT-K, AlignProp, full backprop and the ShortFT chain on a tiny random UNet.
"""
import torch


class Probe:
    """Wraps an eps-predictor (x, t_vec) -> eps: each call returns eps + delta with delta a zero
    tensor that requires grad, and records (t, delta). After backward, delta.grad = dr/d(eps of that
    call); it stays None when the call ran without a graph (torch.no_grad)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t):
        eps = self.model(x, t)  # (B, C, H, W)
        delta = torch.zeros_like(eps, requires_grad=True)  # (B, C, H, W) the probe: changes no value
        self.calls.append((int(t[0]), delta))
        return eps + delta


def gradient_reach(chain, model, x_T):
    """Run x_0 = chain(probed model, x_T), backpropagate the reward r = sum(x_0) and return
    (the timesteps whose eps received a nonzero gradient, descending; whether x_T received one)."""
    probe = Probe(model)
    x_T = x_T.detach().clone().requires_grad_(True)  # (B, C, H, W) a leaf we can ask for its gradient
    x_0 = chain(probe, x_T)  # (B, C, H, W)
    if not x_0.requires_grad:  # the whole chain ran without a graph: nothing is reached
        return [], False
    x_0.sum().backward()
    reached = {t for t, delta in probe.calls if delta.grad is not None and delta.grad.abs().sum() > 0}
    x_T_reached = x_T.grad is not None and bool(x_T.grad.abs().sum() > 0)
    return sorted(reached, reverse=True), x_T_reached


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
