"""Exercise 10 (experiment): what P-Training changes in the chain's x_0 over training (PAPER.md Sec. 3,
"progressive training"; shortft.ptrain_phase, shortft.set_phase, benchmarks/ft_probe.py's chain_gap).
Reference solution.

The shortcut was distilled from the *base* model. As fine-tuning moves the base, the short chain (real
segment, then frozen shortcut jumps) and the fine-tuned model's own DDIM-50 chain drift apart: the
reward is computed on an x_0 the fine-tuned model would not draw. P-Training trains in k - 1 phases;
in phase i the segments up to i run for real, so less of the chain is shortcut. Measure the gap between
the two x_0, with and without P-Training, along a short fine-tuning run.

    python -m pytest exercises/check_ex10_ptrain.py     # is the measurement right? (seconds)
    python -m exercises.ex10_ptrain                     # the experiment (about four minutes on a 2-core CPU)
"""

import torch

import ddpm
from shortft import shortft_chain

PREDICTION = "without P-Training the phase-0 gap grows; with it the gap of the chain it trains on stays smaller"


def chain_gap(ft, student, sched, x_T, timesteps, phase=0):
    """Per sample (B,): the mean squared distance, over the C x H x W values, between the x_0 of the ShortFT
    chain at P-Training phase `phase` (shortft.shortft_chain, the fine-tuned model `ft` inside it) and the
    x_0 of `ft`'s own real DDIM-50 chain (every step real, `ft` called as the sampler calls it), from the
    same noise x_T."""
    with torch.no_grad():  # a measurement: no call needs a graph (one over 50 UNet calls would only hold memory)
        short = shortft_chain(ft, student, sched, x_T, ft.groups, phase)  # (B, C, H, W)
        real = ddpm.ddim_sample(ft, sched, x_T, timesteps)  # (B, C, H, W)
    return (short - real).pow(2).flatten(1).mean(1)  # (B,)


def experiment(quick=False, lr=1e-2, steps=12, every=6, batch=4, seeds=3):
    import numpy as np

    import shortft
    from exercises import lab

    lab.show_prediction(PREDICTION)
    steps, every, batch, seeds = (2, 2, 1, 2) if quick else (steps, every, batch, seeds)
    clock, L = lab.Clock(), lab.load()
    x_gap = lab.noise(1 if quick else 6, seed=1)
    k = len(L.groups)
    start = chain_gap(lab.finetunable(L), L.shortcut, L.sched, x_gap, L.steps, 0).numpy()  # every run starts here
    measured = [s for s in range(steps + 1) if s % every == 0 or s == steps]
    last = {}  # progressive -> (phase-0 gap, the trained chain's gap), each (seeds, noises), at the last step
    for progressive in (False, True):
        rows = {s: dict(g0=[], gs=[], r=[]) for s in measured}  # per measured step, one entry per seed
        for seed in range(seeds):  # a seed: the LoRAs' initial A and the training noises
            ft = lab.finetunable(L, seed=seed)
            opt = torch.optim.Adam(lab.lora_parameters(ft), lr=lr)
            gen = torch.Generator().manual_seed(seed)
            rewards = []
            for step in range(steps + 1):
                phase = shortft.ptrain_phase(k, step / steps) if progressive else 0
                if step in rows:
                    g0 = start if step == 0 else chain_gap(ft, L.shortcut, L.sched, x_gap, L.steps, 0).numpy()
                    gs = chain_gap(ft, L.shortcut, L.sched, x_gap, L.steps, phase).numpy() if phase else g0
                    rows[step]["g0"].append(g0)
                    rows[step]["gs"].append(gs)
                    rows[step]["r"].append(np.mean(rewards) if rewards else np.nan)
                    rows[step]["phase"] = phase
                    rewards = []
                if step == steps:
                    break
                shortft.set_phase(ft, phase)  # P-Training freezes the LoRAs of the phases before
                x0 = shortft_chain(ft, L.shortcut, L.sched, torch.randn(batch, 3, 32, 32, generator=gen), ft.groups,
                                   phase)
                r = L.reward(x0)
                rewards.append(float(r.detach().exp().mean()))
                opt.zero_grad(set_to_none=True)
                (-r.mean()).backward()
                opt.step()
        print(f"\n{'with' if progressive else 'without'} P-Training: lr {lr:g}, {steps} steps of batch {batch}, "
              f"{seeds} training seeds ({clock})")
        print(f"{'step':>5s} {'phase':>5s} {'gap, phase-0 chain':>30s} {'gap, the chain it trains on':>30s} "
              f"{'training reward p(ship)':>23s}")
        for step, row in rows.items():
            r = f"{np.mean(row['r']):23.2f}" if step else f"{'':23s}"
            print(f"{step:5d} {row['phase']:5d} {lab.mean_ci(np.array(row['g0']), 5):>30s} "
                  f"{lab.mean_ci(np.array(row['gs']), 5):>30s} {r}")
        last[progressive] = np.array(rows[steps]["g0"]), np.array(rows[steps]["gs"])
    (w0, _), (p0, ps) = last[False], last[True]
    print(f"\neach gap: the mean over {seeds} training seeds x {len(x_gap)} noises [95 % two-level bootstrap interval "
          f"over the seeds and the noises]; the training reward: the mean since the row before, over the seeds")
    print(f"at step {steps}, differences per seed and noise (seed s with P-Training against seed s without) "
          f"[95 % two-level paired bootstrap]:")
    print(f"  with P-Training, the gap of the chain it trains on minus its phase-0 gap   {lab.mean_ci(ps - p0, 5, True)}")
    print(f"  the phase-0 gap, with minus without P-Training                             {lab.mean_ci(p0 - w0, 5, True)}")
    print(f"  the gap of the chain trained on, with minus without P-Training             {lab.mean_ci(ps - w0, 5, True)}")
    print(f"({clock})")


if __name__ == "__main__":
    from exercises import lab

    lab.run(experiment)
