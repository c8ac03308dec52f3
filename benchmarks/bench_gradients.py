"""The gradient study, by signal and noise (sftlib/gradstudy.py): does one step along a method's gradient on
a training batch raise the reward on OTHER noises? At batch 8 one batch's gradient says little about other
noises (two batches' full DDIM-50 gradients can have a negative cosine), so the cosine with the full gradient
of the same batch (kept as the column cos_same) cannot rank methods. The headline is held out:

    truth    G_H = the full DDIM-50 gradient of the mean reward over --heldout noises no method trains on
    cos_H    cos(g, G_H), g a method's gradient on one training batch of --batch noises
    gain     G_H . g/|g|: the held-out first-order gain of a unit step along g (reward per unit |LoRA step|)
    real     with --eta=E1,E2,..: the held-out mean reward after the LoRA moves by eta g/|g| (DDIM-50 re-sampled,
             the same held-out noises), minus before; shown per unit step (/ eta) beside gain. One Adam step
             at lr 4e-4 moves each of the ~12k entries of the LoRA's B (A gets no gradient at B = 0; CPU-preset
             UNet, rank 4) by ~lr: |step| ~ 0.045

Each method runs on --batches disjoint training batches (the same ones for every method), so each cell is a
mean and [min, max] over batches. Rows: draft (DRaFT-1, exactly the full chain's last call), draft_lv,
alignprop, drtune, shortft (one LoRA, P-Training phase 0, the distilled shortcut), shortft_naive (the frozen
base's one DDIM step as the jump), shortft_perfect (the frozen base's real DDIM steps as the jump), full (full
backprop on the batch: its cos_H is the noise ceiling of any batch-B method), and shortft_k8 with
--k8_shortcut=PATH/ckpt.pt (a k = 8 shortcut distilled from the same base). Also per row: pooled (cos_H of the
sum of its batch gradients: the method at batch --batches x --batch) and signal (a debiased estimate of
cos(E g, true gradient), from cross-batch dot products; noisy, nan when an estimate is <= 0) and cos_loo (the
cosine with a larger truth: the full gradient over the held-out set and the OTHER training batches, all disjoint
from the method's batch: --heldout + (--batches - 1) x --batch noises). The batch size
needed: the full gradient's cos_H at B = --batch x 1, 2, 4, .. (sums of disjoint batches), and the per-sample
signal-to-noise fitted from the independent full gradients, which gives the cosine with the truth at any B.
No training: every gradient is taken at the LoRA's initialisation (B = 0: the model is the base), with the
base's own x0-clip. The DRaFT-K depth sweep (cos_H for K = 1..50) comes free from each batch's decomposition.

    python benchmarks/bench_gradients.py --models=DIR --out=OUT [--eta=0.005,0.045] [--k8_shortcut=DIR8/shortcut/ckpt.pt]
    python benchmarks/bench_gradients.py --models=DIR --batches=2 --heldout=8 --methods=draft,shortft,full  # a look

Writes <out>/results.json (after every reward), <out>/table.md and <out>/grad_snr.png (--docs=DIR copies it).
"""
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ddpm
import rewards
from sftlib import config
from sftlib.common import UserError, file_sha256, load_checkpoint, pick_device, pyplot, run_main, save_figure, write_text
from sftlib.gradstudy import (batch_for_cosine, batch_gradients, cosine, cosine_with_truth, full_gradient, growth,
                              mean_reward, realised_gain, signal_cosine, snr_fit, step_measures)
from sftlib.models import build_finetuned, load_naive_shortcut, load_reward, load_shortcut
from shortft import FineTuned, segment_groups

