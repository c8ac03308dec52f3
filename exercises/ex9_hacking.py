"""Exercise 9 (experiment): reward hacking, as the held-out judge sees it and as the class-matched metrics
see it (PAPER.md Sec. 4, item 3; sftlib/metrics.py, README "The paper in the code", item 5).

Fine-tune the classroom base for ship with ShortFT at a learning rate 25 times the default, for 30 steps,
and judge the samples before and after with networks that never served as the reward: the held-out
evaluator's verdict (how many samples it calls a ship), the Fréchet distance of its features to real
images *of the samples' own class mix* (so a wanted shift to ships is not counted as damage), and the
samples' diversity in those features.

Fill in the gaps marked TODO(student) and write your PREDICTION first, then:

    python -m pytest exercises/check_ex9_hacking.py     # is the measurement right? (seconds)
    python -m exercises.ex9_hacking                     # the experiment (about two minutes on a laptop CPU)
"""
import os

import numpy as np
import torch

from sftlib.fid import frechet_distance

# TODO(student): before you run it, predict in a sentence: after fine-tuning far too hard, what happens to the
# reward, to the share the held-out judge calls ships, to the class-matched distance and to the diversity?
PREDICTION = ""


def class_matched_fd(feats, pred, real_feats, real_labels):
    """The Fréchet distance between N(mu, Sigma) of the samples' features (N, D) and the real images'
    features taken in the samples' class mix: the mixture of the real classes c with weights w_c = the
    fraction of samples the judge puts in class c (pred, (N,)). Population moments throughout:
    mu_ref = sum_c w_c mu_c,  Sigma_ref = sum_c w_c (Sigma_c + mu_c mu_c^T) - mu_ref mu_ref^T."""
    # TODO(student): w = the samples' class mix; the mixture's mean and covariance from each real class's
    # mean and population covariance (np.cov(..., bias=True)); return frechet_distance(...) of the two Gaussians
    raise NotImplementedError("exercise 9: class_matched_fd")


def diversity(feats):
    """The mean Euclidean distance between the features of two different samples (N >= 2): 0 when every
    sample is the same image."""
    # TODO(student): the mean of the pairwise distances over the N (N - 1) ordered pairs of different samples
    raise NotImplementedError("exercise 9: diversity")


def experiment(quick=False, lr=1e-2, steps=30, batch=4, n_eval=16):
    import torchvision

    import shortft
    from exercises import lab

    lab.show_prediction(PREDICTION)
    steps, n_eval, batch = (2, 4, 1) if quick else (steps, n_eval, batch)
    clock, L = lab.Clock(), lab.load()
    real_feats, real_labels = lab.real_features(n_per_class=20 if quick else 200)
    ships = real_feats[real_labels == lab.TARGET]
    ft = lab.finetunable(L)
    params = lab.lora_parameters(ft)
    opt = torch.optim.Adam(params, lr=lr)
    x_eval = lab.noise(n_eval, seed=1)

    def judged(x0):
        feats, pred = lab.judge(L, x0)
        return dict(reward=float(L.reward(x0).exp().mean()), judge=float((pred == lab.TARGET).mean()),
                    fd=class_matched_fd(feats, pred, real_feats, real_labels),
                    fd_all=frechet_distance(feats.mean(0), np.cov(feats, rowvar=False, bias=True),
                                            real_feats.mean(0), np.cov(real_feats, rowvar=False, bias=True)),
                    diversity=diversity(feats))

    before = lab.sample(ft, L, x_eval)
    rows = [("before", judged(before))]
    print(f"fine-tuning for ship: ShortFT chain, lr {lr:g}, {steps} steps of batch {batch} ({clock} so far)")
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        x0 = shortft.shortft_chain(ft, L.shortcut, L.sched, torch.randn(batch, 3, 32, 32, generator=gen), ft.groups, 0)
        loss = -L.reward(x0).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 10 == 0 or step + 1 == steps:
            print(f"  step {step + 1}: training-chain reward p(ship) {float(L.reward(x0).detach().exp().mean()):.2f} ({clock})")
    after = lab.sample(ft, L, x_eval)
    rows.append(("after", judged(after)))
    print(f"\n{len(x_eval)} DDIM-50 samples from the same noises; real test images: {len(real_feats)} "
          f"(diversity of real ships {diversity(ships):.2f}, of all real images {diversity(real_feats):.2f})")
    print(f"{'':8s} {'reward p(ship)':>14s} {'judge: ships':>12s} {'FD, class-matched':>17s} {'FD, all real':>12s} "
          f"{'diversity':>9s}")
    for name, m in rows:
        print(f"{name:8s} {m['reward']:14.2f} {m['judge']:12.2f} {m['fd']:17.1f} {m['fd_all']:12.1f} {m['diversity']:9.2f}")
    path = os.path.join(lab.OUT, "ex9_before_after.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torchvision.utils.save_image((torch.cat([before[:8], after[:8]]) + 1) / 2, path, nrow=8)
    print(f"samples (top: before, bottom: after, same noise): {path}  ({clock})")


if __name__ == "__main__":
    from exercises import lab

    lab.run(experiment)
