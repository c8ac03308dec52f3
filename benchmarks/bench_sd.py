"""Benchmark: one ShortFT step vs one full-chain backprop step on Stable Diffusion, random weights.

    python benchmarks/bench_sd.py                          # tiny random SD components, 32x32 images (CPU-friendly)
    python benchmarks/bench_sd.py --size=sd15 --resolution=512 --device=cuda   # SD 1.5's shapes, random weights

Prints ms/step and peak memory per method, then one line of JSON. Each method runs in its own process,
so peak memory is its own: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on CPU
(reported with the RSS after setup, whose difference is what the step itself costs). Random weights
time the same computation as real ones; no download is needed (tests/sd_fixtures.py builds them).

Methods (all: CFG on the base calls, VAE decode in the graph, brightness reward, Adam step on LoRA):
    shortft        shortft.shortft_chain, phase 0: 12 no-grad steps, then 7 UNet calls with a graph
    full           baselines.full_chain over DDIM-50: all 50 UNet calls keep their graph
    full_ckpt      the same with every UNet call (and the decode) checkpointed
    shortft_nockpt ShortFT without checkpointing
"""
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python benchmarks/<name>.py` from anywhere: the project's modules live at ROOT

import ddpm
from consistency import segment_edges
from rewards import brightness
from sftlib import config, sd
from sftlib.common import UserError, pick_device, run_main
from baselines import full_chain
from shortft import segment_groups, shortft_chain
from tests.sd_fixtures import random_lora, random_pipeline

DEFAULTS = dict(size="tiny", resolution=32, batch=1, iters=3, methods="shortft,full,full_ckpt,shortft_nockpt",
                device="cpu", bf16=True, lora_rank=4, one="", seed=0)


def run_one(opts):
    """Build everything, run `iters` timed steps of one method after a warm-up; returns a dict."""

    device = pick_device(opts["device"])
    bf16 = opts["bf16"] and device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    pipe = random_pipeline(opts["size"]).to(device, dtype)
    pipe.load_lora_weights(random_lora(pipe.unet, 4, seed=1), adapter_name="shortcut")
    method = opts["method"]
    shortft = method.startswith("shortft")
    names = sd.add_tlora(pipe.unet, 4 if shortft else 1, opts["lora_rank"], float(opts["lora_rank"]))
    params = [p for n in names for p in sd.adapter_params(pipe.unet, n)]
    for p in params:
        p.data = p.data.float()  # trainable LoRA in fp32, the frozen weights in bf16 on GPU
    timesteps = ddpm.ddim_timesteps(1000, 50)
    groups = segment_groups(timesteps, segment_edges(1000, 50, 4))
    ckpt = method in ("shortft", "full_ckpt")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else None
    ft = sd.SDFineTuned(pipe.unet, groups, names, tlora=shortft, grad_checkpoint=ckpt, autocast=autocast)
    sd.set_phase(ft, 0)
    sched = sd.SDSchedule(pipe.scheduler.alphas_cumprod, device)
    ft.set_prompts(*sd.encode(pipe, ["a photo of a cat"] * opts["batch"]))
    opt = torch.optim.Adam(params, lr=1e-4)
    h = opts["resolution"] // pipe.vae_scale_factor
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(opts["iters"] + 1):  # the first step is a warm-up
        t0 = time.time()
        x_T = torch.randn(opts["batch"], 4, h, h, device=device)  # (B, 4, H/8, W/8)
        if shortft:
            z0 = shortft_chain(ft, ft.shortcut, sched, x_T, groups, phase=0)
        else:
            z0 = full_chain(ft, sched, x_T, timesteps)  # ft checkpoints its own calls when ckpt
        loss = -brightness(sd.decode(pipe.vae, z0, ckpt)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append((time.time() - t0) * 1000)
    out = dict(method=method, size=opts["size"], resolution=opts["resolution"], batch=opts["batch"],
               device=str(device), bf16=bf16, ms_per_step=sorted(times)[len(times) // 2])
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        out["rss_after_setup_mib"] = rss_setup
    return out


def main(argv):
    opts = dict(DEFAULTS)
    opts.update(config.parse_overrides(argv, DEFAULTS))
    if opts["one"]:  # a child process: one method, one JSON line
        print(json.dumps(run_one({**opts, "method": opts["one"]})))
        return
    print("config:", " ".join(f"{k}={v}" for k, v in opts.items()))
    rows = []
    for method in opts["methods"].split(","):
        args = [sys.executable, os.path.abspath(__file__), f"--one={method}"] + [a for a in argv if not a.startswith("--one")]
        p = subprocess.run(args, capture_output=True, text=True)
        if p.returncode != 0:
            raise UserError(f"{method} failed:\n{p.stderr[-2000:]}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    mem = "peak_mib" if "peak_mib" in rows[0] else "peak_rss_mib"
    print(f"\n| method | ms/step | {mem} |" + (" RSS after setup (MiB) |" if mem == "peak_rss_mib" else "")
          + "\n|---|---|---|" + ("---|" if mem == "peak_rss_mib" else ""))
    for r in rows:
        extra = f" {r['rss_after_setup_mib']:.0f} |" if mem == "peak_rss_mib" else ""
        print(f"| {r['method']} | {r['ms_per_step']:.0f} | {r[mem]:.0f} |{extra}")
    print(json.dumps(rows))


if __name__ == "__main__":
    run_main(main)