DEFAULTS = dict(
    models="",  # a run folder with ddpm/, shortcut/ and classifier/ (empty: the classroom checkpoints, installed)
    rewards="classifier:ship,brightness",  # a comma list of reward specs, one study each
    batch=8,  # noises per training batch (every method's gradient is taken on one batch)
    batches=4,  # disjoint training batches per method (the same ones for every method); at least 2
    heldout=32,  # held-out noises for the truth G_H (fewer than 24: allowed, with a warning)
    methods="draft,draft_lv,alignprop,drtune,shortft,shortft_naive,shortft_perfect,full",  # the rows
    k8_shortcut="",  # a k = 8 shortcut's ckpt.pt, distilled from the same base: adds the row shortft_k8
    eta="",  # a comma list of step sizes: also the realised held-out gain of a step eta * g/|g| (one DDIM-50 pass over the held-out set per cell and eta)
    lora_rank=4,  # the one LoRA every row trains (alpha = rank), at its initialisation
    seed=0,  # the LoRA init, the held-out and training noises, the methods' random draws
    out="out/bench_gradients",  # results.json, table.md, grad_snr.png
    docs="",  # a folder to copy grad_snr.png to (e.g. docs)
    device="cpu",  # cpu | cuda | auto
    threads=0)  # CPU threads (0: torch's default)
METHODS = ("draft", "draft_lv", "alignprop", "drtune", "shortft", "shortft_naive", "shortft_perfect", "full")
MIN_HELDOUT = 24  # fewer held-out noises: the truth itself is too noisy for a headline (allowed, with a warning)


def models_dir(a, specs):
    """The folder with ddpm/, shortcut/ (and classifier/ for a classifier reward): --models, else the classroom ones."""
    stages = ("ddpm", "shortcut") + (("classifier",) if any(rewards.needs_classifier(s) for s in specs) else ())
    if a["models"]:
        for stage in stages:
            if not os.path.isfile(os.path.join(a["models"], stage, "ckpt.pt")):
                raise UserError(f"--models={a['models']} has no {stage}/ckpt.pt: run the pipeline there first")
        return a["models"]
    from sftlib import pretrained
    folder = os.path.join(a["out"], "classroom")
    if not os.path.isfile(os.path.join(folder, "classifier", "ckpt.pt")):
        pretrained.install(dict(config.DEFAULTS, out_dir=folder, data_root=""))
    return folder


def gradient_path_calls(name, groups):
    """UNet calls on one sample's gradient path (LoRA calls plus frozen calls the gradient passes through)."""
    k = len(groups)
    return {"draft": 1, "draft_lv": 1, "alignprop": 25, "drtune": 5, "full": 50, "shortft_perfect":
            k + sum(len(g) - 1 for g in groups[1:])}.get(name, 2 * k - 1)


def rows_of(a, folder, device):
    """{row: (eps-predictor, student, method)} and the FineTuned, its schedule and its LoRA parameters."""
    cfg = dict(config.DEFAULTS, method="draft", lora_rank=a["lora_rank"], lora_alpha=float(a["lora_rank"]),
               out_dir=folder)  # method draft: one plain LoRA for every row, ShortFT's single-LoRA arm too
    base = os.path.join(folder, "ddpm", "ckpt.pt")
    student, _, _, edges = load_shortcut(os.path.join(folder, "shortcut", "ckpt.pt"), device)
    naive = load_naive_shortcut(base, device)
    torch.manual_seed(100 + a["seed"])  # the LoRA's A init (B = 0)
    ft, sched = build_finetuned(cfg, base, edges, device)
    ft.unet.eval()
    params = [p for p in ft.unet.parameters() if p.requires_grad]
    steps = ddpm.ddim_timesteps(sched.T, ddpm.N_CHAIN)
    methods = [m for m in a["methods"].split(",") if m]
    students = {"shortft": (ft, student, "shortft"), "shortft_naive": (ft, naive, "shortft_naive"),
                "shortft_perfect": (ft, naive, "shortft_perfect")}
    students = {m: students[m] for m in methods if m in students}
    if a["k8_shortcut"]:
        ckpt = load_checkpoint(a["k8_shortcut"], "shortcut")
        sha = ckpt.get("teacher_sha256")  # None: not recorded (older checkpoints)
        if sha is not None and sha != file_sha256(os.path.join(folder, "ddpm", "model.safetensors")):
            raise UserError(f"--k8_shortcut={a['k8_shortcut']} was distilled from another base than {base}")
        s8, _, _, edges8 = load_shortcut(a["k8_shortcut"], device, ckpt=ckpt)
        ft8 = FineTuned(ft.unet, segment_groups(steps, edges8), tlora=False)  # the same LoRA, k8's segments
        students[f"shortft_k{len(edges8)}"] = (ft8, s8, "shortft")
        methods.append(f"shortft_k{len(edges8)}")
    return methods, students, ft, sched, params


