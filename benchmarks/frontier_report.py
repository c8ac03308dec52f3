"""The comparison's report (benchmarks/bench_compare.py): the summary of its runs along frontiers
(benchmarks/frontier.py), the markdown tables and the figures; a module, not a script."""
import math
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from frontier import bootstrap_mean, frontier_at, matched, paired_difference  # noqa: E402
from sftlib.common import pyplot, save_figure  # noqa: E402
from sftlib.readers import read_npz  # noqa: E402

SAMPLES = {"x": ("u", (None, 32, 32, 3))}  # what ft_probe.py writes as samples_after.npz: uint8 NHWC
ABLATIONS = (("one LoRA (the primary arm)", "shortft"), ("+ T-LoRA (k LoRAs, stacked)", "shortft_tlora"),
             ("+ T-LoRA + P-Training", "shortft_tlora_ptrain"), ("naive jump (the base's one DDIM step)", "shortft_naive"),
             ("distilled shortcut (= the primary arm)", "shortft"), ("perfect shortcut (the base's real steps)", "shortft_perfect"))


def axes(reward):
    """(value key, its label, cost key, its label) of a reward's frontier, in ft_probe's curve points."""
    value = ("judge_target_rate", f"judge's {reward.split(':')[1]} rate") if re.match(r"classifier:\w+$", reward) \
        else ("reward", f"mean {reward}")
    return (*value, "judge_fd", "judge FD rise")


def curves_of(res, reward, name):
    """{seed: [curve, ...]} of an arm: each run's points (cost rise, value gain) over its own first point."""
    vk, _, ck, _ = axes(reward)
    out = {}
    for r in res["runs"]:
        if r["reward"] == reward and r["name"] == name:
            p0 = r["curve"][0]
            out.setdefault(r["seed"], []).append([(p[ck] - p0[ck], p[vk] - p0[vk]) for p in r["curve"]])
    return out


def summarise(res):
    """Per reward: the base's axes, the matched-cost table (every arm at every cost level, with its
    difference to ShortFT), the equal-lr table and steps per run."""
    s = {}
    for reward in res["rewards"]:
        vk, _, ck, _ = axes(reward)
        rs = [r for r in res["runs"] if r["reward"] == reward]
        if not rs:
            continue
        base = rs[0]["curve"][0]
        if not all(math.isfinite(r["curve"][0][ck]) for r in rs):
            raise ValueError(f"runs of {reward} have no {ck}: the judge stage is missing in their folder")
        cur = {n: curves_of(res, reward, n) for n in res["arms"][reward]}
        m = {}
        for lv in res["cost_levels"]:
            c = lv * base[ck]
            row = {n: matched(cur[n], c, res["opts"]["n_boot"]) for n in cur}
            if "shortft" in row:
                for n in row:
                    if n != "shortft":
                        row[n]["minus_shortft"] = paired_difference(row[n]["per_seed"], row["shortft"]["per_seed"],
                                                                    res["opts"]["n_boot"])
            m[f"{lv:g}"] = dict(cost=c, arms=row)
        eq = {}
        for n in cur:
            for lr in res["lrs"]:
                last = [r["curve"][-1] for r in rs if r["name"] == n and r["lr"] == lr]
                first = [r["curve"][0] for r in rs if r["name"] == n and r["lr"] == lr]
                steps = [r["steps"] for r in rs if r["name"] == n and r["lr"] == lr]
                if last:
                    gain = [a[vk] - b[vk] for a, b in zip(last, first)]
                    eq.setdefault(n, {})[f"{lr:g}"] = dict(
                        value_gain=bootstrap_mean(gain, res["opts"]["n_boot"]),
                        cost=float(np.mean([a[ck] - b[ck] for a, b in zip(last, first)])),
                        eval_rate=float(np.mean([a["target_rate"] for a in last])),
                        diversity=float(np.mean([a["judge_diversity"] for a in last])), steps=float(np.median(steps)))
        s[reward] = dict(base={vk: base[vk], ck: base[ck]}, matched=m, equal_lr=eq,
                         ms={n: res["opts"].get("step_ms", {}).get(n, float("nan")) for n in cur})  # calibrated, alone
    return s


def fmt(mc, f="{:+.3f}"):
    return f"{f.format(mc[0])} [{f.format(mc[1][0])}, {f.format(mc[1][1])}]"


