"""The figures a reader of the README needs, regenerated into docs/ by one command:

    python benchmarks/figures.py        # all of them (about a minute on a 2-core CPU)
    python benchmarks/figures.py --only=chain,steps --models=out --eval_csv=out/shortft/eval.csv

Computed here on the classroom checkpoints (checkpoints/, or --models=RUN_DIR with ddpm/, shortcut/ and,
for `steps`, classifier/):
- chain   docs/chain_short_vs_real.png: the short chain next to the real DDIM-50 chain, image by image. For
          each of --n noises two rows: the real chain (top) and ShortFT's phase-0 chain (bottom, the untuned
          base inside it), at the states where the short chain hops: x_741 (the same in both: segment 1 is
          real), then x_501, x_261, x_1 (after a shortcut jump each) and x_0. Each state x_t is shown as the
          x_0 it predicts, x0_hat = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t), since x_t itself is
          mostly noise; the last column is x_0 itself. Each of the short chain's images also names its
          distance to the real one (mean squared, over the 3x32x32 values in [-1, 1]).
- steps   docs/grad_per_step_methods.png: the gradient magnitude per UNet call, by timestep, for each
          method: |g_t| of every call of full backprop (sftlib/gradstudy.py's call-by-call decomposition),
          the calls DRaFT-1 and DRaFT-10 train (exactly the full chain's last calls), and the four base calls
          of ShortFT's phase-0 chain (each call with its own copy of the LoRA, so each one's share is
          separate). One rank-4 LoRA at its initialisation, reward log p(ship), --n_grad noises.
Redrawn from the measured results in benchmarks/results/ (no computation):
- grad    docs/grad_{cosine,per_call,adjoint}_classroom.png (gradients_h100_classroom.json, the classroom
          checkpoints on an H100) and docs/grad_{cosine,per_call,adjoint}.png (gradients_cpu_epsskip.json)
- compare docs/compare_pareto_cpu.png (compare_cpu.json: reward vs quality, every method)
- ptrain  docs/ptrain_curves_cpu.png (ptrain_cpu.json: target rate, FD and chain_gap along training)
With --eval_csv=PATH: docs/eval_curves.png, the held-out scores along one fine-tuning run (its eval.csv).
The sample grids in docs/ come from the runs that made them (the commit that added each says which).
"""
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # compare_report: the figures it draws

import ddpm
from consistency import jump
from sftlib import config
from sftlib.common import UserError, pick_device, pyplot, run_main, save_figure
from sftlib.models import load_ddpm, load_shortcut
from shortft import base_step, next_t, real_segment, segment_groups

FIGURES = ("chain", "steps", "grad", "compare", "ptrain")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DEFAULTS = dict(models="", n=4, n_grad=8, seed=0, docs=os.path.join(ROOT, "docs"), eval_csv="", device="cpu",
                only="")  # --only: a comma list of FIGURES (default: all)


@torch.no_grad()  # pictures only
def chains(base, student, sched, x_T, groups):
    """States of the real DDIM-50 chain and of the short chain at the short chain's hop points, each
    as (t, x_t) with t = -1 for x_0."""
    steps = ddpm.ddim_timesteps(sched.T, ddpm.N_CHAIN)
    cols = [groups[1][0]] + [g[-1] for g in groups[1:]] + [-1]  # x_741, where each jump lands (501, 261, 1), x_0
    real, x = {}, x_T
    for i, t in enumerate(steps):
        if t in cols:
            real[t] = x
        x = base_step(base, sched, x, t, steps[i + 1] if i + 1 < len(steps) else -1)
    real[-1] = x
    short = {}
    x = real_segment(base, sched, x_T, groups, 0, grad_last=False)  # segment 1: real steps
    short[groups[1][0]] = x
    for j in range(1, len(groups)):
        g = groups[j]
        x = jump(student, sched, x, g[0], g[-1])
        short[g[-1]] = x
        x = base_step(base, sched, x, g[-1], next_t(groups, j, len(g) - 1))
    short[-1] = x
    return cols, real, short


def as_x0(base, sched, x, t):
    if t < 0:
        return x
    eps = base(x, torch.full((len(x),), t, dtype=torch.long, device=x.device))
    return ddpm.predict_x0(sched, x, t, eps).clamp(-1, 1)


