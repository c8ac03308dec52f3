"""Exercise 11 (experiment): gradient signal-to-noise, one batch's gradient against another's (PAPER.md Sec. 1;
sftlib/gradstudy.py, benchmarks/bench_gradients.py).

Fine-tuning follows the gradient of the reward averaged over a batch of noises, an estimate of the gradient of
the mean reward over ALL noises, the one that matters. How good an estimate is it? Take one LoRA gradient per
noise, g_i (full backprop through DDIM-50, DRaFT-1 and the ShortFT chain), and compare the batch gradient of one
batch of noises with that of an independent batch: if they point apart, most of one step is noise. Compare that
with the agreement between a method and full backprop on the same batch (the fidelity exercises 6 and 7
measured), and watch how the agreement between batches grows with the batch size.

Fill in the gaps marked TODO(student) and write your PREDICTION first, then:

    python -m pytest exercises/check_ex11_snr.py     # is the measurement right? (seconds)
    python -m exercises.ex11_snr                     # the experiment (about two minutes on a 2-core CPU)
"""
import numpy as np
import torch

import ddpm

# TODO(student): before you run it, predict in a sentence: at a batch of 4 noises, how well does one batch's
# gradient agree with another batch's, compared with how well a method agrees with full backprop on its own batch?
PREDICTION = ""


def batch_cosine(grads_a, grads_b):
    """cos(g_A, g_B) between the batch gradients of two batches of noises A and B: g_A is the mean of the
    per-noise gradients g_i over the noises i in A (the rows of grads_a, (|A|, P)), g_B likewise. A Python float."""
    # TODO(student): each batch's gradient is the average of its noises' gradients; the answer is the cosine of
    # the angle between the two batch gradients
    raise NotImplementedError("exercise 11: batch_cosine")


def two_batches(n, B, rng):
    """Two disjoint batches of B noises each, drawn at random from noises 0 .. n-1 (2 B <= n): two index arrays,
    no noise in both. rng: a numpy Generator."""
    # TODO(student): draw 2 B different noises at random with rng; the first B are batch A, the other B batch B
    raise NotImplementedError("exercise 11: two_batches")


def per_noise_gradients(ft, L, x_T, params):
    """{method: (N, P)} one LoRA gradient of the reward r(x_0) per noise: full backprop through DDIM-50, DRaFT-1
    (the last call only) and the ShortFT chain (phase 0, the distilled shortcut)."""
    import shortft
    from exercises import lab

    out = {"full": [], "DRaFT-1": [], "ShortFT": []}
    for n in range(len(x_T)):
        x = x_T[n:n + 1]  # (1, C, H, W)
        for i, t in enumerate(L.steps):  # every call with a graph
            s = L.steps[i + 1] if i + 1 < len(L.steps) else -1
            if s == -1:
                x_last = x.detach()  # DRaFT-1 cuts the chain here
            x = ddpm.ddim_step(L.sched, x, ft(x, torch.full((1,), t, dtype=torch.long)), t, s)
        out["full"].append(lab.flat(torch.autograd.grad(L.reward(x).sum(), params, allow_unused=True), params))
        t = L.steps[-1]
        x0 = ddpm.ddim_step(L.sched, x_last, ft(x_last, torch.full((1,), t, dtype=torch.long)), t, -1)
        out["DRaFT-1"].append(lab.flat(torch.autograd.grad(L.reward(x0).sum(), params, allow_unused=True), params))
        x0 = shortft.shortft_chain(ft, L.shortcut, L.sched, x_T[n:n + 1], L.groups, phase=0)
        out["ShortFT"].append(lab.flat(torch.autograd.grad(L.reward(x0).sum(), params, allow_unused=True), params))
    return {m: torch.stack(g) for m, g in out.items()}


def in_their_span(G):
    """The same per-noise gradients {method: (N, P)} written in an orthonormal basis of the span of all of them
    (a QR factorisation): every dot product, hence every cosine between averages of them, is unchanged, and a
    gradient is 3 N numbers instead of P, so that thousands of batch cosines take seconds."""
    names = list(G)
    stacked = torch.cat([G[m] for m in names]).double()  # (3 N, P)
    _, R = torch.linalg.qr(stacked.T)  # stacked^T = Q R, Q (P, 3 N) orthonormal: the rows of stacked are R^T's
    return dict(zip(names, R.T.split(len(G[names[0]]))))  # {method: (N, 3 N)}