def study(a, folder, device, spec, rows):
    """One reward: the held-out truth, every method on every training batch, the full gradient's growth."""
    methods, students, ft, sched, params = rows
    steps = ddpm.ddim_timesteps(sched.T, ddpm.N_CHAIN)
    reward = load_reward(spec, folder, device)
    B, m = a["batch"], a["batches"]
    x_H = torch.randn(a["heldout"], 3, 32, 32, generator=torch.Generator().manual_seed(1000 + a["seed"])).to(device)
    x_train = torch.randn(m * B, 3, 32, 32, generator=torch.Generator().manual_seed(2000 + a["seed"])).to(device)
    t0 = time.time()
    G_H, r_H = full_gradient(ft, sched, x_H, steps, reward, params, B)
    out = dict(reward=spec, heldout_n=a["heldout"], batch=B, n_params=len(G_H), heldout_norm=float(G_H.norm()),
               heldout_reward=float(r_H.mean()), heldout_s=time.time() - t0, batches=[],
               calls={n: gradient_path_calls(n, students.get(n, (ft,))[0].groups) for n in methods})
    print(f"[gradients] {spec}: held-out truth over {a['heldout']} noises in {out['heldout_s']:.0f} s", flush=True)
    before = mean_reward(ft, sched, x_H, steps, reward, B) if a["etas"] else None
    grads = {n: [] for n in methods}
    for i in range(m):
        x_B = x_train[i * B:(i + 1) * B]
        torch.manual_seed(300 + 10 * a["seed"] + i)  # DRaFT-LV's re-noising
        gen = torch.Generator().manual_seed(400 + 10 * a["seed"] + i)  # AlignProp's and DRTune's draws
        t0 = time.time()
        g, dec = batch_gradients(methods, ft, sched, x_B, steps, reward, params, students, gen)
        row = dict(s=time.time() - t0, reward=float(dec["reward"].mean()), methods={},
                   sweep_cos_heldout=[cosine(dec["calls"][-K:].sum(0), G_H) for K in range(1, len(steps) + 1)])
        full_B = dec["calls"].sum(0)
        for n in methods:
            grads[n].append(g[n])
            row["methods"][n] = step_measures(g[n], full_B, G_H)
            for eta in a["etas"]:  # per unit step, keyed by eta
                row["methods"][n].setdefault("real", {})[str(eta)] = realised_gain(
                    ft, sched, x_H, steps, reward, params, g[n], eta, before, B) / eta
        out["batches"].append(row)
        print(f"[gradients] {spec}, batch {i}: " + ", ".join(f"{n} {v['cos_heldout']:+.2f}" for n, v in
                                                            row["methods"].items()) + f" ({row['s']:.0f} s)", flush=True)
    if "full" in grads:  # a larger truth for free: the held-out set and the other batches (all disjoint from batch i)
        N = a["heldout"] + (m - 1) * B
        out["loo_n"] = N
        for i, row in enumerate(out["batches"]):
            truth = (a["heldout"] * G_H + B * sum(g for j, g in enumerate(grads["full"]) if j != i)) / N
            for n in methods:
                row["methods"][n]["cos_loo"] = cosine(grads[n][i], truth)
    fit = snr_fit(grads["full"] + [G_H], [B] * m + [a["heldout"]]) if "full" in grads else None
    for n in methods:
        out.setdefault("pooled", {})[n] = cosine(sum(grads[n]), G_H)
        out.setdefault("signal", {})[n] = signal_cosine(grads[n], G_H, fit["mu2"]) if fit else float("nan")
    if fit:
        cos = growth(grads["full"], G_H)
        out["snr"] = fit
        out["growth"] = [dict(B=k * B, cos_heldout=v, predicted=cosine_with_truth(fit["snr"], k * B)
                              * cosine_with_truth(fit["snr"], a["heldout"]), truth=cosine_with_truth(fit["snr"], k * B))
                         for k, v in cos.items()]
        out["batch_for"] = {str(c): batch_for_cosine(fit["snr"], c) for c in (0.5, 0.7, 0.9)}
    return out


