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

Signal and noise. One batch's gradient is a noisy estimate of the gradient that matters, that of the mean
reward over the noise distribution: at batch 8 two batches' full gradients can point apart (cosine < 0).
So a method is judged against a HELD-OUT truth, the full DDIM-50 gradient G_H of the mean reward over
noises no method trains on (full_gradient): its held-out cosine cos(g, G_H) and the held-out first-order
gain G_H . g/|g| of a unit step along it (the directional derivative of the held-out mean reward;
realised_gain takes the finite step). The same-batch cosine (with the full gradient of the method's own
batch) is kept as a column: it says how faithful a method is to backprop on its batch, not whether the
step helps elsewhere. Under g_i = mu + noise, independent batches' full gradients give |mu|^2 and the
per-sample noise (snr_fit), hence the cosine any batch size B can reach with the truth (cosine_with_truth).
"""
import contextlib
import math

import torch

import ddpm
from baselines import SHORT_CHAIN, method_chain
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
            eps = model(xs[-1], ddpm.t_batch(t, xs[-1]))
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
        x_next = ddpm.ddim_step(sched, x, model(x, ddpm.t_batch(t, x)), t, s)  # the call, recomputed with a graph
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
    shortft = method in SHORT_CHAIN
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


def full_gradient(model, sched, x_T, timesteps, reward, params, batch=8):
    """The full DDIM-50 gradient of the MEAN reward over all len(x_T) noises, computed `batch` noises at a
    time (full_decomposition, summed over calls and batches). On a held-out set it is the study's truth G_H.
    Returns (gradient (P,), rewards (N,))."""
    g, rs = 0, []
    for i in range(0, len(x_T), batch):
        d = full_decomposition(model, sched, x_T[i:i + batch], timesteps, reward, params, len(x_T))
        g, rs = g + d["calls"].sum(0), rs + [d["reward"]]
    return g, torch.cat(rs)


def batch_gradients(methods, ft, sched, x_T, timesteps, reward, params, students=None, generator=None, draft_k=1, **kw):
    """{method: its gradient (P,) of the mean reward over the batch x_T}, and the batch's full decomposition.
    "full" and "draft" (DRaFT-K, K = draft_k) come from one full_decomposition (DRaFT-K is exactly its last K
    calls); every other method is autograd through baselines.method_chain (method_gradient). students: name ->
    (eps-predictor, student, method) for the short-chain rows (e.g. "shortft_naive": (ft, frozen base,
    "shortft_naive"); a row named otherwise, e.g. a k = 8 shortcut's, names its method); kw: method_gradient's
    options (phase, lv_n, window, drtune_k)."""
    dec = full_decomposition(ft, sched, x_T, timesteps, reward, params)
    out = {}
    for m in methods:
        if m == "full":
            out[m] = dec["calls"].sum(0)
        elif m == "draft":
            out[m] = dec["calls"][-draft_k:].sum(0)
        else:
            model, student, kind = (students or {}).get(m, (ft, None, m))
            out[m] = method_gradient(kind, model, student, sched, x_T, timesteps, reward, params, generator=generator,
                                     draft_k=draft_k, **kw)
    return out, dec


def step_measures(g, same_batch_full, heldout):
    """How one method's gradient g on a training batch does: cos_same, its cosine with the full gradient of the
    same batch (faithfulness to backprop there); cos_heldout, its cosine with the held-out full gradient G_H
    (the headline); gain, the held-out first-order gain of a unit step d = g / |g|: G_H . d, the directional
    derivative of the held-out mean reward (reward per unit parameter norm); norm, |g|."""
    d = g / g.norm().clamp(min=1e-30)
    return dict(cos_same=cosine(g, same_batch_full), cos_heldout=cosine(g, heldout), gain=float(torch.dot(heldout, d)),
                norm=float(g.norm()))


@torch.no_grad()  # sampling only
def mean_reward(model, sched, x_T, timesteps, reward, batch=64):
    """The mean reward of DDIM samples (over `timesteps`) from the noises x_T, `batch` at a time."""
    return float(torch.cat([reward(ddpm.ddim_sample(model, sched, x_T[i:i + batch], timesteps))
                            for i in range(0, len(x_T), batch)]).mean())


@contextlib.contextmanager
def moved(params, delta):
    """Inside the block, params += delta (one flat vector over params, in their order); restored exactly after."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        off = 0
        for p in params:
            p.add_(delta[off:off + p.numel()].view_as(p).to(p))
            off += p.numel()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def realised_gain(model, sched, x_T, timesteps, reward, params, direction, eta, before=None, batch=64):
    """The held-out gain of a finite step: the mean reward of DDIM samples from x_T after params move by
    eta * direction / |direction|, minus before (the mean reward at the current params; computed if None)."""
    if before is None:
        before = mean_reward(model, sched, x_T, timesteps, reward, batch)
    with moved(params, eta * direction / direction.norm().clamp(min=1e-30)):
        return mean_reward(model, sched, x_T, timesteps, reward, batch) - before


def snr_fit(grads, sizes):
    """Signal and noise of independent unbiased estimates g_i = mu + noise_i of one mean gradient, g_i a mean
    over sizes[i] samples (noise covariance Sigma / sizes[i]): mu2 = the mean of g_i . g_j over pairs i < j (an
    unbiased |mu|^2, as their noises are independent), noise = the mean of sizes[i] (|g_i|^2 - mu2) (trace Sigma,
    the per-sample noise), snr = mu2 / noise (per sample; <= 0 where the noise swamps the estimate)."""
    if len(grads) < 2:
        raise ValueError("snr_fit needs at least two independent gradients")
    G = torch.stack(list(grads)).double()  # (m, P)
    dots = G @ G.T  # (m, m)
    m = len(grads)
    mu2 = float((dots.sum() - dots.diagonal().sum()) / (m * (m - 1)))
    noise = sum(n * (float(dots[i, i]) - mu2) for i, n in enumerate(sizes)) / m
    return dict(mu2=mu2, noise=noise, snr=mu2 / noise if noise > 0 else math.inf)


def cosine_with_truth(snr, B):
    """The cosine of a B-sample full gradient with the true mean gradient mu when per-sample snr = |mu|^2 / tr
    Sigma (high dimension: |g|^2 ~ |mu|^2 + tr Sigma / B): sqrt(B snr / (1 + B snr)); B = inf: 1. It counts all
    the noise as if orthogonal to mu; noise along mu (per-sample gradients of one direction, unequal lengths)
    does not turn g, so where there is much of it the true cosine is higher (a pessimistic estimate)."""
    if snr <= 0:
        return 0.0
    return 1.0 if math.isinf(B) or math.isinf(snr) else math.sqrt(B * snr / (1 + B * snr))


def batch_for_cosine(snr, c):
    """The batch size whose full gradient has cosine c with the truth (the inverse of cosine_with_truth)."""
    return math.inf if snr <= 0 else c * c / ((1 - c * c) * snr)


def signal_cosine(grads, heldout, mu2):
    """A debiased estimate of cos(E g, mu) for a method's independent batch gradients g_i: the mean of g_i . G_H
    (G_H the held-out gradient, independent of every g_i: an unbiased E g . mu) over sqrt(|E g|^2 mu2), |E g|^2
    from the pairs g_i . g_j (i < j) and mu2 from snr_fit of the full gradients. nan where an estimate is <= 0."""
    G = torch.stack(list(grads)).double()
    m, dots = len(G), G @ G.T
    own = float((dots.sum() - dots.diagonal().sum()) / (m * (m - 1)))
    cross = float((G @ heldout.double()).mean())
    return cross / math.sqrt(own * mu2) if own > 0 and mu2 > 0 else math.nan


def growth(batch_grads, heldout):
    """How the held-out cosine of the full gradient grows with the batch: {k: [cos(sum of k disjoint batch
    gradients, G_H), ...]} for k = 1, 2, 4, ... and k = len(batch_grads), over consecutive groups of k batches."""
    m = len(batch_grads)
    ks = sorted({2 ** i for i in range(m.bit_length()) if 2 ** i <= m} | {m})
    return {k: [cosine(sum(batch_grads[i:i + k]), heldout) for i in range(0, m - k + 1, k)] for k in ks}
