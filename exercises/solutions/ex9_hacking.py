"""Exercise 9 (experiment): reward hacking, as the held-out judge sees it and as the class-matched metrics
see it (PAPER.md Sec. 4, item 3; sftlib/metrics.py, README "The paper in the code", item 5).
Reference solution.

Fine-tune the classroom base for ship with ShortFT at a learning rate 25 times the default, for 30 steps,
and judge the samples before and after with networks that never served as the reward: the held-out
evaluator's verdict (how many samples it calls a ship), the Fréchet distance of its features to real
images *of the samples' own class mix* (so a wanted shift to ships is not counted as damage), and the
samples' diversity in those features.

    python -m pytest exercises/check_ex9_hacking.py     # is the measurement right? (seconds)
    python -m exercises.ex9_hacking                     # the experiment (about four minutes on a 2-core CPU)
"""
import os

import numpy as np
import torch

from sftlib.fid import frechet_distance

PREDICTION = "the judge calls far more samples ships, the class-matched distance rises and diversity falls"


def class_matched_fd(feats, pred, real_feats, real_labels):
    """The Fréchet distance between N(mu, Sigma) of the samples' features (N, D) and the real images'
    features taken in the samples' class mix: the mixture of the real classes c with weights w_c = the
    fraction of samples the judge puts in class c (pred, (N,)). Population moments throughout:
    mu_ref = sum_c w_c mu_c,  Sigma_ref = sum_c w_c (Sigma_c + mu_c mu_c^T) - mu_ref mu_ref^T."""
    w = np.bincount(pred, minlength=int(real_labels.max()) + 1) / len(pred)  # (C,) the samples' class mix
    mu_ref, second = 0.0, 0.0
    for c in np.flatnonzero(w):
        f = real_feats[real_labels == c]  # (n_c, D)
        mu_c, sigma_c = f.mean(0), np.cov(f, rowvar=False, bias=True)
        mu_ref = mu_ref + w[c] * mu_c
        second = second + w[c] * (sigma_c + np.outer(mu_c, mu_c))  # E[f f^T] of class c
    sigma_ref = second - np.outer(mu_ref, mu_ref)
    return frechet_distance(feats.mean(0), np.cov(feats, rowvar=False, bias=True), mu_ref, sigma_ref)


def diversity(feats):
    """The mean Euclidean distance between the features of two different samples (N >= 2): 0 when every
    sample is the same image."""
    f = torch.as_tensor(np.asarray(feats, np.float64))
    d = torch.cdist(f, f)  # (N, N), zero on the diagonal
    n = len(f)
    return float(d.sum() / (n * (n - 1)))


def matched_diversity(feats, pred, real_feats, real_labels):
    """The project's diversity, class-matched (sftlib/metrics.py's diversity_matched, with the mixture's moments
    instead of a resampled set): tr Sigma of the samples' features over tr Sigma of the real images' taken in the
    samples' class mix (weights w_c), tr Sigma_ref = sum_c w_c (tr Sigma_c + |mu_c|^2) - |sum_c w_c mu_c|^2.
    About 1 for real images of those classes, 0 when every sample is the same image."""
    w = np.bincount(pred, minlength=int(real_labels.max()) + 1) / pred.size  # (C,) the samples' class mix
    mu_ref, second = 0.0, 0.0
    for c in np.flatnonzero(w):
        f = real_feats[real_labels == c]  # (n_c, D)
        mu_ref = mu_ref + w[c] * f.mean(0)
        second = second + w[c] * float((f ** 2).sum(1).mean())  # E |f|^2 of class c
    return float(np.trace(np.cov(feats, rowvar=False, bias=True)) / (second - float(mu_ref @ mu_ref)))