def chain_figure(a, folder, device, path):
    plt = pyplot()
    base, sched, _ = load_ddpm(os.path.join(folder, "ddpm", "ckpt.pt"), device)
    student, _, _, edges = load_shortcut(os.path.join(folder, "shortcut", "ckpt.pt"), device)
    groups = segment_groups(ddpm.ddim_timesteps(sched.T, ddpm.N_CHAIN), edges)
    x_T = torch.randn(a["n"], 3, 32, 32, generator=torch.Generator().manual_seed(a["seed"])).to(device)
    cols, real, short = chains(base, student, sched, x_T, groups)
    fig, axes = plt.subplots(2 * a["n"], len(cols), figsize=(1.6 * len(cols), 1.75 * 2 * a["n"]))
    for c, t in enumerate(cols):
        with torch.no_grad():
            r, s = as_x0(base, sched, real[t], t), as_x0(base, sched, short[t], t)
        for i in range(a["n"]):
            for row, img, name in ((2 * i, r[i], "real"), (2 * i + 1, s[i], "short")):
                ax = axes[row, c]
                ax.imshow(((img.permute(1, 2, 0).cpu().numpy() + 1) / 2).clip(0, 1))
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(name, fontsize=8)
                if name == "short" and t != cols[0]:
                    mse = float((real[t][i] - short[t][i]).pow(2).mean())  # distance of the states x_t
                    ax.set_xlabel(f"MSE {mse:.4f}", fontsize=7)
            if i == 0:
                axes[0, c].set_title("x_0" if t < 0 else f"x_{t} (as x0_hat)", fontsize=8)
    fig.suptitle("real DDIM-50 chain (top) vs ShortFT's short chain (bottom), untuned base", fontsize=9)
    save_figure(fig, path)
    print(f"[figures] {path}")


def eval_figure(csv_path, path):
    plt = pyplot()
    if not os.path.isfile(csv_path):
        raise UserError(f"no eval.csv at {csv_path}: run python benchmarks/ft_probe.py --ft_eval_every=N first")
    from sftlib.readers import read_csv

    names, values = read_csv(csv_path, what="eval.csv")  # torn or not numbers: one line
    if not values:
        raise UserError(f"{csv_path} has a header but no rows: run the probe to its end")
    rows = [dict(zip(names, v)) for v in values]
    keys = [k for k in ("target_rate", "reward", "fd", "fd_matched", "fd_target", "diversity", "diversity_target",
                        "chain_gap") if k in rows[0] and np.isfinite(float(rows[0][k]))]
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.6))
    step = [float(r["step"]) for r in rows]
    for ax, k in zip(np.atleast_1d(axes), keys):
        ax.plot(step, [float(r[k]) for r in rows], marker="o")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    save_figure(fig, path)
    print(f"[figures] {path}")


