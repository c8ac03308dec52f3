"""The paper, section by section (PAPER.md Sec. 1 to 5), run on the classroom checkpoints: for each section
it says what the paper says, names the code that implements it, runs that code and prints what it measures;
pictures go to out/lab/walkthrough/ ($SHORTFT_LAB_OUT/walkthrough).

    python -m exercises.walkthrough            # about a minute and a half on a laptop CPU
    python -m exercises.walkthrough --quick    # fewer noises and steps

Read it top to bottom next to PAPER.md; every number it prints is measured here, now.
"""
import os
import time

import torch
import torchvision

import consistency
import baselines
import shortft
from exercises import lab
from sftlib import gradstudy


def section(title, code):
    print(f"\n{'=' * 100}\n{title}\n  code: {code}\n{'-' * 100}")


def save(images, name, nrow=8):
    path = os.path.join(lab.OUT, "walkthrough", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torchvision.utils.save_image((images.clamp(-1, 1) + 1) / 2, path, nrow=nrow)
    print(f"  picture: {path}")


def seconds_per_step(chain, ft, L, x_T):
    """One optimizer-free training step (chain, reward, backward) and its wall time."""
    t0 = time.time()
    (-L.reward(chain(ft, x_T)).mean()).backward()
    ft.unet.zero_grad(set_to_none=True)
    return time.time() - t0


def main(quick=False):
    n, b = (2, 1) if quick else (8, 4)  # samples; the batch of the gradient and timing measurements
    clock, L = lab.Clock(), lab.load()
    x_T = lab.noise(n, seed=0)

    section("PAPER.md Sec. 1, the problem: maximise J(theta) = E_{x_T} r(Sample_theta(x_T)), Sample = 50 DDIM steps",
            "ddpm.ddim_sample (the sampler), rewards.py (r), sftlib/gradstudy.py (the full gradient, call by call)")
    x0 = lab.sample(L.base, L, x_T)
    save(x0, "1_base_samples.png")
    feats, pred = lab.judge(L, x0)
    print(f"  the classroom base, {n} DDIM-50 samples: reward r = log p(ship | x_0), mean p(ship) "
          f"{float(L.reward(x0).exp().mean()):.3f}; the held-out judge calls {int((pred == lab.TARGET).sum())} of "
          f"them ships")
    ft = lab.finetunable(L, tlora=False)
    params = lab.lora_parameters(ft)
    dec = gradstudy.full_decomposition(ft, L.sched, x_T[:b // 2 or 1], L.steps, L.reward, params)
    g = dec["calls"]  # (50, P): the parameter gradient each of the 50 UNet calls contributes
    full = g.sum(0)
    per_call = g.norm(dim=1) / full.norm()
    print(f"  full backprop through the 50 calls, one LoRA at its initialisation, {b // 2 or 1} noises:")
    print("    |g_t| / |g_full| at t = " + ", ".join(f"{t}: {float(v):.3f}" for t, v in zip(L.steps[::7], per_call[::7])))
    top = len(L.groups[0])  # segment 1, the calls 981 .. 761
    print(f"    the {top} calls of segment 1 (981 .. 761) together: norm {float(g[:top].sum(0).norm() / full.norm()):.2f} "
          f"of the full gradient, cosine {gradstudy.cosine(g[:top].sum(0), full):.2f} with it")
    for K in (1, 10):
        print(f"    DRaFT-{K} keeps the last {K} call(s): cosine with the full gradient "
              f"{gradstudy.cosine(g[-K:].sum(0), full):.2f}, norm {float(g[-K:].sum(0).norm() / full.norm()):.3f} of it")
    at761 = g[top - 1]  # the call at 761: the last of segment 1, the one call there ShortFT's chain trains
    print(f"    the call at 761 alone: cosine {gradstudy.cosine(at761, full):.2f} with the full gradient, norm "
          f"{float(at761.norm() / full.norm()):.3f} of it")
    print("  -> measured on these noises: segment 1's calls set the full gradient's direction, DRaFT-K's last calls")
    print("     carry a small part of it; the call at 761 points the same way at a fraction of the size. One batch")
    print("     of noises, at the LoRA's initialisation: whether truncating loses in training is the comparison's")
    print("     question (README, benchmarks/bench_compare.py), not this print's.")

    section("PAPER.md Sec. 2, the idea: a trajectory-preserving shortcut S(x_t, t -> s) replaces a dozen steps",
            "consistency.jump (the shortcut), train_shortcut.py (its distillation), benchmarks/bench_shortcut.py")
    with torch.no_grad():
        x = shortft.real_segment(L.base, L.sched, x_T, L.groups, 0, grad_last=False)  # the real chain down to x_741
        real = x
        for t in L.groups[1][:-1]:  # 741 -> 501 for real: 12 calls
            real = shortft.base_step(L.base, L.sched, real, t, t - 20)
        for name, jumper in (("distilled shortcut", L.shortcut), ("naive jump (one base DDIM step)", L.base)):
            d = (consistency.jump(jumper, L.sched, x, 741, 501) - real).pow(2).flatten(1).mean(1)
            print(f"  741 -> 501 in one call, {name}: mean squared distance to the 12 real steps {float(d.mean()):.5f}")
    print("  -> forward, the chain after the jump sees (nearly) the base's own trajectory; backward, dS/dx_t is one")
    print("     call's Jacobian instead of a product of twelve (exercise 8 measures every span).")

    section("PAPER.md Sec. 3, the chain: real segment 1, then per segment a frozen shortcut jump and one base step",
            "shortft.shortft_chain, shortft.FineTuned (T-LoRA), shortft.ptrain_phase / set_phase (P-Training)")
    calls = []

    def spy(name, net):
        def call(x, t):
            calls.append(f"{name}@{int(t[0])}{'*' if torch.is_grad_enabled() else ''}")
            return net(x, t)
        return call
    tft = lab.finetunable(L)  # T-LoRA: one LoRA per segment, stacked
    shortft.shortft_chain(spy("base", tft), spy("shortcut", L.shortcut), L.sched, x_T[:1], L.groups, 0)
    print(f"  phase 0 calls, in order (* = keeps a graph): {' '.join(calls)}")
    print(f"  {len(calls)} calls, {sum(c.endswith('*') for c in calls)} on the gradient path (DDIM-50: 50)")
    print("  T-LoRA, LoRAs on at t: " + ", ".join(f"{t}: {tft.stack(t)}" for t in (981, 761, 741, 501, 481, 261, 241, 1)))
    print("  P-Training, phase by fraction of the budget: " + ", ".join(
        f"{f:.2f}: {shortft.ptrain_phase(len(L.groups), f)}" for f in (0.0, 0.34, 0.67, 0.99)))
    with torch.no_grad():
        real_x0 = lab.sample(tft, L, x_T[:b])
        short_x0 = torch.cat([shortft.shortft_chain(tft, L.shortcut, L.sched, x_T[i:i + 1], L.groups, 0) for i in range(b)])
    g_short = gradstudy.method_gradient("shortft", ft, L.shortcut, L.sched, x_T[:b // 2 or 1], L.steps, L.reward, params)
    print(f"  its gradient (one LoRA, phase 0, the noises of Sec. 1): cosine {gradstudy.cosine(g_short, full):.2f} with the "
          f"full gradient, norm {float(g_short.norm() / full.norm()):.3f} of it")
    print("  -> measured: the short chain's gradient reaches the LoRA through the call at 761 and the 3 edge calls;")
    print("     how much of the full gradient's direction it keeps is the number above, for these noises only.")
    print(f"  x_0 of the short chain vs the real chain, untuned base: mean squared distance "
          f"{float((short_x0 - real_x0).pow(2).mean()):.5f} (images in [-1, 1])")
    save(torch.cat([real_x0, short_x0]), "3_real_vs_short_x0.png", nrow=b)
    print("  (top row: the real DDIM-50 x_0; bottom: the short chain's; benchmarks/figures.py draws every hop)")

    section("PAPER.md Sec. 4, the toy version: 1 DDPM, 2 shortcut, 3 rewards and the judge, 4 ShortFT and baselines",
            "ddpm.py, unet.py; consistency.py; rewards.py, sftlib/metrics.py; shortft.py, train_shortft.py")
    print("  1. the schedule (linear beta 1e-4 .. 0.02, T = 1000): abar_t at " + ", ".join(
        f"{t}: {float(L.sched.abar(t)):.4f}" for t in (981, 761, 501, 261, 1)))
    with torch.no_grad():
        torch.manual_seed(0)
        for name, student in (("distilled", L.shortcut), ("naive (the base itself)", L.base)):
            loss = consistency.cd_loss(student, student, L.base, L.sched, x0, L.edges, loss="huber")
            print(f"  2. consistency-distillation loss (Song et al. 2023, Alg. 2, edges {L.edges}) on the base's "
                  f"samples, {name}: {float(loss):.4f}")
    counts = torch.bincount(torch.as_tensor(pred), minlength=10).tolist()
    print(f"  3. the judge's classes of the {n} base samples (airplane .. truck): {counts}")
    for name, chain in (("ShortFT phase 0", lambda m, x: shortft.shortft_chain(m, L.shortcut, L.sched, x, L.groups, 0)),
                        ("DRaFT-1", lambda m, x: baselines.draft_chain(m, L.sched, x, L.steps, 1)),
                        ("full backprop", lambda m, x: baselines.full_chain(m, L.sched, x, L.steps))):
        print(f"  4. one training step (chain, reward, backward), batch {b}, {name}: "
              f"{seconds_per_step(chain, tft, L, x_T[:b]):.1f} s")
    opt = torch.optim.Adam(lab.lora_parameters(tft), lr=4e-4)
    gen = torch.Generator().manual_seed(1)
    for step in range(1 if quick else 6):
        x = shortft.shortft_chain(tft, L.shortcut, L.sched, torch.randn(b, 3, 32, 32, generator=gen), tft.groups, 0)
        r = L.reward(x)
        opt.zero_grad(set_to_none=True)
        (-r.mean()).backward()
        opt.step()
        print(f"     ShortFT step {step + 1} at the default lr 4e-4: training-chain p(ship) {float(r.detach().exp().mean()):.3f}")
    print("  (the whole stage, with evaluation: python train_toy.py --pretrained; the comparison: benchmarks/bench_compare.py)")

    section("PAPER.md Sec. 5, Stable Diffusion scale", "train_sd.py, sftlib/sd.py, sftlib/sd_rewards.py")
    print("  the same chain on SD 1.5 with a Hyper-SD/TCD/LCM LoRA as the shortcut: python train_toy.py --model=sd15")
    print("  (needs diffusers and the weights; README, 'Stable Diffusion'). Not run here.")
    print(f"\n({clock})")


if __name__ == "__main__":
    main(quick=lab.quick_flag())
