"""The sections of docs/results.md (benchmarks/results_doc.py), one renderer per kind of results file, and the
helpers they share (Ctx reads a file and is blamed for what goes wrong, num/table/cols/tags format). No torch."""
import json
import math
import os
import re
from statistics import fmean as mean

from results_registry import RECIPES, REGISTRY, SPANS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Bad(Exception): """A results file that cannot be used: the message names it."""  # noqa: E701


class Ctx:
    """Reads the results files; an error in rendering is blamed on the last file read."""

    def __init__(self, folder):
        self.folder, self.last = folder, None

    def path(self, name):  # from the repository root when the file lies inside it
        p = os.path.join(self.folder, name)
        return os.path.relpath(p, ROOT) if p.startswith(ROOT + os.sep) else p

    def text(self, name):
        try:
            self.last = name
            with open(os.path.join(self.folder, name), encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise Bad(f"{self.path(name)}: cannot be read ({e.__class__.__name__})")

    def load(self, name, text=None):  # a JSON object; anything else fails in rendering, blamed on this file
        try:
            return json.loads(self.text(name) if text is None else text)
        except ValueError as e:
            raise Bad(f"{self.path(name)}: not valid JSON ({str(e).splitlines()[0]})")


def num(x, spec="{:.3f}"):
    return "-" if x is None else "n/a" if isinstance(x, float) and math.isnan(x) else spec.format(x)


def table(head, rows):
    line = lambda r: "| " + " | ".join(str(c) for c in r) + " |"
    return [line(head), "|" + "---|" * len(head)] + [line(r) for r in rows]


def cols(records, *spec):
    """A table of dicts; each column is "header[=key][:format]" (key: the header; no format: the value as it is)."""
    spec = [(h, k or h, f or "{}") for c in spec for head, _, f in [c.partition(":")] for h, _, k in [head.partition("=")]]
    return table([h for h, _, _ in spec], [[num(r.get(k), f) for _, k, f in spec] for r in records])


def tags(name, recorded=None, device=None, command=None):
    """A table's tag lines: file, base model, commit, command; `recorded`: a note, or options (a dict) from the file."""
    commit, base, cmd = REGISTRY[name]
    if isinstance(recorded, dict):
        recorded = ", ".join(f"`{k}={v}`" for k, v in sorted(recorded.items()) if v not in ("", None, False, 0))
    return [x for x in (f"- **File:** `benchmarks/results/{name}`", f"- **Base model:** {base}",
                        f"- **Commit:** `{commit}` (added the file)", (command or cmd) and f"- **Command:** `{command or cmd}`",
                        recorded and f"- **Recorded in the file:** {recorded}",
                        device and f"- **Device, as the file records it:** {device}") if x] + [""]


def compare(ctx, name, title, curves=False):
    d = ctx.load(name)
    o, s, w, before = d["opts"], d["summary"], d["wall_s"], d["reported"][0]["before"]
    names, mins = [n for n in s if n != "versus_best"], lambda k: num(w[k] / 60, "{:.1f}")
    ci = lambda mc, f="{:+.3f}": f"{num(mc[0], f)} [{num(mc[1][0], f)}, {num(mc[1][1], f)}]"  # mean [95 % interval]
    out = [f"### {title}", ""] + tags(name, o) + [
        f"Equal compute: {num(o['seconds'], '{:g}')} s of fine-tuning per run on {d['device']} ({o['jobs']} runs at a time, "
        f"{o['threads']} thread(s) each), {len(d['seeds'])} reported seeds {d['seeds']}, scored on {o['n_eval']} DDIM-50 "
        f"samples of each fine-tuned model from the same fixed noise. Means over seeds, bootstrap 95 % intervals over seeds. "
        f"Wall time: {mins('tuning')} min tuning + {mins('reported')} min reported runs, {mins('total')} min in all.", "",
        f"Base model's scores: held-out target rate {num(before['evaluator_target_rate'])}, class-matched FD "
        f"{num(before['fd_matched'], '{:.2f}')} (floor {num(before.get('fd_matched_floor'), '{:.2f}')}), within-target FD "
        f"{num(before.get('fd_target'), '{:.2f}')}, target diversity {num(before.get('diversity_target'), '{:.2f}')}.", ""]
    out += table(["method", "lr", "steps", "ms/step", "step peak MiB", "grad norm p95 / max", "held-out target rate gain",
                  "log p(target) gain", "class-matched FD after", "within-target FD", "target diversity", "reward after",
                  "chain_gap after"],
                 [[n, num(r["lr"], "{:g}"), num(r["steps"], "{:.0f}"), num(r["ms"], "{:.0f}"),
                   num(d["step_peak_mib"][n], "{:.0f}"), f"{num(r['grad_p95_median'], '{:.3g}')} / {num(r['grad_max'], '{:.3g}')}",
                   ci(r["gain_mean_ci"]), ci(r["logp_gain_mean_ci"], "{:+.2f}"), ci(r["fd_matched_after_mean_ci"], "{:.2f}"),
                   num(r["fd_target_after_mean"], "{:.2f}"), num(r["diversity_target_after_mean"], "{:.2f}"),
                   num(r["reward_after_mean"]), num(r["chain_gap_after_mean"], "{:.4f}")] for n, r in ((n, s[n]) for n in names)])
    if v := s.get("versus_best"):
        out += ["", f"ShortFT against the best baseline ({v['best']}, re-chosen in every resample): difference of gains "
                f"{ci((v['diff'], v['diff_ci']))}; ratio {ci((v['ratio'], v['ratio_ci']), '{:.2f}')} (undefined in "
                f"{num(v['p_ratio_undefined'], '{:.0%}')} of the resamples)."]
    if d["tuning"]:
        pick = lambda n, lr, k: mean([r["after"][k] for r in d["tuning"] if r["name"] == n and r["lr"] == lr])
        out += ["", f"Tuning on seeds {d['tune_seeds']}: each cell is the target rate after / class-matched FD after (the rule: "
                f"the lr at which the class-matched FD after reaches {num(o['fd_tol'], '{:g}')}x the base's).", ""]
        out += table(["method"] + [f"lr {num(lr, '{:g}')}" for lr in d["lrs"]] + ["chosen lr"],
                     [[n] + [f"{num(pick(n, lr, 'evaluator_target_rate'))} / {num(pick(n, lr, 'fd_matched'), '{:.2f}')}"
                             for lr in d["lrs"]] + [f"{num(d['chosen'][n]['lr'], '{:g}')} ({d['chosen'][n]['why']})"]
                      for n in names])
    if curves:
        runs = {n: [r for r in d["reported"] if r["name"] == n] for n in names}
        at = lambda rs, k, f="{:.3f}": " → ".join(num(mean([r["curve"][i].get(k) for r in rs]), f)
                                                  for i in range(min(len(r["curve"]) for r in rs)))
        out += ["", "Along training: means over the seeds at each evaluation (as many as the shortest run has):", ""]
        out += table(["method", "training seconds", "chain_gap", "held-out target rate", "class-matched FD"],
                     [[n, at(rs, "train_s", "{:.1f}"), at(rs, "chain_gap", "{:.4f}"), at(rs, "target_rate"),
                       at(rs, "fd_matched", "{:.2f}")] for n, rs in runs.items()])
    out += ["", "Fidelity of the short chain: mean squared error to the untuned base model's DDIM-50 x_0 from the same x_T:", ""]
    return out + table(["chain", "MSE"], [[c, num(v, "{:.4f}")] for c, v in d["chain_fidelity"]]) + [""]


def gradients(ctx, name, title):
    runs, a = (d := ctx.load(name))["runs"], d["args"]
    clips, cells = list(dict.fromkeys(r["clip"] for r in runs)), {}
    for clip in clips:
        rs = [r for r in runs if r["clip"] == clip]
        per = {n: ([r["methods"][n]["cos"] for r in rs], [r["methods"][n]["norm"] / r["full_norm"] for r in rs])
               for n in rs[0]["methods"]}
        for K in (1, 2, 5, 10, 20, 35, 50):  # DRaFT-K is exactly the last K calls' share (bench_gradients.summarise)
            per[f"draft_K{K}"] = ([r["sweep_cos"][K - 1] for r in rs], [r["sweep_norm"][K - 1] / r["full_norm"] for r in rs])
        cells.update({(clip, n): [f"{num(mean(v))} [{num(min(v))}, {num(max(v))}]" for v in vs] for n, vs in per.items()})
    inits = ", ".join(f"{c}: {len([r for r in runs if r['clip'] == c])}" for c in clips)
    full = ", ".join(f"{c} {num(mean([r['full_norm'] for r in runs if r['clip'] == c]), '{:.3g}')}" for c in clips)
    return ([f"### {title}", ""] + tags(name, a) +
            [f"Mean [min, max] over LoRA initialisations ({inits}), {a['n']} samples each, one rank-{a['lora_rank']} LoRA "
             "for every method; `shortft_s<i>` is ShortFT's chain at P-Training phase i, `draft_K<K>` the last K calls.", ""]
            + table(["method"] + [h for c in clips for h in (f"cos, {c} clip", f"norm / full, {c} clip")],
                    [[n] + [x for c in clips for x in cells.get((c, n), ["-", "-"])] for n in dict.fromkeys(n for _, n in cells)])
            + ["", f"Full DDIM-50 gradient norm (mean over inits): {full}.", ""])


def spans(ctx, names):
    jumps, speed, srcs = {}, {}, []
    for name in names:
        txt = ctx.text(name)
        j = ctx.load(name, ([ln for ln in txt.splitlines() if ln.startswith("{")] or [""])[-1])
        key, (c, b, _) = name[len("shortcut_spans_"):-len(".txt")], REGISTRY[name]
        for x in j["jumps"]:
            jumps.setdefault((x["kind"], x["span"], x["ddim_steps"]), {})[key] = x["ratio"]
        speed[key] = num(j["shortcut_img_per_s"], "{:.1f}")
        srcs.append(f"- `{key}`: `benchmarks/results/{name}`; **base model:** {b}; **commit:** `{c}`; `{txt.splitlines()[0]}`")
    grads = [[key, g["reward"], at, *(f"{num(v[0])} [{num(v[1][0])}, {num(v[1][1])}]" for v in (c["student"], c["naive"]))]
             for name in names for key in [name[len("shortcut_spans_"):-len(".txt")]]
             for j in [ctx.load(name, ([ln for ln in ctx.text(name).splitlines() if ln.startswith("{")] or [""])[-1])]
             for g in j.get("reward_gradients", []) for at, c in g.items() if at != "reward"]
    extra = ["", "The reward's gradient through the short chain against through DDIM-50 from the same x_T: cosine at x_0 "
             "and at x_741 (mean [bootstrap 95 %] over samples; the perfect shortcut is 1 by construction):", ""] + table(
        ["column", "reward", "at", "distilled shortcut", "naive jump"], grads) if grads else []
    return (["### The distilled jump against the naive one, span by span", "",
             f"- **Command:** `{SPANS}` on each column's models", "- **Columns** (file, base model, commit):"] + srcs
            + ["", "One jump from the teacher's DDIM-50 point at the span's start: the student's mean squared error to the "
               "teacher's point at its end, over the naive jump's (below 1: the distilled jump lands closer).", ""]
            + table(["chain", "span", "DDIM steps"] + list(speed), [[k, s, n] + [num(v.get(c), "{:.2f}×") for c in speed]
                                                                   for (k, s, n), v in jumps.items()]
                    + [["distillation step", "img/s", ""] + list(speed.values())]) + extra + [""])


def cd_dynamics(ctx, names):
    body, srcs = [], []
    for name in names:
        d = ctx.load(name)
        for key, r in d["runs"].items():
            g = r["grad_norm"][-5:]
            body.append([f"`{name[:-5]}`", re.sub(r".*\((.*)\).*", r"\1", key), num(r["target_ema"], "{:g}"),
                         key.rsplit("lr=", 1)[-1], " → ".join(f"{num(v)} ({s})" for s, v in r["curve"]),
                         f"{num(min(g), '{:.0f}')}–{num(max(g), '{:.0f}')}"])
        a, (c, b, _) = d["args"], REGISTRY[name]
        cmd = "python benchmarks/cd_dynamics.py " + " ".join(f"--{k}={a[k]}" for k in sorted(a) if a[k] not in ("", None))
        srcs.append(f"- `{name[:-5]}`: `benchmarks/results/{name}`; **base model:** {b}; **commit:** `{c}`; "
                    f"**command, from the recorded args:** `{cmd}`")
    return (["### The first steps of consistency distillation", "", "- **Rows** (file, base model, commit, command):"] + srcs
            + ["", "The online student's CD loss (pseudo-Huber, on fixed batches of real images with the same noise at every "
               "point; step 0 is the teacher itself) at each recorded step (in brackets), and the gradient norm before "
               "clipping over the last 5 steps:", ""]
            + table(["source", "base", "target EMA (0: the stop-grad student)", "lr", "CD loss (step)",
                     "grad norm, last 5 steps"], body) + [""])


def gpu(ctx):
    d = ctx.load("gpu_h200.json")
    dev = "{device}, torch {torch}, CUDA {cuda}".format(**d["env"])
    out = ["### Training steps, the methods, SD 1.5 shapes", ""] + tags("gpu_h200.json", d["env"]["opts"], dev)
    out += [f"Each stage's training step ({dev}); warm-up is the untimed first steps, or the compilation:", ""]
    out += cols(d["stages"], "stage", "precision=mode", "batch", "steps/s=steps_per_s:{:.2f}", "img/s=img_per_s:{:.0f}",
                "peak MiB=peak_mib", "warm-up s=warmup_s:{:.2f}")
    out += ["", f"One fine-tuning step per method on the GPU preset's UNet ({dev}):", ""]
    out += cols(d["methods"], "method", "bf16", "batch", "ms/step=ms_per_step:{:.0f}", "peak MiB=peak_mib")
    out += ["", f"Stable Diffusion 1.5 shapes, random weights (`benchmarks/bench_sd.py`, a process per method; {dev}):", ""]
    out += cols(d["sd"], "method", "size", "resolution", "batch", "bf16", "ms/step=ms_per_step:{:.0f}",
                "peak MiB=peak_mib:{:.0f}", "not measured=error")
    out += ["", f"The classroom checkpoints, trained beside the benchmark (whole run: {num(d['total_s'], '{:.0f}')} s): what "
            f"each stage exported ({dev}):", ""] + cols([dict(r, stage=k) for k, r in d["classroom_export"].items()],
                                                        "classroom export=stage", "step", "training s=elapsed:{:.1f}",
                                                        "test accuracy=test_acc:{:.4f}") + [""]
    f = ctx.load("gpu_h200_fid.json")
    dev = "{device}, torch {torch}, CUDA {cuda}".format(**f["env"])
    body = [dict(r, name=k, images=f"{r['n_train']} train, {r['n_test']} test" if "n_train" in r else r.get("n"),
                 kid=f"{num(r['kid'][0], '{:.3g}')} ± {num(r['kid'][1], '{:.2g}')}" if "kid" in r else None)
            for k, r in f["fid"].items() if isinstance(r, dict)]
    out += ["### Inception FID on real data and on the classroom checkpoints", ""]
    out += tags("gpu_h200_fid.json", f["env"]["opts"], dev) + [
        f"Against the CIFAR-10 test split ({dev}; KID as mean ± standard deviation over its subsets):", ""]
    out += cols(body, "compared=name", "images", "FID=fid:{:.2f}", "KID=kid", "FID of the first 2000=fid_first2000:{:.2f}")
    return out + ["", f"The Inception network's cost: {num(f['fid']['s_per_image'] * 1000, '{:.2f}')} ms per image ({dev}).", ""]


def predicted(ctx, name="gpu_preset_predicted_h200.json"):
    """The GPU presets' stage times predicted from measured rates (benchmarks/gpu.py --predict): a prediction, no run."""
    d = ctx.load(name)
    parts = ("data", "ddpm", "shortcut", "classifier", "shortft", "sampling", "inception")
    body = [[f"`{p}`", *(num(r[k], "{:.1f}") for k in parts), num(r["total_min"], "{:.1f}"), num(r["unet_gflop"], "{:.2f}"),
             num(r["speedup_vs_measured"], "{:.2f}"), r["ddpm_steps"]] for p, r in d.items()]
    return (["### Predicted: the GPU presets end to end on an NVIDIA H200 (torch 2.11), never run", ""] + tags(name)
            + ["Seconds per stage, predicted from the rates of the two H200 files above (benchmarks/gpu.py, "
               "`predict_pipeline`, says how); a prediction, not a measurement:", ""]
            + table(["preset", *(f"{k} s" for k in parts), "total min", "UNet GFLOP/image", "rate x measured UNet",
                     "DDPM steps"], body) + [""])


def pipeline(ctx, stem, title):
    name, metrics = f"{stem}.md", f"{stem}_shortft_metrics.json"
    txt = ctx.text(name)
    lines, minutes = txt.splitlines(), dict(re.findall(r"^\| (\w+) \| ([\d.]+) \|$", txt, re.M))
    done = dict(re.findall(r"^\[(\w+)\] done: (.*?)(?:; (?:checkpoint|metrics in) .*)?$", txt, re.M))
    wall = [ln for ln in lines if ln.startswith("rc=")]
    if not (lines[:1] and lines[0].startswith("# ") and minutes and done and wall):
        raise Bad(f"{ctx.path(name)}: not a pipeline timing ('# command' line, '[stage] done:' lines, rc= line, minutes)")
    cmd, _, note = lines[0][2:].partition(" (")
    out = [f"### {title}", ""] + tags(name, f"`{wall[0]}`" + (f"; ({note}" if note else ""), command=cmd)
    out += table(["stage", "minutes, wall", "the stage's last line"], [[s, minutes.get(s, "-"), t] for s, t in done.items()])
    b, a = (m := ctx.load(metrics))["before"], m["after"]
    fd_t = lambda r: (f"{num(r.get('fd_target'), '{:.2f}')}, {r.get('n_target')} samples "
                      f"(floor {num(r.get('fd_target_floor'), '{:.2f}')})")
    div = lambda r: " / ".join(num(r.get(k), "{:.2f}") for k in ("diversity", "diversity_matched", "diversity_target"))
    both = lambda k, f="{:.3f}": [num(b.get(k), f), num(a.get(k), f)]
    out += ["", f"Its ShortFT stage: reward `{m['reward']}`, {m['steps']} steps, median "
            f"{num(m['ms_per_step_median'], '{:.0f}')} ms/step, peak memory {num(m.get('peak_memory_mib'), '{:.0f}')} MiB on "
            f"{m['device']}, {b['n_samples']} evaluation samples.", ""] + tags(metrics, "its `shortft/metrics.json`", command=cmd)
    return out + table(["metric", "base", "after ShortFT"], [
        ["training reward"] + both("reward_mean"), ["held-out evaluator's target rate"] + both("evaluator_target_rate"),
        ["held-out evaluator's mean log p(target)"] + both("evaluator_mean_logp_target"),
        ["reward classifier's target rate"] + both("classifier_target_rate"),
        ["evaluator FD against all test images"] + both("fd", "{:.2f}"),
        ["class-matched FD (floor)"] + [f"{num(r['fd_matched'], '{:.2f}')} ({num(r['fd_matched_floor'], '{:.2f}')})"
                                        for r in (b, a)],
        ["FD of the samples judged the target, against real ones", fd_t(b), fd_t(a)],
        ["diversity: all / class-matched / within the target", div(b), div(a)],
        ["chain_gap"] + both("chain_gap", "{:.4f}")] + ([  # the judge (sftlib/judge.py), in files that have it
            ["the judge's target rate"] + both("judge_target_rate"), ["the judge's FD against all test images"]
            + both("judge_fd", "{:.2f}"), ["the judge's diversity"] + both("judge_diversity", "{:.2f}")]
        if "judge_fd" in a else [])) + [""]


def recipes(ctx):
    files, rows, flags = {}, {}, []
    for n in RECIPES:  # each file's variants, its flags checked while it is the file blamed
        files[n] = ctx.load(n)
        rows[n] = {v: r for v, r in files[n].items() if not v.startswith("_")}
        flags += [dict(r["flags"]) for r in rows[n].values()]
    common = {k: json.loads(max(sorted(set(v)), key=v.count)) for k in sorted(flags[0]) if all(k in f for f in flags)
              for v in [[json.dumps(f[k]) for f in flags]]}  # flags every variant sets, at their most used value
    show = lambda f: ", ".join(f"{k}={json.dumps(v) if v == '' else v}" for k, v in sorted(f.items())
                               if k not in common or v != common[k]) or "the common flags"
    out = ["## Appendix: the DDPM recipe ablation log", "",
           "Each variant trains the DDPM stage by `train_ddpm.py` for a wall-clock budget (or a fixed step count), is sampled "
           "(DDIM-50, fixed noise) and judged by the shipped held-out evaluator (its feature distance, not comparable to "
           "published FID) and, where given, by Inception FID/KID against the CIFAR-10 test split. The common flags, which "
           "every variant sets, at the value most of them use: " + ", ".join(f"`{k}={v}`" for k, v in common.items())
           + "; the recipe column gives each variant's other flags and its departures from these. Several trainings of one "
           "recipe are pooled into means with bootstrap intervals by `python benchmarks/bench_recipe.py --pool=A.json,B.json "
           "--baseline=old900`.", ""]
    for n, d in rows.items():
        ctx.last, fid = n, any("fid" in r for r in d.values())
        body = [[v, show(r["flags"]), r["params"], r["steps"], num(r["s_per_step"]), num(r["ddpm_wall_s"] / 60, "{:.1f}"),
                 f"{num(r['fd'], '{:.2f}')} ({num(r['fd_floor_same_n'], '{:.2f}')})", num(r["diversity"], "{:.2f}"),
                 num(r["class_entropy"], "{:.2f}"), num(r["sample_img_per_s"], "{:.1f}")]
                + ([f"{num(r['fid'], '{:.1f}')} ({r['fid_n']})", f"{num(r['kid'], '{:.3f}')} ± {num(r['kid_std'], '{:.3f}')}"]
                   if fid else []) for v, r in d.items()]
        out += [f"### `{n}`", ""] + tags(n, f"`{files[n]['_note']}`" if "_note" in files[n] else None) + table(
            ["variant", "recipe", "params", "steps", "s/step", "DDPM stage, wall min", "evaluator FD (floor)", "diversity",
             "class entropy", "DDIM-50 img/s"] + (["Inception FID (samples)", "KID ± std"] if fid else []), body) + [""]
    return out


def embedded(ctx, name, md, title):
    """A benchmark's own tables of results file `name` (its companion `md`, written by the same run from the same
    numbers), under the file's tags; their headings one level down."""
    d = ctx.load(name)
    body = ["#" + ln if ln.startswith("###") else ln for ln in ctx.text(md).splitlines()]
    return [f"### {title}", ""] + tags(name, d.get("opts") or d.get("args")) + body + [""]