def grad_steps_figure(a, folder, device, path):
    """|g_t| per UNet call for full backprop, DRaFT-1, DRaFT-10 and ShortFT's phase-0 chain (see the docstring)."""
    from torch.func import functional_call

    from sftlib.models import load_reward
    import tlora
    from sftlib import gradstudy
    from shortft import shortft_chain

    base, sched, cfg = load_ddpm(os.path.join(folder, "ddpm", "ckpt.pt"), device)
    student, _, _, edges = load_shortcut(os.path.join(folder, "shortcut", "ckpt.pt"), device)
    steps = ddpm.ddim_timesteps(sched.T, ddpm.N_CHAIN)
    groups = segment_groups(steps, edges)
    reward = load_reward("classifier:ship", folder, device)
    torch.manual_seed(a["seed"])
    tlora.add_lora(base, config.DEFAULTS["lora_rank"], config.DEFAULTS["lora_alpha"], 1)
    base.to(device)
    named = [(n, p) for n, p in base.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    x_T = torch.randn(a["n_grad"], 3, 32, 32, generator=torch.Generator().manual_seed(a["seed"])).to(device)
    full = gradstudy.full_decomposition(base, sched, x_T, steps, reward, params)["calls"]  # (50, P)
    full_norm = full.norm(dim=1).cpu().numpy()
    total = float(full.sum(0).norm())

    copies = []  # ShortFT: each call with a graph runs on its own copy of the LoRA, so its share is separate

    def per_call(x, t):
        if not torch.is_grad_enabled():
            return base(x, t)
        own = {n: p.detach().clone().requires_grad_(True) for n, p in named}
        copies.append((int(t[0]), own))
        return functional_call(base, own, (x, t))
    r = reward(shortft_chain(per_call, student, sched, x_T, groups, phase=0)).mean()
    grads = torch.autograd.grad(r, [p for _, own in copies for p in own.values()])
    n_p = len(named)
    short = {t: float(torch.cat([g.reshape(-1) for g in grads[i * n_p:(i + 1) * n_p]]).norm())
             for i, (t, _) in enumerate(copies)}
    short_total = float(sum(torch.cat([g.reshape(-1) for g in grads[i * n_p:(i + 1) * n_p]])
                            for i in range(len(copies))).norm())

    print("[figures] full backprop |g_t|: " + ", ".join(f"{t}: {v:.3f}" for t, v in zip(steps[::5], full_norm[::5]))
          + f"; |sum| {total:.3f}")
    print("[figures] ShortFT phase 0 |g_t|: " + ", ".join(f"{t}: {v:.3f}" for t, v in short.items())
          + f"; |sum| {short_total:.3f}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, full_norm, marker=".", color="0.4", label=f"full backprop, every call (|sum| = {total:.3g})")
    ax.plot(steps[-10:], full_norm[-10:], "s", ms=9, mfc="none", color="C1", label="DRaFT-10 trains these (the same values)")
    ax.plot(steps[-1:], full_norm[-1:], "D", ms=12, mfc="none", color="C2", label="DRaFT-1 trains this one")
    ax.plot(list(short), list(short.values()), "o", ms=8, color="C3",
            label=f"ShortFT phase 0: its 4 base calls (|sum| = {short_total:.3g})")
    ax.axvspan(groups[0][-1], groups[0][0] + 5, color="C0", alpha=0.08, label="segment 1: ShortFT runs it without a graph")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("timestep t of the UNet call (the chain runs right to left: 981 first)")
    ax.set_ylabel("|g_t|: that call's parameter gradient")
    ax.set_title(f"Where each method's gradient comes from (one rank-{config.DEFAULTS['lora_rank']} LoRA at init, "
                 f"log p(ship), {a['n_grad']} noises)", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)
    print(f"[figures] {path}")


# The same-batch gradient study's figures (bench_gradients.py before its held-out rebuild), redrawn from its results
# UNet calls on the gradient path of one sample (LoRA calls, plus frozen shortcut calls for ShortFT)
GRAD_CALLS = {"draft": 1, "draft_lv": 1, "alignprop": 25, "drtune": 5, "shortft_s0": 7, "shortft_s1": 5, "shortft_s2": 3,
         "shortft_s3": 1, "shortft_naive_s0": 7}


def grad_summarise(runs):
    """Per clip mode and method: the mean, min and max over inits of the cosine and of norm / full norm."""
    rows = {}
    for clip in dict.fromkeys(r["clip"] for r in runs):
        rs = [r for r in runs if r["clip"] == clip]
        for name in rs[0]["methods"]:
            cos = [r["methods"][name]["cos"] for r in rs]
            ratio = [r["methods"][name]["norm"] / r["full_norm"] for r in rs]
            rows[(clip, name)] = dict(cos=float(np.mean(cos)), cos_min=min(cos), cos_max=max(cos),
                                      ratio=float(np.mean(ratio)), ratio_min=min(ratio), ratio_max=max(ratio))
        for K in (1, 2, 5, 10, 20, 35, 50):
            cos = [r["sweep_cos"][K - 1] for r in rs]
            ratio = [r["sweep_norm"][K - 1] / r["full_norm"] for r in rs]
            rows[(clip, f"draft_K{K}")] = dict(cos=float(np.mean(cos)), cos_min=min(cos), cos_max=max(cos),
                                               ratio=float(np.mean(ratio)), ratio_min=min(ratio), ratio_max=max(ratio))
    return rows


def grad_plots(runs, rows, out, suffix=""):
    """docs-style figures of a study: grad_cosine{suffix}.png, grad_per_call{suffix}.png, grad_adjoint{suffix}.png."""
    plt = pyplot()
    steps = ddpm.ddim_timesteps(1000, ddpm.N_CHAIN)
    clips = list(dict.fromkeys(r["clip"] for r in runs))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for clip in clips:
        sweep = np.array([r["sweep_cos"] for r in runs if r["clip"] == clip])  # (inits, 50)
        K = np.arange(1, sweep.shape[1] + 1)
        line, = ax.plot(K, sweep.mean(0), label=f"DRaFT-K, K = 1..50 ({clip} clip)")
        ax.fill_between(K, sweep.min(0), sweep.max(0), color=line.get_color(), alpha=0.2)
        for (c, name), r in rows.items():
            if c == clip and name in GRAD_CALLS:
                ax.errorbar(GRAD_CALLS[name], r["cos"], yerr=[[r["cos"] - r["cos_min"]], [r["cos_max"] - r["cos"]]],
                            fmt="o", color=line.get_color(), ms=4, capsize=2)
                if clip == clips[0]:
                    ax.annotate(name, (GRAD_CALLS[name], r["cos"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("UNet calls on the gradient path of a sample (log)")
    ax.set_ylabel("cosine with the full DDIM-50 gradient")
    ax.set_title("Gradient fidelity at the LoRA's initialisation (mean, min-max over inits)", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(out, f"grad_cosine{suffix}.png"), dpi=110)

    fig, ax = plt.subplots(figsize=(7, 4))
    for clip in clips:
        v = np.array([r["per_call_norm"] for r in runs if r["clip"] == clip])
        ax.plot(steps, v.mean(0), marker=".", label=f"{clip} clip")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("timestep t of the UNet call (the chain runs right to left: 981 first)")
    ax.set_ylabel("|g_t|: the norm of that call's parameter gradient")
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(out, f"grad_per_call{suffix}.png"), dpi=110)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax2 = ax.twinx()
    for clip in clips:
        rs = [r for r in runs if r["clip"] == clip]
        v = np.array([r["adjoint"] for r in rs])
        line, = ax.plot(steps + [0], v.mean(0), marker=".", label=f"|dr/dx_t|, {clip} clip")
        if clip != "none":
            ax2.plot(steps, np.array([r["clipped"] for r in rs]).mean(0), ls="--", color=line.get_color(), alpha=0.6)
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("timestep t (x_0 at 0)")
    ax.set_ylabel("adjoint |dr/dx_t| per sample")
    ax2.set_ylabel("dashed: fraction of x0_hat's pixels clipped")
    ax2.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, os.path.join(out, f"grad_adjoint{suffix}.png"), dpi=110)


def from_results(docs):
    """The figures redrawn from the measured results in benchmarks/results/."""
    def read(name):
        with open(os.path.join(RESULTS, name)) as f:
            return json.load(f)
    for name, suffix in (("gradients_h100_classroom.json", "_classroom"), ("gradients_cpu_epsskip.json", "")):
        runs = read(name)["runs"]
        grad_plots(runs, grad_summarise(runs), docs, suffix)
        print(f"[figures] {docs}/grad_{{cosine,per_call,adjoint}}{suffix}.png from benchmarks/results/{name}")


def main(argv):
    a = dict(DEFAULTS, **config.parse_overrides(argv, DEFAULTS, description=__doc__))
    if a["n"] < 1 or a["n_grad"] < 1:
        raise UserError("--n and --n_grad must be at least 1")
    only = [f for f in a["only"].split(",") if f] or list(FIGURES)
    for f in only:
        if f not in FIGURES:
            raise UserError(f"--only: unknown figure {f!r}: use some of {', '.join(FIGURES)}")
    device = pick_device(a["device"])
    os.makedirs(a["docs"], exist_ok=True)
    if "chain" in only or "steps" in only:
        folder = a["models"]
        if not folder:
            from sftlib import pretrained
            folder = os.path.join(ROOT, "out", "figures_classroom")
            if not os.path.isfile(os.path.join(folder, "evaluator", "ckpt.pt")):
                pretrained.install(dict(config.DEFAULTS, out_dir=folder, data_root=""))
        for stage in ("ddpm", "shortcut") + (("classifier",) if "steps" in only else ()):
            if not os.path.isfile(os.path.join(folder, stage, "ckpt.pt")):
                raise UserError(f"--models={folder} has no {stage}/ckpt.pt")
        if "chain" in only:
            chain_figure(a, folder, device, os.path.join(a["docs"], "chain_short_vs_real.png"))
        if "steps" in only:
            grad_steps_figure(a, folder, device, os.path.join(a["docs"], "grad_per_step_methods.png"))
    if "grad" in only:
        from_results(a["docs"])
    if "compare" in only or "ptrain" in only:
        import compare_report  # the figures of the comparison's earlier protocol (one tuned lr per method)
        for fig, name, draw, out in (("compare", "compare_cpu.json", compare_report.pareto, "compare_pareto_cpu.png"),
                                     ("ptrain", "ptrain_cpu.json", compare_report.curves, "ptrain_curves_cpu.png")):
            if fig in only:
                with open(os.path.join(RESULTS, name)) as f:
                    res = json.load(f)
                draw(res, [n for n in res["summary"] if n != "versus_best"], os.path.join(a["docs"], out))
                print(f"[figures] {a['docs']}/{out} from benchmarks/results/{name}")
    if a["eval_csv"]:
        eval_figure(a["eval_csv"], os.path.join(a["docs"], "eval_curves.png"))


if __name__ == "__main__":
    run_main(main)
