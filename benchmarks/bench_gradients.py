"""The gradient study (sftlib/gradstudy.py): for every method, the cosine between its gradient and the
full DDIM-50 gradient, and its norm; DRaFT-K's depth sweep K = 1..50; the gradient each UNet call
contributes; the adjoint |dr/dx_t| at every t; with the hard x0-clip, the straight-through one and
none. No training: every gradient is taken at the LoRA's initialisation (B = 0, so the model is the base).

    python benchmarks/bench_gradients.py                           # the classroom checkpoints (hours on a CPU: a GPU job)
    python benchmarks/bench_gradients.py --models=out              # a CPU-preset pipeline run: ~30 min on 2 CPU cores
    python benchmarks/bench_gradients.py --n=16 --inits=1 --clips=hard   # a quick look
    python benchmarks/bench_gradients.py --from_results=a/results.json,b/results.json --out=OUT   # merge studies

DRaFT-K is not run as a method: its gradient is exactly the sum of the last K calls' contributions to the
full gradient (tests/test_gradstudy.py), so the depth sweep gives every K, K = 1 included, for free.
Every method's gradient is that of the mean reward over the same --n samples (x_T fixed per init), in
one parameter space: a single LoRA (rank --lora_rank) on every conv and linear layer, for every method
(ShortFT too, so without T-LoRA: its P-Training phases are shortft_s0..s3 on that one LoRA). Each init
is its own seeded LoRA A (B = 0) and its own batch of noise. Writes <out>/results.json, <out>/table.md
and three PNGs (<out>/grad_cosine.png, grad_per_call.png, grad_adjoint.png; --docs=DIR copies them).
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
from sftlib import config
from sftlib.common import UserError, pick_device, pyplot, run_main, save_figure, write_text
from sftlib.gradstudy import cosine, full_decomposition, method_gradient
from sftlib.models import build_finetuned, load_naive_shortcut, load_reward, load_shortcut

DEFAULTS = dict(models="", reward="classifier:ship", n=64, batch=16, inits=3, clips="hard,straight_through,none",
                methods="draft_lv,alignprop,drtune,shortft,shortft_naive", lora_rank=4, out="out/bench_gradients",
                docs="", device="cpu", threads=0,
                from_results="")  # a comma list of results.json (killed or split studies): their runs merged, no new ones
CLIPS = {"hard": True, "straight_through": "straight_through", "none": False}
METHODS = ("draft", "draft_lv", "alignprop", "drtune", "shortft", "shortft_naive")
# UNet calls on the gradient path of one sample (LoRA calls, plus frozen shortcut calls for ShortFT)
CALLS = {"draft": 1, "draft_lv": 1, "alignprop": 25, "drtune": 5, "shortft_s0": 7, "shortft_s1": 5, "shortft_s2": 3,
         "shortft_s3": 1, "shortft_naive_s0": 7}


def models_dir(a):
    """The folder with ddpm/, shortcut/, classifier/ checkpoints: --models, else the classroom ones installed."""
    if a["models"]:
        for stage in ("ddpm", "shortcut", "classifier"):
            if not os.path.isfile(os.path.join(a["models"], stage, "ckpt.pt")):
                raise UserError(f"--models={a['models']} has no {stage}/ckpt.pt: run the pipeline there first")
        return a["models"]
    from sftlib import pretrained
    folder = os.path.join(a["out"], "classroom")
    if not os.path.isfile(os.path.join(folder, "classifier", "ckpt.pt")):
        pretrained.install(dict(config.DEFAULTS, out_dir=folder, data_root=""))
    return folder


def study(a, folder, device, clip, seed):
    """One clip mode and one LoRA init: the decomposition and every method's gradient."""
    cfg = dict(config.DEFAULTS, method="draft", lora_rank=a["lora_rank"], lora_alpha=float(a["lora_rank"]),
               out_dir=folder)
    base = os.path.join(folder, "ddpm", "ckpt.pt")
    student, _, _, edges = load_shortcut(os.path.join(folder, "shortcut", "ckpt.pt"), device)
    naive = load_naive_shortcut(base, device)
    torch.manual_seed(100 + seed)  # the LoRA's A init
    ft, sched = build_finetuned(cfg, base, edges, device)
    ft.unet.eval()
    sched.clip_x0 = CLIPS[clip]
    params = [p for p in ft.unet.parameters() if p.requires_grad]
    reward = load_reward(a["reward"], folder, device)
    steps = ddpm.ddim_timesteps(sched.T, ddpm.N_CHAIN)
    x_T = torch.randn(a["n"], 3, 32, 32, generator=torch.Generator().manual_seed(200 + seed)).to(device)
    batches = [x_T[i:i + a["batch"]] for i in range(0, a["n"], a["batch"])]
    t0 = time.time()
    parts = [full_decomposition(ft, sched, xb, steps, reward, params, a["n"]) for xb in batches]
    calls = sum(p["calls"] for p in parts)  # (50, P)
    full = calls.sum(0)
    w = [len(xb) / a["n"] for xb in batches]
    out = dict(clip=clip, seed=seed, n_params=len(full), full_norm=float(full.norm()),
               reward_mean=float(torch.cat([p["reward"] for p in parts]).mean()),
               per_call_norm=[float(c.norm()) for c in calls],
               adjoint=[float(v) for v in sum(wi * p["adjoint"] for wi, p in zip(w, parts))],
               clipped=[float(v) for v in sum(wi * p["clipped"] for wi, p in zip(w, parts))],
               sweep_cos=[cosine(calls[-K:].sum(0), full) for K in range(1, len(steps) + 1)],
               sweep_norm=[float(calls[-K:].sum(0).norm()) for K in range(1, len(steps) + 1)],
               decomposition_s=time.time() - t0, methods={})
    gen = torch.Generator().manual_seed(300 + seed)  # AlignProp's and DRTune's draws
    torch.manual_seed(400 + seed)  # DRaFT-LV's re-noising
    for m in [x for x in a["methods"].split(",") if x]:
        phases = range(len(ft.groups)) if m == "shortft" else [0] if m == "shortft_naive" else [None]
        for s in phases:
            name = m if s is None else f"{m}_s{s}"
            t0 = time.time()
            g = sum(method_gradient(m, ft, naive if m == "shortft_naive" else student, sched, xb, steps, reward, params,
                                    a["n"], phase=s or 0, generator=gen) for xb in batches)
            out["methods"][name] = dict(cos=cosine(g, full), norm=float(g.norm()), s=time.time() - t0)
    return out


