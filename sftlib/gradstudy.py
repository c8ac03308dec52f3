"""The gradient study: how well does each method's gradient point where the full DDIM-50 gradient points?

Every method (shortft.py) computes the reward's gradient w.r.t. the LoRA through some cut or shortened
version of the DDIM-50 chain. The reference is full backprop through all 50 steps. This module
decomposes that reference by UNet call, with one manual reverse pass (reverse-mode autodiff by hand,
with recomputation, like gradient checkpointing):

    forward, no graph:   x_981 -> x_961 -> ... -> x_1 -> x_0,  r = mean_b r(x_0^b)
    a_0 = dr/dx_0;  for i = 49 .. 0:   (a_i, g_i) = VJP of  x_{i+1} = DDIM(x_i, eps_theta(x_i, t_i))  with a_{i+1}

a_i = dr/dx_{t_i} is the adjoint (how much x at step i can still change the reward) and g_i is the
parameter gradient contributed by call i, so the full gradient is sum_i g_i. DRaFT-K detaches the
chain before its last K calls; inside them its forward values and adjoints are the full chain's, so
its gradient is exactly sum_{i >= 50-K} g_i: one decomposition gives the whole depth sweep K = 1..50
(tests/test_gradstudy.py checks both identities against autograd through shortft.py's chains).
"""
import torch

import ddpm
from baselines import method_chain
from shortft import set_phase


def flat(grads, params):
    """One vector of a gradient list (None: zeros of that parameter's size)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def full_decomposition(model, sched, x_T, timesteps, reward, params, n_total=None):
    """The full chain's gradient of sum_b r(x_0^b) / n_total, call by call. Returns dict(
    calls: (n_steps, P) per-call parameter gradients g_i (their sum is the full gradient),
    adjoint: (n_steps + 1,) mean over samples of |dr_b/dx_{t_i}| (i = 0..49, then x_0), per sample's own r_b,
    clipped: (n_steps,) fraction of x0_hat's pixels outside [-1, 1] at each call (the hard clip zeroes their gradient),
    reward: (B,) the rewards)."""
    n_total = n_total or len(x_T)
    xs, clipped = [x_T], []
    with torch.no_grad():  # forward once, keeping only each call's input
        for i, t in enumerate(timesteps):
            s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            t_vec = torch.full((len(x_T),), t, dtype=torch.long, device=x_T.device)
            eps = model(xs[-1], t_vec)
            clipped.append(float((ddpm.predict_x0(sched, xs[-1], t, eps).abs() > 1).float().mean()))
            xs.append(ddpm.ddim_step(sched, xs[-1], eps, t, s))
    x0 = xs[-1].detach().requires_grad_(True)
    r = reward(x0)  # (B,)
    a, = torch.autograd.grad(r.sum() / n_total, x0)  # dr/dx_0, (B, C, H, W)
    adjoint = [a.flatten(1).norm(dim=1).mean().item() * n_total]
    calls = []
    for i in reversed(range(len(timesteps))):
        t, s = timesteps[i], (timesteps[i + 1] if i + 1 < len(timesteps) else -1)
        x = xs[i].detach().requires_grad_(True)
        t_vec = torch.full((len(x),), t, dtype=torch.long, device=x.device)
        x_next = ddpm.ddim_step(sched, x, model(x, t_vec), t, s)  # the call, recomputed with a graph
        out = torch.autograd.grad(x_next, [x] + params, grad_outputs=a, allow_unused=True)
        a = out[0]  # dr/dx_{t_i}
        calls.append(flat(out[1:], params))
        adjoint.append(a.flatten(1).norm(dim=1).mean().item() * n_total)
    return dict(calls=torch.stack(calls[::-1]), adjoint=torch.tensor(adjoint[::-1]),
                clipped=torch.tensor(clipped), reward=r.detach())


def method_gradient(method, ft, student, sched, x_T, timesteps, reward, params, n_total=None, phase=0,
                    generator=None, draft_k=1, lv_n=2, window=(0, 50), drtune_k=5):
    """The gradient of sum_b r(x_0^b) / n_total w.r.t. params through `method`'s training chain (as
    train_shortft.py runs it: baselines.method_chain; shortft at P-Training phase `phase`), as one vector."""
    n_total = n_total or len(x_T)
    shortft = method in ("shortft", "shortft_naive")
    if shortft:
        set_phase(ft, phase)
    x0 = method_chain(method, ft, student, sched, x_T, ft.groups, timesteps, phase, draft_k, lv_n, window, drtune_k,
                      generator=generator)
    if shortft:
        set_phase(ft, 0)
    r = reward(x0)
    copies = len(x0) // len(x_T)  # DRaFT-LV: n copies per sample, averaged
    grads = torch.autograd.grad(r.sum() / (n_total * copies), params, allow_unused=True)
    return flat(grads, params)


def cosine(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-30))
