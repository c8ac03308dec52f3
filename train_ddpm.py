"""Stage `ddpm`: train the DDPM (Ho et al. 2020, Algorithm 1) on CIFAR-10, with EMA weights.

Writes <out_dir>/ddpm/ckpt.pt = {kind, model, ema, opt, step, config, rng, elapsed} (the resume
checkpoint), <out_dir>/ddpm/model.safetensors (the EMA weights with the config in the metadata, for
sharing), <out_dir>/ddpm/samples_{step}.png (first row: real images; then DDIM-50 samples of the EMA
model from fixed noise) and <out_dir>/ddpm/log.csv (step, loss, img/s).

    python train_ddpm.py --ddpm_steps=2000      # this stage alone (= python train_toy.py --stages=ddpm)
"""
import copy
import math
import os
import time

import torch

import ddpm
from sftlib.common import (adam, bf16_autocast, ema_update, export_safetensors, load_optimizer, memory_format, save_grid,
                           set_rng_state)
from sftlib.data import DeviceBatches, load_cifar10
from sftlib.metrics import ddim50
from sftlib.models import schedule_of
from sftlib.stage import Stage, budget_spent, budget_text, run_alone
from unet import build_unet


@torch.no_grad()  # sampling grids for a look: no gradients needed
def sample_grid(model, sched, x_T, real, path, batch, bf16=False):
    x0 = ddim50(model, sched, x_T, batch, bf16)  # (B, 3, 32, 32)
    save_grid(torch.cat([real, x0]), path)


def lr_at(cfg, step):
    """The learning rate of step `step` (0-based): linear warmup over ddpm_warmup steps (Ho et al. 2020
    use 5000 at full scale), then constant, or with ddpm_lr_schedule=cosine a half cosine from ddpm_lr
    down to 0 at ddpm_steps (Loshchilov & Hutter 2017; the last weights are the ones sampled)."""
    lr = cfg["ddpm_lr"] * min(1.0, (step + 1) / cfg["ddpm_warmup"])
    if cfg["ddpm_lr_schedule"] == "cosine" and step >= cfg["ddpm_warmup"]:
        done = (step - cfg["ddpm_warmup"]) / max(1, cfg["ddpm_steps"] - cfg["ddpm_warmup"])  # in [0, 1)
        lr = cfg["ddpm_lr"] * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return lr


def train(cfg, device):
    stage = Stage(cfg, "ddpm", kind="ddpm", steps="ddpm_steps", columns=("loss",))
    export = os.path.join(stage.out, "model.safetensors")  # written last: the stage is complete once it exists
    ckpt = stage.resume_or_skip(complete=lambda c: budget_spent(c["step"], c.get("elapsed", 0.0), cfg["ddpm_steps"],
                                                                cfg["ddpm_seconds"]) and os.path.isfile(export),
                                export=export)
    if stage.skipped:
        return stage.ckpt_path
    steps, seconds = cfg["ddpm_steps"], cfg["ddpm_seconds"]  # on --resume, cfg is now the checkpoint's config
    model = build_unet(cfg).to(device, memory_format=memory_format(cfg, device))
    opt = adam(model.parameters(), cfg["ddpm_lr"])
    step, elapsed = 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        load_optimizer(opt, ckpt["opt"])  # this device's implementation and memory layout
        step, elapsed = ckpt["step"], ckpt["elapsed"]
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if ckpt is not None:
        ema.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"])
    sched = schedule_of(cfg, device)

    x, y = load_cifar10(cfg["data_root"], "train", cfg["n_train"], os.path.join(cfg["out_dir"], "cache"))
    data = DeviceBatches(x, y, device)
    print(f"[ddpm] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(data)} training images, {budget_text(steps, seconds)} of batch {cfg['ddpm_batch']} on {device}")
    # fixed noise and reals for the sample grids, from their own generator so resume sees the same
    g = torch.Generator().manual_seed(1234)
    x_T = torch.randn(cfg["grid_ddpm"], 3, 32, 32, generator=g).to(device)  # (grid_ddpm, 3, 32, 32)
    real = (x[torch.randperm(len(x), generator=g)[:8]].float() / 127.5 - 1).to(device)  # (8, 3, 32, 32)

    net = torch.compile(model) if cfg["compile"] and device.type == "cuda" else model
    autocast = bf16_autocast(cfg, device)
    model.train()
    stage.start(step, total=steps if seconds <= 0 else None)
    while not budget_spent(step, elapsed, steps, seconds):
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        x0, _ = data.sample(cfg["ddpm_batch"])  # (B, 3, 32, 32) in [-1, 1]
        with autocast:
            loss = ddpm.eps_loss(net, sched, x0, cfg["ddpm_min_snr"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["ddpm_grad_clip"])
        opt.step()
        step += 1
        # EMA with warmup: early on the average forgets fast, later it keeps ddpm_ema
        ema_update(ema, model, min(cfg["ddpm_ema"], (1 + step) / (10 + step)))
        if stage.due(step, cfg["log_every"]) and device.type == "cuda":
            torch.cuda.synchronize()  # the clock below counts the GPU's work, not only its queueing
        elapsed += time.time() - t0
        last = budget_spent(step, elapsed, steps, seconds)
        stage.tick(step, cfg["ddpm_batch"], "ddpm_lr", cfg["log_every"], last, loss=loss)  # loss: read once per row
        if stage.due(step, cfg["sample_every"], last):
            sample_grid(ema, sched, x_T, real, os.path.join(stage.out, f"samples_{step}.png"), cfg["sample_batch"],
                        cfg["bf16"])
        if stage.due(step, cfg["ddpm_ckpt_every"], last):
            stage.save(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                       elapsed=elapsed)
    stage.close()
    export_safetensors(ema.state_dict(), cfg, export, kind="ddpm")
    print(f"[ddpm] done: {step} steps in {elapsed / 60:.1f} min of training; checkpoint {stage.ckpt_path}")
    return stage.ckpt_path


if __name__ == "__main__":
    run_alone(train, __doc__)