def summarise(runs):
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


def table(rows, runs):
    clips = list(dict.fromkeys(c for c, _ in rows))
    names = list(dict.fromkeys(n for _, n in rows))
    head = "| method | " + " | ".join(f"cos, {c} clip | norm / full, {c} clip" for c in clips) + " |"
    lines = [head, "|---" * (1 + 2 * len(clips)) + "|"]
    for n in names:
        cells = []
        for c in clips:
            r = rows.get((c, n))
            cells += ["-", "-"] if r is None else [f"{r['cos']:.3f} [{r['cos_min']:.3f}, {r['cos_max']:.3f}]",
                                                   f"{r['ratio']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    full = {c: np.mean([r["full_norm"] for r in runs if r["clip"] == c]) for c in clips}
    lines.append("")
    lines.append("full DDIM-50 gradient norm (mean over inits): " + ", ".join(f"{c} {v:.3g}" for c, v in full.items()))
    return "\n".join(lines)


def plots(runs, rows, out, suffix=""):
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
            if c == clip and name in CALLS:
                ax.errorbar(CALLS[name], r["cos"], yerr=[[r["cos"] - r["cos_min"]], [r["cos_max"] - r["cos"]]],
                            fmt="o", color=line.get_color(), ms=4, capsize=2)
                if clip == clips[0]:
                    ax.annotate(name, (CALLS[name], r["cos"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
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


def main(argv):
    a = dict(DEFAULTS, **config.parse_overrides(argv, DEFAULTS, description=__doc__))
    clips = [c for c in a["clips"].split(",") if c]
    for c in clips:
        if c not in CLIPS:
            raise UserError(f"unknown clip mode {c!r}: one of {', '.join(CLIPS)}")
    for m in [x for x in a["methods"].split(",") if x]:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}: one of {', '.join(METHODS)}")
    if a["n"] < 1 or a["batch"] < 1 or a["inits"] < 1:
        raise UserError("--n, --batch and --inits must be at least 1")
    if a["threads"] > 0:
        torch.set_num_threads(a["threads"])
    os.makedirs(a["out"], exist_ok=True)
    runs, t0 = [], time.time()
    if a["from_results"]:  # the table and plots of runs measured before (each file's runs, in order)
        folder, clips = "", []
        for path in a["from_results"].split(","):
            try:
                with open(path) as f:
                    runs += json.load(f)["runs"]
            except (OSError, ValueError, KeyError) as e:
                raise UserError(f"--from_results: cannot read runs from {path!r} ({type(e).__name__})") from None
        if not runs:
            raise UserError("--from_results: the files hold no runs")
    else:
        device = pick_device(a["device"])
        folder = models_dir(a)
    for clip in clips:
        for seed in range(a["inits"]):
            runs.append(study(a, folder, device, clip, seed))
            r = runs[-1]
            write_text(os.path.join(a["out"], "results.json"),  # after every run: a killed study keeps them
                       json.dumps(dict(args=a, models=folder, wall_s=time.time() - t0, runs=runs, partial=True)))
            print(f"[gradients] clip {clip}, init {seed}: full norm {r['full_norm']:.3g}, "
                  + ", ".join(f"{n} {m['cos']:.3f}" for n, m in r["methods"].items())
                  + f" ({time.time() - t0:.0f} s)", flush=True)
    rows = summarise(runs)
    text = table(rows, runs)
    write_text(os.path.join(a["out"], "results.json"), json.dumps(dict(args=a, models=folder, wall_s=time.time() - t0, runs=runs)))
    write_text(os.path.join(a["out"], "table.md"), text + "\n")
    plots(runs, rows, a["out"])
    if a["docs"]:
        os.makedirs(a["docs"], exist_ok=True)
        for name in ("grad_cosine.png", "grad_per_call.png", "grad_adjoint.png"):
            shutil.copyfile(os.path.join(a["out"], name), os.path.join(a["docs"], name))
    print(text)
    print(f"[gradients] {len(runs)} runs in {(time.time() - t0) / 60:.1f} min; {a['out']}/results.json")


if __name__ == "__main__":
    run_main(main)
