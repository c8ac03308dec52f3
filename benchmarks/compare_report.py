"""The comparison's report: the markdown tables (render), the reward-quality plot (pareto) and the curves
along training (curves) of benchmarks/bench_compare.py's results; a module, not a script."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules live at the root

from sftlib.common import pyplot, save_figure  # noqa: E402


def nanmean(v):
    """The mean of the finite values; NaN (without a warning) when there are none."""
    v = np.asarray(v, float)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")


def render(res, names, opts):
    s, before = res["summary"], res["reported"][0]["before"]
    ci = lambda mc, f="{:+.3f}": f"{f.format(mc[0])} [{f.format(mc[1][0])}, {f.format(mc[1][1])}]"
    w = res["wall_s"]
    lines = [f"Equal compute: {opts['seconds']:g} s of fine-tuning per run on {res['device']} ({opts['jobs']} runs at a "
             f"time, {opts['threads']} thread(s) each on a CPU), {len(res['seeds'])} reported seeds {res['seeds']}, "
             f"scored on {opts['n_eval']} DDIM-50 samples of each fine-tuned model from the same fixed noise. "
             f"Means over seeds, bootstrap 95 % intervals over seeds. Wall time: {w['tuning'] / 60:.1f} min tuning + "
             f"{w['reported'] / 60:.1f} min reported runs, {w['total'] / 60:.1f} min in all.", "",
             f"Base model: held-out target rate {before['evaluator_target_rate']:.3f}, class-matched FD "
             f"{before['fd_matched']:.2f} (floor {before.get('fd_matched_floor', float('nan')):.2f}), within-target FD "
             f"{before.get('fd_target', float('nan')):.2f}, target diversity {before.get('diversity_target', float('nan')):.2f}.", "",
             "| method | lr | steps | ms/step | step peak MiB | grad norm p95 / max | held-out target rate gain "
             "| log p(target) gain | class-matched FD after | within-target FD | target diversity | reward after "
             "| chain_gap after |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        r = s[n]
        lines.append(f"| {n} | {r['lr']:g} | {r['steps']:.0f} | {r['ms']:.0f} | {res['step_peak_mib'][n]:.0f} "
                     f"| {r['grad_p95_median']:.3g} / {r['grad_max']:.3g} | {ci(r['gain_mean_ci'])} "
                     f"| {ci(r['logp_gain_mean_ci'], '{:+.2f}')} | {ci(r['fd_matched_after_mean_ci'], '{:.2f}')} "
                     f"| {r['fd_target_after_mean']:.2f} | {r['diversity_target_after_mean']:.2f} "
                     f"| {r['reward_after_mean']:.3f} | {r['chain_gap_after_mean']:.4f} |")
    if "versus_best" in s:
        v = s["versus_best"]
        lines += ["", f"ShortFT against the best baseline ({v['best']}, re-chosen in every resample): difference of "
                  f"gains {ci((v['diff'], v['diff_ci']))}; ratio {v['ratio']:.2f} "
                  f"[{v['ratio_ci'][0]:.2f}, {v['ratio_ci'][1]:.2f}]"
                  + (f" (undefined in {v['p_ratio_undefined']:.0%} of the resamples, where the best baseline's gain "
                     f"was <= 0)" if v["p_ratio_undefined"] > 0 else "")]
    if res["tuning"]:
        lines += ["", f"Tuning on seeds {res['tune_seeds']} (the rule: the lr at which the class-matched FD after "
                  f"reaches {opts['fd_tol']:g}x the base's, interpolated in log lr). Each cell: target rate after / "
                  f"class-matched FD after.", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in res["lrs"]) + " | chosen lr |",
                  "|---|" + "---|" * (len(res["lrs"]) + 1)]
        for n in names:
            cells = []
            for lr in res["lrs"]:
                rs = [r for r in res["tuning"] if r["name"] == n and r["lr"] == lr]
                t = np.mean([r["after"]["evaluator_target_rate"] for r in rs])
                f = np.mean([r["after"]["fd_matched"] for r in rs])
                cells.append(f"{t:.3f} / {f:.2f}")
            c = res["chosen"][n]
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {c['lr']:g} ({c['why']}) |")
    lines += ["", "Fidelity of the short chain: MSE to the untuned base model's DDIM-50 x_0 from the same x_T "
              "(64 samples):", "", "| chain | MSE |", "|---|---|"]
    lines += [f"| {name} | {v:.4f} |" for name, v in res["chain_fidelity"]]
    return "\n".join(lines)


def pareto(res, names, path):
    """Held-out target rate (up: more of the target) against class-matched FD (right: more damage): every
    tuning run (small, joined by lr) and each method's reported mean with its 95 % intervals."""
    fig, ax = pyplot().subplots(figsize=(7, 5))
    b = res["reported"][0]["before"]
    ax.scatter([b["fd_matched"]], [b["evaluator_target_rate"]], marker="*", s=200, color="k", label="base model", zorder=5)
    ax.axvline(res["opts"]["fd_tol"] * b["fd_matched"], ls="--", color="gray", lw=1,
               label=f"tuning rule's FD bound ({res['opts']['fd_tol']:g}x the base's)")
    for n in names:
        s = res["summary"][n]
        pts = [(np.mean([r["after"]["fd_matched"] for r in res["tuning"] if r["name"] == n and r["lr"] == lr]),
                np.mean([r["after"]["evaluator_target_rate"] for r in res["tuning"] if r["name"] == n and r["lr"] == lr]))
               for lr in res["lrs"] if any(r["name"] == n and r["lr"] == lr for r in res["tuning"])]
        (x, xc), (y, yc) = s["fd_matched_after_mean_ci"], s["rate_after_mean_ci"]
        eb = ax.errorbar([x], [y], xerr=[[x - xc[0]], [xc[1] - x]], yerr=[[y - yc[0]], [yc[1] - y]], fmt="o", ms=7,
                         capsize=3, label=f"{n} (lr {s['lr']:g})")
        if pts:
            ax.plot(*zip(*pts), ":", marker=".", color=eb[0].get_color(), alpha=0.6)
    ax.set_xlabel("class-matched Fréchet distance after (evaluator features; lower = less damage)")
    ax.set_ylabel("held-out target rate after")
    ax.set_title("reward vs quality: reported mean ± 95 % CI; dotted: the lr grid (tuning seeds)", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)


def curves(res, names, path):
    """Along training (eval.csv points, mean over the reported seeds): the held-out target rate, the
    class-matched FD and, for the ShortFT runs, chain_gap."""
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4))
    for n in names:
        rs = [r for r in res["reported"] if r["name"] == n]
        m = min(len(r["curve"]) for r in rs)
        t = np.mean([[c["train_s"] for c in r["curve"][:m]] for r in rs], 0)
        for ax, key in zip(axes, ("target_rate", "fd_matched", "chain_gap")):
            y = np.array([[c.get(key, float("nan")) for c in r["curve"][:m]] for r in rs], float)
            if np.isfinite(y).any():
                ax.plot(t, np.nanmean(y, 0), marker=".", label=n)
    for ax, lab in zip(axes, ("held-out target rate", "class-matched FD", "chain_gap (ShortFT chain x_0 vs real DDIM-50 x_0)")):
        ax.set_xlabel("training seconds")
        ax.set_ylabel(lab)
        ax.legend(fontsize=7)
    save_figure(fig, path)
