"""Benchmark of the DDPM foundation: training throughput and peak memory of the UNets, and the
wall time of the DDPM stage.

    python benchmarks/bench_ddpm.py                      # both UNets on the current device (cuda -> mps -> cpu)
    python benchmarks/bench_ddpm.py --iters=20 --device=cuda
    python benchmarks/bench_ddpm.py --run_stage=true     # also time `train_toy.py --stages=ddpm` from scratch (CPU preset)

Each UNet is measured in a fresh child process, so the peak memory it reports is its own:
CUDA: torch.cuda.max_memory_allocated; CPU: the child's peak resident set size (ru_maxrss).
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python benchmarks/<name>.py` from anywhere: the project's modules live at ROOT

import ddpm
from sftlib import config
from sftlib.common import UserError, load_checkpoint, pick_device, run_main
from unet import build_unet

DEFAULTS = dict(device="auto", iters=5, run_stage=False, out_dir="out", data_root="../shared/data/cifar10",
                child="")
MODELS = {"tiny (cpu preset)": {}, "default (gpu preset)": config.PRESETS["gpu"]}


def measure(name, device, iters):
    """Train steps/s and sampling img/s of one UNet; runs inside the child process."""
    cfg = dict(config.DEFAULTS, **MODELS[name])
    big_on_cpu = device.type != "cuda" and cfg["ch"] > 64
    B = 8 if big_on_cpu else cfg["ddpm_batch"]  # the 35.7M UNet is a GPU model: small batch elsewhere
    model = build_unet(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sched = ddpm.Schedule(device=device)
    x0 = torch.rand(B, 3, 32, 32, device=device) * 2 - 1

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(iters + 1):  # the first step is warm-up (allocations, cuDNN autotuning)
        if i == 1:
            sync()
            t0 = time.time()
        loss = ddpm.eps_loss(model, sched, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    train_ips = B * iters / (time.time() - t0)
    with torch.no_grad():  # sampling throughput: forward passes only
        t_vec = torch.full((B,), 500, device=device)
        model(x0, t_vec)
        sync()
        t0 = time.time()
        for _ in range(iters):
            model(x0, t_vec)
        sync()
        fwd_ips = B * iters / (time.time() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    return dict(model=name, params_M=round(sum(p.numel() for p in model.parameters()) / 1e6, 2), batch=B,
                train_img_s=round(train_ips, 1), forward_img_s=round(fwd_ips, 1), peak_MiB=round(peak),
                device=str(device))


def main(argv):
    opts = dict(DEFAULTS, **config.parse_overrides(argv, DEFAULTS))
    if opts["iters"] < 1:  # 0 iterations would time nothing: a table of inf and NaN
        raise UserError(f"--iters must be at least 1, got {opts['iters']}")
    device = pick_device(opts["device"])
    if opts["child"]:
        print(json.dumps(measure(opts["child"], device, opts["iters"])))
        return
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else
                                 f" ({torch.get_num_threads()} threads)"))
    print(f"{'model':22s} {'params':>8s} {'batch':>6s} {'train img/s':>12s} {'fwd img/s':>10s} {'peak MiB':>9s}")
    for name in MODELS:
        p = subprocess.run([sys.executable, __file__, f"--child={name}", f"--device={device.type}",
                            f"--iters={opts['iters']}"], capture_output=True, text=True)
        if p.returncode != 0:
            raise UserError(f"benchmark of {name} failed: {p.stderr.strip().splitlines()[-1]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{name:22s} {r['params_M']:7.2f}M {r['batch']:6d} {r['train_img_s']:12.1f} "
              f"{r['forward_img_s']:10.1f} {r['peak_MiB']:9d}")
    ckpt = os.path.join(opts["out_dir"], "ddpm", "ckpt.pt")
    if os.path.isfile(ckpt):
        c = load_checkpoint(ckpt, "ddpm", keys=("step", "elapsed", "config"))
        print(f"{ckpt}: {c['step']} steps, {c['elapsed'] / 60:.1f} min of training steps "
              f"(preset {c['config']['preset']}, recorded by the run)")
    if opts["run_stage"]:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.time()
            subprocess.run([sys.executable, "train_toy.py", "--stages=ddpm", "--preset=cpu", f"--out_dir={out}",
                            f"--data_root={opts['data_root']}", f"--device={device.type}"], check=True,
                           cwd=ROOT, stdout=subprocess.DEVNULL)
            print(f"CPU-preset DDPM stage, from scratch: {(time.time() - t0) / 60:.1f} min wall on {device}")


if __name__ == "__main__":
    run_main(main)
