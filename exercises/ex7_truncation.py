"""Exercise 7 (experiment): truncation depth vs gradient fidelity (PAPER.md Sec. 1; DRaFT-K, Clark et al. 2024).

DRaFT-K backpropagates through the last K of the 50 DDIM steps only. How close is its gradient to the
full chain's? Measure the cosine between the DRaFT-K gradient and the full DDIM-50 gradient (K = 50) on
the classroom base with a LoRA, for K = 1 .. 50, and place the ShortFT chain (7 calls with a graph)
among them.

Fill in the gaps marked TODO(student) and write your PREDICTION first, then:

    python -m pytest exercises/check_ex7_truncation.py     # is the measurement right? (seconds)
    python -m exercises.ex7_truncation                     # the experiment (about two minutes on a 2-core CPU)
"""

import torch

import ddpm

# TODO(student): before you run it, predict in a sentence: how does the cosine grow with K? Where among the
# DRaFT-K does the ShortFT chain land, with its 7 calls?
PREDICTION = ""


def ddim_call(model, sched, x, timesteps, i):
    """Step i of the chain: x_{t_i} -> x_{t_{i+1}} (the last step lands on x_0, s = -1)."""
    t, s = timesteps[i], (timesteps[i + 1] if i + 1 < len(timesteps) else -1)
    return ddpm.ddim_step(sched, x, model(x, torch.full((x.shape[0],), t, dtype=torch.long)), t, s)


def flatten(grads, params):
    """One vector of a gradient list (None, for a parameter the reward does not reach: zeros)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def truncated_gradient(model, sched, x_T, timesteps, K, reward, params):
    """The DRaFT-K gradient (Clark et al. 2024; baselines.draft_chain): the gradient w.r.t. params of the batch
    mean of the reward of x_0, where x_0 is the DDIM chain (eta 0) over `timesteps` from x_T and the gradient is
    cut before the last K network calls. One flat vector (P,), in the order of params."""
    # TODO(student): a (P,) vector, the helpers above give one call of the chain and the flat layout. Only the
    # last K calls may build a graph: the earlier ones carry no gradient in DRaFT-K, and a graph over them would
    # cost memory for nothing. K equal to the chain's length is the full gradient; the reward is a per-image (B,)
    # tensor, and a parameter the gradient does not reach counts as zero
    raise NotImplementedError("exercise 7: truncated_gradient")


def cosine(a, b):
    """The cosine similarity of two flat vectors (sftlib/gradstudy.py's cosine), as a Python float."""
    # TODO(student): a float in [-1, 1], the same for any positive rescaling of a or b. A method whose gradient
    # reaches nothing gives a vector of zeros: its cosine with anything is 0, never NaN
    raise NotImplementedError("exercise 7: cosine")


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
