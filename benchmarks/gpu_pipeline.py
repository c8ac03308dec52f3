"""benchmarks/gpu.py's pipeline section and its prediction: `python train_toy.py --preset=gpu` end to end, stage by
stage (section_pipeline), and each GPU preset's stage times predicted from measured rates (predict_pipeline, with the
UNet's FLOPs counted by gflop). The command line, the other sections and results.json are gpu.py's."""
import functools
import json
import math
import os
import shutil
import time

import torch

from gpu_jobs import log, peak_mib, reset_peak
from sftlib import config
from sftlib.common import UserError
from sftlib.readers import NUMBER, read_csv, read_json

# the classroom base: small enough for a laptop CPU to fine-tune in minutes and to ship (< 30 MB)
CLASSROOM = dict(ch=48, ch_mult="1,2,2", num_res_blocks=2, attn_res="8", dropout=0.0, ddpm_batch=256, ddpm_lr=8e-4,
                 ddpm_warmup=200, ddpm_ema=0.999, shortcut_batch=256, shortcut_lr=2e-4, shortcut_ema=0.995,
                 eps_skip=False, cd_target_ema=0.0,  # as the shipped ones were trained (before these defaults)
                 classifier_width=32, evaluator_width=32, cls_batch=512, cls_lr=0.4,
                 classifier_steps=2500, evaluator_steps=2500)
DRY = dict(ch=8, ch_mult="1,2", num_res_blocks=1, attn_res="16", ddpm_batch=4, shortcut_batch=4, ft_batch=2,
           classifier_width=4, evaluator_width=4, cls_batch=8, lora_rank=2, lora_alpha=2.0)
# the pipeline section's --dry: the preset's every code path with a tiny UNet, short budgets and small evaluations
PIPELINE_DRY = dict(DRY, judge_width=4, n_train=200, n_test=100, ddpm_seconds=3.0, shortcut_seconds=3.0,
                    classifier_steps=2, evaluator_steps=2, judge_steps=2, ft_steps=2, n_eval=4, fid_n=0, grid_ddpm=2,
                    grid_shortcut=2, grid_ft=2, sample_batch=4, log_every=2)


def read_results(paths, root=""):
    """The results.json files of this script in the comma list `paths` (relative ones under `root`), merged: the
    first file that has a key gives it. Or one line saying what is wrong with a file."""
    merged = {}
    for path in paths.split(","):
        path = os.path.join(root, path)
        results = read_json(path, {}, "results.json of benchmarks/gpu.py")  # a JSON object, or one line
        for k, v in results.items():
            merged.setdefault(k, v)
    return merged


def gflop(cfg):
    """Forward GFLOP per 32x32 image of the UNet that cfg describes (torch's FlopCounterMode, on the CPU, with
    attention written out as matrix products: the CPU's fused attention kernel is not counted)."""
    return _gflop(tuple((k, cfg[k]) for k in ("ch", "ch_mult", "num_res_blocks", "attn_res", "eps_skip", "T")))


