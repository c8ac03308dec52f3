"""Exercise 7 (experiment): truncation depth vs gradient fidelity (PAPER.md Sec. 1; DRaFT-K, Clark et al. 2024).
Reference solution.

DRaFT-K backpropagates through the last K of the 50 DDIM steps only. How close is its gradient to the
full chain's? Measure the cosine between the DRaFT-K gradient and the full DDIM-50 gradient (K = 50) on
the classroom base with a LoRA, for K = 1 .. 50, and place the ShortFT chain (7 calls with a graph)
among them.

    python -m pytest exercises/check_ex7_truncation.py     # is the measurement right? (seconds)
    python -m exercises.ex7_truncation                     # the experiment (about a minute on a laptop CPU)
"""

import torch

import ddpm

PREDICTION = "cosine rises with K, slowly at first; ShortFT sits near DRaFT-K for a K of about 10"


def ddim_call(model, sched, x, steps, i):
    """Step i of the chain: x_{t_i} -> x_{t_{i+1}} (the last step lands on x_0, s = -1)."""
    t, s = steps[i], (steps[i + 1] if i + 1 < len(steps) else -1)
    return ddpm.ddim_step(sched, x, model(x, torch.full((x.shape[0],), t, dtype=torch.long)), t, s)


def flatten(grads, params):
    """One vector of a gradient list (None, for a parameter the reward does not reach: zeros)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def truncated_gradient(model, sched, x_T, steps, K, reward, params):
    """The DRaFT-K gradient: d/d params of the mean reward over the batch, mean_b r(x_0^b), where x_0 is
    the DDIM chain over `steps` from x_T and only the last K calls keep a graph (the first len(steps) - K
    run under no_grad). One flat vector (flatten). K = len(steps) is the full gradient."""
    x = x_T  # (B, C, H, W)
    with torch.no_grad():  # the truncated part: no graph, no gradient
        for i in range(len(steps) - K):
            x = ddim_call(model, sched, x, steps, i)
    for i in range(len(steps) - K, len(steps)):  # the last K calls, with a graph
        x = ddim_call(model, sched, x, steps, i)
    r = reward(x).mean()  # mean over the batch
    return flatten(torch.autograd.grad(r, params, allow_unused=True), params)


def cosine(a, b):
    """cos(a, b) = <a, b> / (|a| |b|) of two flat vectors (0 if either is zero)."""
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-30))


def experiment(quick=False):
    import shortft
    from exercises import lab

    lab.show_prediction(PREDICTION)
    clock, L = lab.Clock(), lab.load()
    ft = lab.finetunable(L, tlora=False)  # one LoRA, as the baselines train; B = 0: the start of fine-tuning
    params = lab.lora_parameters(ft)
    x_T = lab.noise(1 if quick else 4, seed=0)
    Ks = [1, 50] if quick else [1, 2, 5, 10, 20, 30, 40, 50]
    full = truncated_gradient(ft, L.sched, x_T, L.steps, 50, L.reward, params)
    print(f"the classroom base with LoRA rank {params[0].shape[0] if params else 0}, reward log p(ship), "
          f"{len(x_T)} noises; |full gradient| = {full.norm():.3e}")
    print(f"{'chain':>24s} {'calls with a graph':>19s} {'cos with full':>14s} {'|g| / |full|':>13s}")
    for K in Ks:
        g = full if K == 50 else truncated_gradient(ft, L.sched, x_T, L.steps, K, L.reward, params)
        print(f"{'DRaFT-' + str(K):>24s} {K:19d} {cosine(g, full):14.3f} {float(g.norm() / full.norm()):13.3f}")
    x0 = shortft.shortft_chain(ft, L.shortcut, L.sched, x_T, L.groups, phase=0)  # the project's ShortFT chain
    g = flatten(torch.autograd.grad(L.reward(x0).mean(), params, allow_unused=True), params)
    print(f"{'ShortFT (phase 0)':>24s} {7:19d} {cosine(g, full):14.3f} {float(g.norm() / full.norm()):13.3f}")
    print(f"({clock})")


if __name__ == "__main__":
    from exercises import lab

    lab.run(experiment)
