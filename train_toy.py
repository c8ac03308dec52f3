"""The entry point: the whole toy pipeline on CIFAR-10, and sampling from saved checkpoints.

    python train_toy.py                      # run every stage (skips stages whose checkpoint is complete)
    python train_toy.py --ddpm_steps=2000    # any key of config.DEFAULTS, as --key=value
    python train_toy.py sample --ckpt=out/ddpm/ckpt.pt --n=64 --sampler=ddim --steps=50 --out=s.npz

Stages, in order (each writes under <out_dir>/<stage>/):
    ddpm   train the base DDPM (train_ddpm.py; maths in ddpm.py, network in unet.py)
"""
import os
import sys
import time

import numpy as np
import torch

import config
from common import UserError, pick_device, save_grid, seed_all, to_uint8


def run_pipeline(args):
    cfg = config.resolve(args, torch.cuda.is_available())
    device = pick_device(cfg["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~free speed on Ampere and later
        torch.backends.cudnn.allow_tf32 = True
    seed_all(cfg["seed"])
    print("config:", " ".join(f"{k}={v}" for k, v in cfg.items()))
    if cfg["preset"] == "cpu":
        print("[train_toy] CPU preset: a small UNet and short stages, about 10 minutes per stage on 2 cores. "
              "For the real run use a GPU (--preset=gpu); override any key with --key=value.")
    import train_ddpm

    minutes = {}
    t0 = time.time()
    train_ddpm.train(dict(cfg), device)
    minutes["ddpm"] = (time.time() - t0) / 60
    print("\nstage   minutes")
    for stage, m in minutes.items():
        print(f"{stage:7s} {m:7.1f}")


def run_sample(args):
    """Sample N images from a checkpoint and write them as uint8 (N, 32, 32, 3) under 'images' in a
    .npz, plus a PNG grid of the first 64 next to it."""
    opts = dict(config.SAMPLE_DEFAULTS)
    opts.update(config.parse_overrides(args, config.SAMPLE_DEFAULTS))
    if opts["n"] < 1:
        raise UserError(f"--n must be at least 1, got {opts['n']}")
    if opts["sampler"] not in ("ddpm", "ddim"):
        raise UserError(f"--sampler must be ddpm or ddim, got {opts['sampler']!r}")
    if not opts["out"].endswith(".npz"):
        raise UserError(f"--out must name a .npz file, got {opts['out']!r}")
    device = pick_device(opts["device"])
    import ddpm
    from train_ddpm import load_ddpm

    model, sched, _ = load_ddpm(opts["ckpt"], device)
    if opts["sampler"] == "ddim" and not 1 <= opts["steps"] <= sched.T:
        raise UserError(f"--steps must be in [1, {sched.T}], got {opts['steps']}")
    seed_all(opts["seed"])
    images = []
    with torch.no_grad():  # sampling only: no graph to keep
        for i in range(0, opts["n"], opts["batch_size"]):
            x_T = torch.randn(min(opts["batch_size"], opts["n"] - i), 3, 32, 32, device=device)
            if opts["sampler"] == "ddpm":
                x0 = ddpm.ddpm_sample(model, sched, x_T)
            else:
                x0 = ddpm.ddim_sample(model, sched, x_T, ddpm.ddim_timesteps(sched.T, opts["steps"]), opts["eta"])
            images.append(x0)
            print(f"[sample] {min(i + opts['batch_size'], opts['n'])}/{opts['n']}")
    x0 = torch.cat(images)  # (N, 3, 32, 32)
    os.makedirs(os.path.dirname(opts["out"]) or ".", exist_ok=True)
    tmp = opts["out"][:-4] + ".tmp.npz"
    np.savez(tmp, images=to_uint8(x0))
    os.replace(tmp, opts["out"])
    save_grid(x0[:64], opts["out"][:-4] + ".png")
    print(f"[sample] wrote {opts['out']} ({len(x0)} images) and {opts['out'][:-4]}.png")


COMMANDS = {"train": run_pipeline, "sample": run_sample}


def main(argv):
    cmd, args = ("train", argv) if not argv or argv[0].startswith("--") else (argv[0], argv[1:])
    if cmd not in COMMANDS:
        raise UserError(f"unknown command {cmd!r}: use one of {', '.join(COMMANDS)} (or none, to train)")
    COMMANDS[cmd](args)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; rerun with --resume to continue", file=sys.stderr)
        sys.exit(130)