def experiment(quick=False, lr=1e-2, steps=30, batch=4, n_eval=16, seeds=3):
    import torchvision

    import shortft
    from exercises import lab

    lab.show_prediction(PREDICTION)
    steps, n_eval, batch, seeds = (2, 4, 1, 2) if quick else (steps, n_eval, batch, seeds)
    clock, L = lab.Clock(), lab.load()
    real_feats, real_labels = lab.real_features(n_per_class=20 if quick else 200)
    ships = real_feats[real_labels == lab.TARGET]
    x_eval = lab.noise(n_eval, seed=1)

    def judged(x0):
        """Per sample: p(ship) under the reward classifier, the judge's features and verdict."""
        feats, pred = lab.judge(L, x0)
        return dict(p=L.reward(x0).exp().numpy(), feats=feats, pred=pred)

    real_moments = real_feats.mean(0), np.cov(real_feats, rowvar=False, bias=True)  # all real images: mu, Sigma

    def metrics(j, idx):
        f, pred = j["feats"][idx], j["pred"][idx]
        return [float(j["p"][idx].mean()), float((pred == lab.TARGET).mean()),
                class_matched_fd(f, pred, real_feats, real_labels),
                frechet_distance(f.mean(0), np.cov(f, rowvar=False, bias=True), *real_moments),
                diversity(f), matched_diversity(f, pred, real_feats, real_labels)]

    before = lab.sample(L.base, L, x_eval)  # every run starts from the base (LoRA's B is zero)
    j_before, j_after, grids = judged(before), [], [before[:8]]
    print(f"fine-tuning for ship, {seeds} training seeds: ShortFT chain, lr {lr:g}, {steps} steps of batch {batch} "
          f"({clock} so far)")
    for seed in range(seeds):  # a seed: the LoRA's initial A and the training noises
        ft = lab.finetunable(L, seed=seed)
        opt = torch.optim.Adam(lab.lora_parameters(ft), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for step in range(steps):
            x0 = shortft.shortft_chain(ft, L.shortcut, L.sched, torch.randn(batch, 3, 32, 32, generator=gen),
                                       ft.groups, 0)
            loss = -L.reward(x0).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % 10 == 0 or step + 1 == steps:
                print(f"  seed {seed}, step {step + 1}: training-chain reward p(ship) "
                      f"{float(L.reward(x0).detach().exp().mean()):.2f} ({clock})")
        after = lab.sample(ft, L, x_eval)
        j_after.append(judged(after))
        grids.append(after[:8])
    everyone = np.arange(n_eval)
    rows = [metrics(j_before, everyone)] + [metrics(j, everyone) for j in j_after]
    change = np.mean(rows[1:], 0) - rows[0]  # the seeds' mean after, minus before
    # a two-level paired bootstrap: the training seeds resampled, and the noises, the same ones before and after
    def resampled_change(ss, i):  # each seed drawn is measured once on the resampled noises i
        after = {s: metrics(j_after[s], i) for s in set(ss.tolist())}
        return np.mean([after[s] for s in ss], 0) - metrics(j_before, i)
    boots = np.array([resampled_change(ss, i) for ss, i in lab.two_level(seeds, n_eval, 100 if quick else 500)])
    lo, hi = np.nanpercentile(boots, [2.5, 97.5], axis=0)
    print(f"\n{n_eval} DDIM-50 samples from the same noises, judged by the held-out evaluator against {len(real_feats)} "
          f"real test images; change: the {seeds} seeds' mean after, minus before [95 % two-level paired bootstrap "
          f"interval over the training seeds and the {n_eval} noises]")
    print(f"real images: mean pairwise distance {diversity(ships):.2f} between ships, {diversity(real_feats):.2f} between "
          f"all (class-matched diversity of real images: 1)")
    names = ["reward p(ship)", "judge: ships", "FD, class-matched", "FD, all real", "pairwise distance",
             "diversity, matched"]
    print(f"{'':14s} " + " ".join(f"{c:>22s}" for c in names))
    for name, m in [("before", rows[0])] + [(f"after, seed {s}", r) for s, r in enumerate(rows[1:])]:
        print(f"{name:14s} " + " ".join(f"{v:22.2f}" for v in m))
    print(f"{'change':14s} " + " ".join(f"{f'{c:+.2f} [{l:+.2f}, {h:+.2f}]':>22s}" for c, l, h in zip(change, lo, hi)))
    path = os.path.join(lab.OUT, "ex9_before_after.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torchvision.utils.save_image((torch.cat(grids) + 1) / 2, path, nrow=8)
    print(f"samples (top row: before; then after, one row per seed; same noise in each column): {path}  ({clock})")


if __name__ == "__main__":
    from exercises import lab

    lab.run(experiment)