def finite(x):
    """x with every non-finite float (an inf batch size, a nan estimate) as None: strict JSON."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and not np.isfinite(x) else x


def cell(values, fmt="{:+.2f}"):
    """mean [min, max] of the finite values (a results file holds None for nan), or - if none."""
    v = [x for x in values if x is not None and x == x]
    return "-" if not v else f"{fmt.format(np.mean(v))} [{fmt.format(min(v))}, {fmt.format(max(v))}]"


def table(res, a):
    lines = []
    for r in res:
        B, m, scale = a["batch"], a["batches"], r["heldout_norm"]
        lines += [f"### {r['reward']}: {m} batches of {B}, held-out truth over {a['heldout']} noises (|G_H| = "
                  f"{scale:.3g}); mean [min, max] over batches", "",
                  "| method | calls | held-out cos | held-out gain / \\|G_H\\| | "
                  + "".join(f"realised / \\|G_H\\|, eta {e} | " for e in a["etas"])
                  + f"leave-one-out cos ({r.get('loo_n', '-')} noises) | same-batch cos | pooled cos (B = {m * B}) | "
                    "signal cos |", "|---" * (8 + len(a["etas"])) + "|"]
        for n in r["calls"]:
            v = lambda key: [b["methods"][n][key] for b in r["batches"]]  # noqa: E731
            lines.append(f"| {n} | {r['calls'][n]} | {cell(v('cos_heldout'))} | {cell([x / scale for x in v('gain')])} | "
                         + "".join(f"{cell([x[str(e)] / scale for x in v('real')])} | " for e in a["etas"])
                         + f"{cell(v('cos_loo')) if 'loo_n' in r else '-'} | {cell(v('cos_same'))} | "
                           f"{cell([r['pooled'][n]]).split()[0]} | {cell([r['signal'][n]]).split()[0]} |")
        lines += ["", "DRaFT-K held-out cos by depth: " + ", ".join(
            f"K={K} {cell([b['sweep_cos_heldout'][K - 1] for b in r['batches']])}" for K in (1, 5, 10, 20, 50)), ""]
        if "snr" in r:
            f = r["snr"]
            lines += [f"Full gradient's held-out cos by batch size (signal |mu|^2 = {f['mu2']:.3g}, per-sample noise "
                      f"{f['noise']:.3g}, snr {f['snr']:.3g} per sample):", "",
                      "| B | held-out cos (measured) | predicted by the snr fit | cos with the truth (fit) |",
                      "|---|---|---|---|"]
            lines += [f"| {g['B']} | {cell(g['cos_heldout'])} | {g['predicted']:+.2f} | {g['truth']:+.2f} |"
                      for g in r["growth"]]
            lines += ["", "batch needed for a full gradient with cosine c with the truth: " + ", ".join(
                f"c={c}: B ~ {v:.3g}" for c, v in r["batch_for"].items()), ""]
    return "\n".join(lines)


def figure(res, path):
    plt = pyplot()
    fig, axes = plt.subplots(len(res), 2, figsize=(11, 4 * len(res)), squeeze=False)
    for (ax, ax2), r in zip(axes, res):
        sweep = np.array([b["sweep_cos_heldout"] for b in r["batches"]])  # (batches, 50)
        K = np.arange(1, sweep.shape[1] + 1)
        ax.plot(K, sweep.mean(0), color="0.5", label="DRaFT-K, K = 1..50 (held-out)")
        ax.fill_between(K, sweep.min(0), sweep.max(0), color="0.5", alpha=0.15)
        for j, n in enumerate(r["calls"]):
            x = r["calls"][n] * (1 + 0.04 * (j - len(r["calls"]) / 2))
            for key, mk in (("cos_heldout", "o"), ("cos_same", "x")):
                v = [b["methods"][n][key] for b in r["batches"]]
                ax.errorbar(x, np.mean(v), yerr=[[np.mean(v) - min(v)], [max(v) - np.mean(v)]], fmt=mk, color=f"C{j}",
                            ms=5, capsize=2, label=n if key == "cos_heldout" else None)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("UNet calls on a sample's gradient path (log)")
        ax.set_ylabel("cosine (o: held-out truth, x: same batch)")
        ax.set_title(f"{r['reward']}: one batch's gradient vs the held-out full gradient", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        if "growth" in r:
            Bs = [g["B"] for g in r["growth"]]
            for g in r["growth"]:
                ax2.plot([g["B"]] * len(g["cos_heldout"]), g["cos_heldout"], "o", color="C0", alpha=0.6)
            grid = np.geomspace(1, max(4096, 4 * Bs[-1]), 100)
            snr, H = r["snr"]["snr"], r["heldout_n"]
            ax2.plot(grid, [cosine_with_truth(snr, b) * cosine_with_truth(snr, H) for b in grid], color="C0",
                     label=f"fit: with the held-out truth ({H} noises)")
            ax2.plot(grid, [cosine_with_truth(snr, b) for b in grid], color="C1", label="fit: with the true gradient")
            ax2.set_xscale("log")
            ax2.set_ylim(-1, 1)
            ax2.axhline(0, color="k", lw=0.5)
            ax2.set_xlabel("batch size B (noises)")
            ax2.set_ylabel("cosine of the full gradient")
            ax2.set_title(f"Full DDIM-50 gradient: signal-to-noise {snr:.3g} per sample", fontsize=9)
            ax2.legend(fontsize=7)
    save_figure(fig, path, dpi=110)


def check(a):
    for key in ("batch", "batches", "heldout", "lora_rank"):
        if a[key] < 1:
            raise UserError(f"--{key} must be positive, got {a[key]}")
    if a["batches"] < 2:
        raise UserError("--batches must be at least 2: the noise estimate compares independent batches")
    try:
        a["etas"] = [float(e) for e in a["eta"].split(",") if e]
    except ValueError:
        raise UserError(f"--eta expects a comma list of numbers, got {a['eta']!r}") from None
    if any(not 0 < e < float("inf") for e in a["etas"]):
        raise UserError(f"--eta: every step size must be positive and finite, got {a['eta']!r}")
    for m in [x for x in a["methods"].split(",") if x]:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}: one of {', '.join(METHODS)}")
    specs = [s for s in a["rewards"].split(",") if s]
    if not specs:
        raise UserError("--rewards is empty: e.g. --rewards=classifier:ship,brightness")
    for s in specs:
        try:
            rewards.parse_reward_spec(s)
        except ValueError as e:
            raise UserError(f"--rewards: {e}") from None
    if a["heldout"] < MIN_HELDOUT:
        print(f"[gradients] warning: --heldout={a['heldout']} < {MIN_HELDOUT}: the held-out truth is itself noisy, "
              f"a quick look only", file=sys.stderr)
    return specs


def main(argv):
    a = dict(DEFAULTS, **config.parse_overrides(argv, DEFAULTS, description=__doc__))
    specs = check(a)
    if a["threads"] > 0:
        torch.set_num_threads(a["threads"])
    device = pick_device(a["device"])
    folder = models_dir(a, specs)
    os.makedirs(a["out"], exist_ok=True)
    t0 = time.time()
    rows = rows_of(a, folder, device)
    res = []
    for spec in specs:
        res.append(study(a, folder, device, spec, rows))
        write_text(os.path.join(a["out"], "results.json"), json.dumps(finite(dict(
            args=a, models=folder, wall_s=time.time() - t0, threads=torch.get_num_threads(), results=res,
            partial=len(res) < len(specs)))))
    text = table(res, a)
    write_text(os.path.join(a["out"], "table.md"), text + "\n")
    figure(res, os.path.join(a["out"], "grad_snr.png"))
    if a["docs"]:
        os.makedirs(a["docs"], exist_ok=True)
        shutil.copyfile(os.path.join(a["out"], "grad_snr.png"), os.path.join(a["docs"], "grad_snr.png"))
    print(text)
    print(f"[gradients] {len(res)} rewards in {(time.time() - t0) / 60:.1f} min; {a['out']}/results.json")


if __name__ == "__main__":
    run_main(main)