def over_splits(measure, n, B, splits=4000, seed=0, bound=1.0):
    """The mean of measure(a, b) over `splits` random pairs of disjoint batches (two_batches) of B of the n noises,
    and a 95 % jackknife interval over the noises: each noise left out in turn, the mean over the splits that do not
    use it (a random split of the n noises that misses noise i is a random split of the other n - 1, so the same
    splits serve every noise left out, and their sampling error hardly enters the interval). The interval is the
    spread that comes from which noises were drawn, not from which splits; it is kept within [-bound, bound], the
    range of the measure (a cosine: 1; a difference of two: 2)."""
    from scipy.stats import t as student_t

    rng = np.random.default_rng(seed)
    pairs = [two_batches(n, B, rng) for _ in range(splits)]
    vals = np.array([measure(a, b) for a, b in pairs])  # (splits,)
    est = float(vals.mean())
    if 2 * B >= n:  # every split uses every noise: none can be left out, no interval
        return est, [float("nan"), float("nan")]
    used = np.zeros((splits, n), dtype=bool)  # used[j, i]: split j puts noise i in one of its batches
    for j, (a, b) in enumerate(pairs):
        used[j, a] = used[j, b] = True
    loo = np.array([vals[~used[:, i]].mean() for i in range(n)])  # (n,) the mean with noise i left out
    se = float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))
    half = float(student_t.ppf(0.975, n - 1)) * se
    return est, [max(est - half, -bound), min(est + half, bound)]


def experiment(quick=False):
    from exercises import lab

    lab.show_prediction(PREDICTION)
    clock, L = lab.Clock(), lab.load()
    ft = lab.finetunable(L, tlora=False)  # one LoRA for every method, as the comparison trains them
    params = lab.lora_parameters(ft)
    x_T = lab.noise(6 if quick else 24, seed=2)  # 24: with one noise left out (the jackknife), two batches of 8 of 23
    G = in_their_span(per_noise_gradients(ft, L, x_T, params))
    n, B, splits = len(x_T), (2 if quick else 4), (200 if quick else 4000)
    print(f"the classroom base, one LoRA, reward log p(ship); one gradient per noise for {n} noises ({clock}); "
          f"each number: the mean over {splits} random pairs of disjoint batches [95 % jackknife interval over the noises]")
    lengths = {m: g.norm(dim=1) for m, g in G.items()}  # (N,) each: the basis is orthonormal, lengths are kept
    print("each noise's gradient length, the largest over the median: " + ", ".join(
        f"{m} {float(v.max() / v.quantile(0.5)):.1f}x" for m, v in lengths.items()) + " (a noise far longer than the "
        "rest dominates every batch it is in)")
    f = lambda v: f"{v[0]:+.2f} [{v[1][0]:+.2f}, {v[1][1]:+.2f}]" if v[1][0] == v[1][0] else f"{v[0]:+.2f} [n/a]"
    print(f"\nbatch of {B}: {'same batch, with full':>24s} {'independent batch, with full':>28s} "
          f"{'same minus independent':>24s} {'two halves of one batch':>24s}")
    for m in G:
        same = over_splits(lambda a, b: batch_cosine(G[m][a], G["full"][a]), n, B, splits)
        held = over_splits(lambda a, b: batch_cosine(G[m][a], G["full"][b]), n, B, splits)
        drop = over_splits(lambda a, b: batch_cosine(G[m][a], G["full"][a]) - batch_cosine(G[m][a], G["full"][b]),
                           n, B, splits, bound=2.0)  # paired: the same splits, the same noises left out
        halves = over_splits(lambda a, b: batch_cosine(G[m][a[:B // 2]], G[m][a[B // 2:]]), n, B, splits) \
            if B >= 2 else None  # a batch of one noise has no halves
        print(f"{m:>12s} {f(same):>24s} {f(held):>28s} {f(drop):>24s} {f(halves) if halves else '-':>24s}")
    sizes = (1, 2) if quick else (1, 2, 4, 8)
    print(f"\ncos between two independent batches of the same method, by batch size B ({clock})")
    print(f"{'':>12s} " + " ".join(f"{'B = ' + str(b):>20s}" for b in sizes))
    for m in G:
        print(f"{m:>12s} " + " ".join(f"{f(over_splits(lambda a, b: batch_cosine(G[m][a], G[m][b]), n, b, splits)):>20s}"
                                      for b in sizes))
    print(f"({clock})")


if __name__ == "__main__":
    from exercises import lab

    lab.run(experiment)