def render(res):
    o, w = res["opts"], res["wall_s"]
    lines = [f"Equal compute: {o['seconds']:g} s of fine-tuning per run (batch {o['ft_batch']}) on {res['device']} "
             f"({o['jobs']} runs at a time, {o['threads']} thread(s) each on a CPU); lrs {', '.join(f'{x:g}' for x in res['lrs'])}; "
             f"seeds {res['seeds']}; scored every {o['eval_every_s']:g} training s on {o['n_eval']} DDIM-50 samples from "
             f"the same fixed noise. Wall time {w['total'] / 60:.1f} min. Intervals: bootstrap 95 % over seeds."]
    per = sorted(r["wall_s"] for r in res["runs"] if isinstance(r.get("wall_s"), (int, float)))
    if per:  # every run's own wall time is in results.json
        lines[0] += (f" Each run's wall time (the whole process, scoring included): median {per[len(per) // 2]:.0f} s, "
                     f"from {per[0]:.0f} to {per[-1]:.0f} s over {len(per)} runs.")
    for reward, s in res["summary"].items():
        vk, vl, ck, cl = axes(reward)
        lines += ["", f"### {reward}", "", f"Base model: {vl} {s['base'][vk]:.3f}, judge FD {s['base'][ck]:.3f}. "
                  f"Each cell: the frontier's {vl} gain at that {cl}; `unbracketed (n)`: n seeds where no run reached "
                  f"the cost; Δ: the arm minus ShortFT, paired by seed.", ""]
        levels = list(s["matched"])
        lines += ["| arm | ms/step alone | " + " | ".join(f"{cl} {float(lv):g}x base ({s['matched'][lv]['cost']:.2f})"
                                                   for lv in levels) + " |", "|---|---|" + "---|" * len(levels)]
        for n in res["arms"][reward]:
            cells = []
            for lv in levels:
                a = s["matched"][lv]["arms"][n]
                txt = fmt((a["mean"], a["ci"])) if math.isfinite(a["mean"]) else "–"
                if not a["bracketed"]:
                    txt += f" unbracketed ({a['n_unbracketed']})"
                if "minus_shortft" in a and math.isfinite(a["minus_shortft"][0]):
                    txt += f"; Δ {fmt(a['minus_shortft'])}"
                cells.append(txt)
            lines.append(f"| {n} | {s['ms'][n]:.0f} | " + " | ".join(cells) + " |")
        lines += ["", f"Equal lr (the last point of each run): {vl} gain [95 % CI] / {cl} / evaluator target rate / "
                  f"judge diversity / optimizer steps.", "",
                  "| arm | " + " | ".join(f"lr {x:g}" for x in res["lrs"]) + " |", "|---|" + "---|" * len(res["lrs"])]
        for n, row in s["equal_lr"].items():
            lines.append(f"| {n} | " + " | ".join(
                f"{fmt(c['value_gain'])} / {c['cost']:.2f} / {c['eval_rate']:.2f} / {c['diversity']:.2f} / {c['steps']:.0f}"
                if (c := row.get(f"{x:g}")) else "–" for x in res["lrs"]) + " |")
        abl = [(label, n) for label, n in ABLATIONS if n in res["arms"][reward]]
        if len(abl) > 2:
            mid = levels[len(levels) // 2]
            lines += ["", f"Ablations at {cl} {float(mid):g}x the base's:", "", "| arm | frontier gain |", "|---|---|"]
            lines += [f"| {label} (`{n}`) | {fmt((a['mean'], a['ci']))}{'' if a['bracketed'] else ' unbracketed'} |"
                      for label, n in abl for a in [s["matched"][mid]["arms"][n]]]
    for reward, rows in res.get("inception", {}).items():
        cls = "fd_class" in rows["base"]
        lines += ["", f"Inception ({reward}; features neither the reward nor the judge saw), the runs of the grid, "
                  f"{rows['base']['n']} samples each (FID biased up at this N; compare rows, not papers):", "",
                  "| arm | FID vs test | KID vs test |" + (" FD to real target-class test images |" if cls else ""),
                  "|---|---|---|" + ("---|" if cls else "")]
        lines += [f"| {n} | {r['fid']:.1f} | {r['kid']:.4f} |" + (f" {r['fd_class']:.1f} (floor {r['fd_class_floor']:.1f}) |"
                                                               if cls else "") for n, r in rows.items()]
    lines += ["", "Step peak memory (MiB): " + ", ".join(f"{n} {v:.0f}" for n, v in res["step_peak_mib"].items()),
              "", "Fidelity of the short chain: MSE to the untuned base's DDIM-50 x_0 from the same x_T (64 samples): "
              + "; ".join(f"{name} {v:.4f}" for name, v in res["chain_fidelity"])]
    return "\n".join(lines)


def figures(res, folder, device):
    """frontier_<reward>.png (each arm's mean frontier over seeds against cost, every run's points faint)
    and grid_<reward>.png (8 samples per arm, same noise: its first-seed run ending nearest the middle cost)."""
    plt = pyplot()
    for reward, s in res["summary"].items():
        vk, vl, ck, cl = axes(reward)
        tag = re.sub(r"[^A-Za-z0-9.]+", "-", reward).strip("-")
        fig, ax = plt.subplots(figsize=(7, 5))
        top = max(p[0] for n in res["arms"][reward] for cs in curves_of(res, reward, n).values() for cv in cs for p in cv)
        grid = np.linspace(0, max(top, 1e-6), 60)
        for n in res["arms"][reward]:
            cur = curves_of(res, reward, n)
            pts = np.array([p for cs in cur.values() for cv in cs for p in cv])
            ys = np.array([[frontier_at(cur[sd], c)[0] for c in grid] for sd in cur])
            reach = min(max(p[0] for cv in cs for p in cv) for cs in cur.values())  # bracketed on every seed up to here
            line, = ax.plot(grid[grid <= reach], np.nanmean(ys, 0)[grid <= reach], label=n)
            ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.25, color=line.get_color())
        for lv in s["matched"].values():
            ax.axvline(lv["cost"], ls=":", color="gray", lw=1)
        ax.set_xlabel(f"quality cost: {cl} over the base (judge features, held out)")
        ax.set_ylabel(f"{vl} gain over the base (held out)")
        ax.set_title(f"{reward}: frontier, mean over {len(res['seeds'])} seeds, drawn where every seed brackets it; "
                     f"dots: every run along training", fontsize=8)
        ax.legend(fontsize=7)
        save_figure(fig, os.path.join(folder, f"frontier_{tag}.png"), dpi=110)
        sample_grid(res, reward, s, folder, tag, device)


