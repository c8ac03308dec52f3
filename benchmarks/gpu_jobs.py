"""The workloads benchmarks/gpu.py times, and how it times them: each toy stage's training step with the
GPU preset (section `stages`), ShortFT vs its baselines on the 35.7M UNet (`methods`), Stable Diffusion
scale through benchmarks/bench_sd.py (`sd`) and FID / KID of the sampled models (`fid`). The command
line, the order of the sections, the training runs and results.json are gpu.py's; run that, not this.
"""
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules live at ROOT

from sftlib.common import bf16_autocast  # noqa: E402
from sftlib.readers import read_npz  # noqa: E402

T_START = time.time()  # the benchmark's clock: every log line and gpu.py's budget count from here


def log(msg):
    print(f"[gpu {time.time() - T_START:6.1f}s] {msg}", flush=True)


# --- timing: CUDA synchronised, peak memory from torch.cuda ------------------------------------------

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
    from tlora import add_lora
    from rewards import ClassifierReward
    from shortft import FineTuned, segment_groups, set_phase, shortft_chain
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
        set_phase(ft, 0)
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


# --- section 2: ShortFT vs the baselines on the 35.7M UNet -----------------------------------------

def section_methods(opts, cfg, device):
    import copy

    import ddpm
    from sftlib.nets import build_net
    from consistency import segment_edges
    from tlora import add_lora
    from rewards import ClassifierReward
    from baselines import draft_chain, full_chain
    from shortft import FineTuned, segment_groups, set_phase, shortft_chain
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
                        set_phase(ft, 0)
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
            unet = ft = opt = params = None  # free them before the next method
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


# --- section fid: FID / KID of the sampled models on the GPU -------------------------------------------

def section_fid(opts, device):
    """FID / KID on the GPU (sftlib/fid.py): 10k train vs the 10k test images (the validation figure),
    then every samples_*.npz in <out> vs the test images. Returns them (results.json's "fid") and writes the
    test split's statistics <out>/fid_test_stats.npz (mu, the upper triangle of sigma, 1000 features for KID)."""
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
            imgs = read_npz(os.path.join(opts["out"], f), {"images": ("u", (None, 32, 32, 3))}, "samples file")["images"]
            fs = feats(imgs)
            res[f[8:-4]] = dict(n=len(imgs), fid=fid.fid_from_features(fs, f_test), kid=kid(fs, f_test))
            if len(imgs) > 2000:
                res[f[8:-4]]["fid_first2000"] = fid.fid_from_features(fs[:2000], f_test)
            log(f"FID {f}: " + json.dumps(res[f[8:-4]]))
    return res