@functools.lru_cache(maxsize=None)
def _gflop(arch):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from unet import build_unet

    net = build_unet(dict(config.DEFAULTS, **dict(arch)))
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        net(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    return fc.get_total_flops() / 1e9


def unet_speedup(cfg, measured, small=None):
    """How many times more images per second the UNet of cfg runs than the `measured` one, predicted: the ratio
    of their forward FLOPs, discounted by the efficiency a smaller UNet loses on the same card. small =
    (classroom GFLOP, its efficiency: measured img/s over the FLOP-scaled rate of the measured UNet), the
    discount interpolated in log FLOPs between the two measured sizes (1 at `measured`, eff at the classroom's)."""
    g_new, g_ref = gflop(cfg), gflop(measured)
    if small is None or abs(g_new - g_ref) < 1e-6:
        return g_ref / g_new
    g_small, eff = small
    frac = min(1.0, max(0.0, math.log(g_ref / g_new) / math.log(g_ref / g_small)))
    return g_ref / g_new * eff ** frac


def predict_pipeline(cfg, results, mode="bf16"):
    """Predicted wall time (s per stage, total in minutes) of `python train_toy.py` with config cfg on the card of
    `results` (a benchmarks/gpu.py results.json: its "stages" rows measured the UNet of results["stages_preset"],
    gpu_long's 35.7M in files that do not say; its
    "classroom_rates" the classroom UNet). UNet stages (ddpm, shortcut, sampling) run at the measured rate times
    unet_speedup; a stage budgeted in seconds takes min(its seconds, steps / rate). ShortFT keeps the measured
    step rate of the 35.7M UNet unscaled (its step was launch-bound, 2 % of the card's peak: the same layout
    launches the same kernels). The classifiers keep their measured rates (a conservative bound for narrower
    nets). The FID's Inception time is the measured s/image of results["fid"] (when present). Data decoding is
    results["data_s"]; process start and checkpoint writes are left out (seconds)."""
    rows = results["stages"]

    def rate(stage):
        for m in (mode, "bf16", "fp32"):
            r = [x for x in rows if x.get("stage") == stage and x.get("mode") == m and "steps_per_s" in x]
            if r:
                return r[0]
        raise UserError(f"--predict: the results file has no measured rate of the {stage} stage")

    measured = dict(config.DEFAULTS, **config.PRESETS[results.get("stages_preset", "gpu_long")])  # older files: gpu_long
    small = None
    cr = [r for r in results.get("classroom_rates", []) if r.get("stage") == "ddpm" and r.get("mode") == "fp32"]
    big = [r for r in rows if r.get("stage") == "ddpm" and r.get("mode") == "fp32"]
    if cr and big:  # the classroom UNet's measured efficiency relative to the 35.7M's, on the same card
        ccfg = dict(config.DEFAULTS, **CLASSROOM)
        scaled = big[0]["img_per_s"] * gflop(measured) / gflop(ccfg)
        small = (gflop(ccfg), cr[0]["steps_per_s"] * cr[0]["batch"] / scaled)
    x = unet_speedup(cfg, measured, small)

    def unet_stage(stage, steps, seconds, batch):
        img_s = rate(stage)["img_per_s"] * x
        t = steps * batch / img_s
        return min(t, seconds) if seconds > 0 else t, img_s

    ddpm_s, ddpm_img = unet_stage("ddpm", cfg["ddpm_steps"], cfg["ddpm_seconds"], cfg["ddpm_batch"])
    sc_s, _ = unet_stage("shortcut", cfg["shortcut_steps"], cfg["shortcut_seconds"], cfg["shortcut_batch"])
    samp_img_s = rate("ddim50_sampling")["img_per_s"] * x
    n_grids = lambda steps, every: steps // every + (steps % every > 0)  # noqa: E731
    ddpm_steps = ddpm_s * ddpm_img / cfg["ddpm_batch"]
    sc_steps = sc_s * rate("shortcut")["img_per_s"] * x / cfg["shortcut_batch"]
    grids = (n_grids(int(ddpm_steps), cfg["sample_every"]) * cfg["grid_ddpm"]
             + (n_grids(int(sc_steps), cfg["sample_every"]) + 1) * 2 * cfg["grid_shortcut"])  # teacher + shortcut rows
    evals = 2 * max(cfg["n_eval"], cfg["fid_n"]) + cfg["grid_ft"]  # before + after (FID samples) + before_after.png
    fid_s = results.get("fid", {}).get("s_per_image", 0.0) * 2 * cfg["fid_n"]
    s = dict(data=results.get("data_s", 0.0), ddpm=ddpm_s, shortcut=sc_s,
             classifier=(cfg["classifier_steps"] / rate("classifier")["steps_per_s"]
                         + (cfg["evaluator_steps"] + cfg["judge_steps"]) / rate("evaluator")["steps_per_s"]),
             shortft=cfg["ft_steps"] / rate("shortft")["steps_per_s"], sampling=(grids + evals) / samp_img_s,
             inception=fid_s)
    s["total_min"] = sum(s.values()) / 60
    out = {k: round(v, 1) for k, v in s.items()}
    out.update(unet_gflop=round(gflop(cfg), 2), speedup_vs_measured=round(x, 2), ddpm_steps=int(ddpm_steps),
               ddpm_img_per_s=round(ddpm_img), sampling_img_per_s=round(samp_img_s))
    return out


# --- the pipeline section: `python train_toy.py --preset=gpu`, stage by stage ------------------------------

def section_pipeline(opts, device, RESULTS, save_results):
    """The GPU preset end to end in this process, one stage after the other into --work (default <out>/pipeline):
    per stage its wall time, peak memory and measured rate; then the FID/KID and held-out scores of
    shortft/metrics.json, the grids copied to <out>, and the prediction of each stage from --predict_from beside
    the measurement."""
    import train_toy
    from sftlib import fid

    d = opts.get("work") or os.path.join(opts["out"], "pipeline")  # the run's folder; only the results go to --out
    over = dict(preset="gpu", out_dir=d, data_root=opts["data_root"], device=device.type)
    if opts["dry"]:
        over.update(PIPELINE_DRY)
    try:
        fid.weights_path()
    except fid.FIDError as e:
        over["fid_n"] = 0
        RESULTS["pipeline_fid"] = f"not measured: {e}"
        log(RESULTS["pipeline_fid"])
    args = [f"--{k}={v}" for k, v in over.items()]
    rows, t_all = [], time.time()
    for stage in ("ddpm", "shortcut", "classifier", "shortft"):
        reset_peak(device)
        t0 = time.time()
        train_toy.run_pipeline(args + [f"--stages={stage}"])
        row = dict(stage=stage, wall_s=round(time.time() - t0, 1), peak_mib=peak_mib(device), **stage_rate(d, stage))
        rows.append(row)
        log(json.dumps(row))
        RESULTS["pipeline"] = dict(command="python train_toy.py " + " ".join(args), stages=rows)
        save_results(opts)
    m = read_json(os.path.join(d, "shortft", "metrics.json"), {"before": dict, "after": dict, "ms_per_step_median": NUMBER},
                  "ShortFT metrics")
    keys = ("fid", "kid", "evaluator_target_rate", "judge_target_rate", "diversity", "reward_mean")
    RESULTS["pipeline"].update(total_s=round(time.time() - t_all, 1), before={k: m["before"].get(k) for k in keys},
                               after={k: m["after"].get(k) for k in keys}, ft_ms_per_step=m["ms_per_step_median"])
    for src, name in ((last_grid(d, "ddpm"), "ddpm_samples.png"), (last_grid(d, "shortcut"), "shortcut_samples.png"),
                      (os.path.join(d, "shortft", "before_after.png"), "before_after.png")):
        if src and os.path.isfile(src):
            shutil.copy(src, os.path.join(opts["out"], name))
    if opts["predict_from"] and not opts["dry"]:  # the prediction of this very run (its fid_n: 0 without weights)
        results = read_results(opts["predict_from"], os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        RESULTS["pipeline"]["predicted"] = predict_pipeline(
            dict(config.DEFAULTS, **config.PRESETS["gpu"], fid_n=over.get("fid_n", config.PRESETS["gpu"]["fid_n"])),
            results)
    save_results(opts)
    log(f"pipeline: {RESULTS['pipeline']['total_s']:.0f} s; base {RESULTS['pipeline']['before']}, "
        f"fine-tuned {RESULTS['pipeline']['after']}")


def stage_rate(d, stage):
    """The measured rate of a finished stage: the mean img/s of its log.csv rows after the first (whose window
    holds the warm-up: cuDNN's autotuning, allocations), its step count; ShortFT's median ms/step."""
    if stage == "shortft":
        m = read_json(os.path.join(d, "shortft", "metrics.json"), {"ms_per_step_median": NUMBER, "steps": int},
                      "ShortFT metrics")
        return dict(ms_per_step=m["ms_per_step_median"], steps=m["steps"])
    if stage == "classifier":
        return {}
    _, log_csv = read_csv(os.path.join(d, stage, "log.csv"), what=f"{stage} log")  # step first, img/s last
    if not log_csv:
        raise UserError(f"{os.path.join(d, stage, 'log.csv')} has no rows: the stage logged no step")
    rows = log_csv[1:] if len(log_csv) > 1 else log_csv
    return dict(img_per_s=round(sum(r[-1] for r in rows) / len(rows), 1), steps=int(log_csv[-1][0]))


def last_grid(d, stage):
    """The sample grid of the stage's last step (samples_<step>.png with the largest step)."""
    import glob

    grids = glob.glob(os.path.join(d, stage, "samples_*.png"))
    return max(grids, key=lambda g: int(os.path.basename(g)[8:-4])) if grids else None