def sample_grid(res, reward, s, folder, tag, device):
    import torch

    from sftlib.common import save_grid
    from sftlib.metrics import ddim50
    from sftlib.models import load_ddpm

    _, _, ck, _ = axes(reward)
    mid = list(s["matched"].values())[len(s["matched"]) // 2]["cost"]
    rows = []
    for n in res["arms"][reward]:
        rs = [r for r in res["runs"] if r["reward"] == reward and r["name"] == n and r["seed"] == res["seeds"][0]]
        best = min(rs, key=lambda r: abs(r["curve"][-1][ck] - r["curve"][0][ck] - mid))
        res.setdefault("grid_runs", {}).setdefault(reward, {})[n] = best["dir"]
        x = read_npz(os.path.join(res["opts"]["out_dir"], best["dir"], "samples_after.npz"), SAMPLES, "samples file")["x"]
        rows.append(torch.from_numpy(x[:8]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    unet, sched, _ = load_ddpm(os.path.join(res["opts"]["out_dir"], "ddpm", "ckpt.pt"), device)
    x_T = torch.randn(res["opts"]["n_eval"], 3, 32, 32, generator=torch.Generator().manual_seed(4321))[:8].to(device)
    base = ddim50(unet, sched, x_T).cpu()  # the same fixed noise as every run's evaluation (train_shortft.py)
    save_grid(torch.cat([base, *rows]), os.path.join(folder, f"grid_{tag}.png"))


def inception_rows(res, device, n_ref=500):
    """Inception, at the end only (0.25-0.5 s per image on a CPU core): for every arm, the samples of the run
    drawn in grid_<reward>.png (its first seed's run ending nearest the middle cost, res["grid_runs"]) and
    the base's. FID and KID against the CIFAR-10 test split; with a class reward also the Fréchet distance
    to the first n_ref real test images of the target class, beside its floor (as many real training images
    of that class). Features the reward and the judge never saw."""
    import torch

    from rewards import CLASSES
    from sftlib import fid, metrics
    from sftlib.common import load_checkpoint
    from sftlib.data import load_cifar10
    from sftlib.models import load_ddpm

    out_dir = res["opts"]["out_dir"]
    model = fid.load_inception(device)
    ref = metrics.fid_reference(out_dir, device)
    feats = lambda x: fid.inception_features(x, device, metrics.batch_for(device), model, progress=False)  # noqa: E731
    root = load_checkpoint(os.path.join(out_dir, "ddpm", "ckpt.pt"), "ddpm")["config"]["data_root"]
    unet, sched, _ = load_ddpm(os.path.join(out_dir, "ddpm", "ckpt.pt"), device)
    x_T = torch.randn(res["opts"]["n_eval"], 3, 32, 32, generator=torch.Generator().manual_seed(4321)).to(device)
    base = fid.to_uint8(metrics.ddim50(unet, sched, x_T))
    rows = {}
    for reward, grid in res["grid_runs"].items():
        target = reward.split(":")[1] if re.match(r"classifier:\w+$", reward) else None
        cls = None
        if target:
            x, y = load_cifar10(root, "test", 0, os.path.join(out_dir, "cache"))
            xt, yt = load_cifar10(root, "train", 0, os.path.join(out_dir, "cache"))
            c = CLASSES.index(target)
            cls = feats(x[y == c][:n_ref].permute(0, 2, 3, 1).numpy())
            floor = fid.fid_from_features(feats(xt[yt == c][:len(base)].permute(0, 2, 3, 1).numpy()), cls)
        for name, path in [("base", None), *grid.items()]:
            imgs = base if path is None else read_npz(os.path.join(out_dir, path, "samples_after.npz"), SAMPLES,
                                                      "samples file")["x"]
            f = feats(imgs)
            r = dict(fid=fid.frechet_distance(*fid.gaussian_stats(f), ref["mu"], ref["sigma"]),
                     kid=fid.kid_from_features(f, ref["kid_features"])[0], n=len(f))
            if cls is not None:
                r.update(fd_class=fid.fid_from_features(f, cls), fd_class_floor=floor)
            rows.setdefault(reward, {})[name] = r
    return rows
