"""Exercise 7 (experiment): truncation depth vs gradient fidelity (PAPER.md Sec. 1; DRaFT-K, Clark et al. 2024).
Reference solution.

DRaFT-K backpropagates through the last K of the 50 DDIM steps only. How close is its gradient to the
full chain's? Measure the cosine between the DRaFT-K gradient and the full DDIM-50 gradient (K = 50) on
the classroom base with a LoRA, for K = 1 .. 50, and place the ShortFT chain (7 calls with a graph)
among them.

    python -m pytest exercises/check_ex7_truncation.py     # is the measurement right? (seconds)
    python -m exercises.ex7_truncation                     # the experiment (about two minutes on a 2-core CPU)
"""

import torch

import ddpm

PREDICTION = "cosine rises with K, slowly at first; ShortFT sits near DRaFT-K for a K of about 10"


def ddim_call(model, sched, x, timesteps, i):
    """Step i of the chain: x_{t_i} -> x_{t_{i+1}} (the last step lands on x_0, s = -1)."""
    t, s = timesteps[i], (timesteps[i + 1] if i + 1 < len(timesteps) else -1)
    return ddpm.ddim_step(sched, x, model(x, torch.full((x.shape[0],), t, dtype=torch.long)), t, s)


def flatten(grads, params):
    """One vector of a gradient list (None, for a parameter the reward does not reach: zeros)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def truncated_gradient(model, sched, x_T, timesteps, K, reward, params):
    """The DRaFT-K gradient (Clark et al. 2024; baselines.draft_chain): d/d params of the mean reward over the
    batch, mean_b r(x_0^b), where x_0 is the DDIM chain over `timesteps` from x_T and only the last K calls keep
    a graph (the first len(timesteps) - K run under no_grad). One flat vector (flatten). K = len(timesteps) is
    the full gradient."""
    x = x_T  # (B, C, H, W)
    with torch.no_grad():  # the truncated part: no graph, no gradient
        for i in range(len(timesteps) - K):
            x = ddim_call(model, sched, x, timesteps, i)
    for i in range(len(timesteps) - K, len(timesteps)):  # the last K calls, with a graph
        x = ddim_call(model, sched, x, timesteps, i)
    r = reward(x).mean()  # mean over the batch
    return flatten(torch.autograd.grad(r, params, allow_unused=True), params)


def cosine(a, b):
    """cos(a, b) = <a, b> / (|a| |b|) of two flat vectors (0 if either is zero)."""
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-30))


def experiment(quick=False):
    """Noise by noise, the cosine of each DRaFT-K gradient (your truncated_gradient) with the full DDIM-50
    gradient of the same noise, and |g_K| / |g_full|; the ShortFT chain (phase 0) placed among them. Each
    number is the mean over the noises [95 % bootstrap interval]. The chain's states are computed once per
    noise, and DRaFT-K starts from the state one call before its cut: the same gradient, since nothing that
    runs before the cut carries any."""
    import shortft
    from exercises import lab

    lab.show_prediction(PREDICTION)
    clock, L = lab.Clock(), lab.load()
    ft = lab.finetunable(L, tlora=False)  # one LoRA, as the baselines train; B = 0: the start of fine-tuning
    params = lab.lora_parameters(ft)
    x_T = lab.noise(1 if quick else 16, seed=0)
    Ks = [1, 50] if quick else [1, 2, 5, 10, 20, 35, 50]
    cos, ratio = {K: [] for K in Ks + ["ShortFT"]}, {K: [] for K in Ks + ["ShortFT"]}
    for n in range(len(x_T)):  # one noise at a time
        xs = [x_T[n:n + 1]]  # the chain's states x_{t_0} = x_T, x_{t_1}, ..., (1, C, H, W) each
        with torch.no_grad():  # the states only; every gradient below recomputes its calls
            for i in range(len(L.steps) - 1):
                xs.append(ddim_call(ft, L.sched, xs[-1], L.steps, i))
        full = truncated_gradient(ft, L.sched, xs[0], L.steps, 50, L.reward, params)
        for K in Ks:
            j = max(len(L.steps) - K - 1, 0)  # one call before the cut, under no_grad
            g = full if K == 50 else truncated_gradient(ft, L.sched, xs[j], L.steps[j:], K, L.reward, params)
            cos[K].append(cosine(g, full))
            ratio[K].append(float(g.norm() / full.norm()))
        x0 = shortft.shortft_chain(ft, L.shortcut, L.sched, xs[0], L.groups, phase=0)  # the project's ShortFT chain
        g = flatten(torch.autograd.grad(L.reward(x0).mean(), params, allow_unused=True), params)
        cos["ShortFT"].append(cosine(g, full))
        ratio["ShortFT"].append(float(g.norm() / full.norm()))
    print(f"the classroom base with LoRA rank {params[0].shape[0] if params else 0}, reward log p(ship); mean over "
          f"{len(x_T)} noises [95 % bootstrap interval] of each noise's own numbers")
    print(f"{'chain':>18s} {'calls with a graph':>19s} {'cos with full':>22s} {'|g| / |full|':>22s}")
    for K in Ks + ["ShortFT"]:
        name, calls = (f"DRaFT-{K}", K) if K != "ShortFT" else ("ShortFT (phase 0)", 7)
        print(f"{name:>18s} {calls:19d} {lab.mean_ci(cos[K], 3, True):>22s} {lab.mean_ci(ratio[K], 3):>22s}")
    print(f"({clock})")


if __name__ == "__main__":
    from exercises import lab

    lab.run(experiment)
