"""Stage 1: train the DDPM (Ho et al. 2020, Algorithm 1) on CIFAR-10, with EMA weights.

Writes <out_dir>/ddpm/ckpt.pt = {kind, model, ema, opt, step, config, rng, elapsed},
<out_dir>/ddpm/samples_{step}.png (first row: real images; then DDIM-50 samples of the EMA model
from fixed noise) and <out_dir>/ddpm/log.csv (step, loss, img/s).
"""
import copy
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import ddpm
from common import (UserError, bf16_autocast, ema_update, load_checkpoint, open_log, rng_state, save_atomic,
                     save_grid, set_rng_state)
from data import DeviceBatches, load_cifar10
from unet import build_unet

# the config keys that decide the shape of the model: a resumed run must not change them
MODEL_KEYS = ("T", "beta_1", "beta_T", "ch", "ch_mult", "num_res_blocks", "attn_res", "dropout")


def load_ddpm(path, device, use_ema=True):
    """(model, schedule, config) from a DDPM checkpoint; the EMA weights unless use_ema=False."""
    ckpt = load_checkpoint(path, "ddpm")
    cfg = ckpt["config"]
    model = build_unet(cfg)
    try:
        model.load_state_dict(ckpt["ema" if use_ema else "model"])
    except RuntimeError:
        raise UserError(f"{path}: weights do not match the UNet its config describes") from None
    sched = ddpm.Schedule(cfg["T"], cfg["beta_1"], cfg["beta_T"], device, cfg.get("clip_x0", True))
    return model.to(device).eval(), sched, cfg


@torch.no_grad()  # sampling grids for a look: no gradients needed
def sample_grid(model, sched, x_T, real, path):
    x0 = ddpm.ddim_sample(model, sched, x_T, ddpm.ddim_timesteps(sched.T, 50))  # (B, 3, 32, 32)
    save_grid(torch.cat([real, x0]), path)


def train(cfg, device):
    out = os.path.join(cfg["out_dir"], "ddpm")
    ckpt_path = os.path.join(out, "ckpt.pt")
    model = build_unet(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    step, elapsed = 0, 0.0
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, "ddpm")
        if ckpt["step"] >= ckpt["config"]["ddpm_steps"] and ckpt["step"] >= cfg["ddpm_steps"]:
            print(f"[ddpm] {ckpt_path} is complete ({ckpt['step']} steps): skipping the stage")
            return ckpt_path
        if not cfg["resume"]:
            raise UserError(f"{ckpt_path} holds an unfinished run (step {ckpt['step']}): "
                            f"pass --resume to continue it, or choose another --out_dir")
        changed = [k for k in MODEL_KEYS if ckpt["config"][k] != cfg[k]]
        if changed:
            raise UserError(f"cannot resume {ckpt_path}: it was trained with other {', '.join(changed)}")
        cfg.update({k: v for k, v in ckpt["config"].items() if k not in ("ddpm_steps", "resume", "device")})
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        print(f"[ddpm] resuming {ckpt_path} from step {step}")
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if step > 0:
        ema.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"])
    sched = ddpm.Schedule(cfg["T"], cfg["beta_1"], cfg["beta_T"], device, cfg.get("clip_x0", True))

    x, y = load_cifar10(cfg["data_root"], "train", cfg["n_train"], os.path.join(cfg["out_dir"], "cache"))
    data = DeviceBatches(x, y, device)
    print(f"[ddpm] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(data)} training images, {cfg['ddpm_steps']} steps of batch {cfg['batch_size']} on {device}")
    # fixed noise and reals for the sample grids, from their own generator so resume sees the same
    g = torch.Generator().manual_seed(1234)
    x_T = torch.randn(56, 3, 32, 32, generator=g).to(device)  # (56, 3, 32, 32)
    real = (x[torch.randperm(len(x), generator=g)[:8]].float() / 127.5 - 1).to(device)  # (8, 3, 32, 32)

    net = torch.compile(model) if cfg["compile"] and device.type == "cuda" else model
    autocast = bf16_autocast(cfg, device)
    log, _ = open_log(out, "step,loss,img_per_s", fresh=step == 0)

    def save():
        save_atomic(dict(kind="ddpm", model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                         step=step, config=dict(cfg), rng=rng_state(), elapsed=elapsed), ckpt_path)

    model.train()
    bar = tqdm(file=sys.stdout, total=cfg["ddpm_steps"], initial=step, desc="ddpm", dynamic_ncols=True, mininterval=1.0)
    t_last, loss_sum, n_sum = time.time(), 0.0, 0
    while step < cfg["ddpm_steps"]:
        t0 = time.time()
        for group in opt.param_groups:  # linear warmup (Ho et al. 2020 use 5000 steps at full scale)
            group["lr"] = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup"])
        x0, _ = data.sample(cfg["batch_size"])  # (B, 3, 32, 32) in [-1, 1]
        with autocast:
            loss = ddpm.eps_loss(net, sched, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        step += 1
        # EMA with warmup: early on the average forgets fast, later it keeps ema_decay
        ema_update(ema, model, min(cfg["ema_decay"], (1 + step) / (10 + step)))
        loss_val = loss.item()
        if not math.isfinite(loss_val):
            raise UserError(f"[ddpm] loss became {loss_val} at step {step}; the last good checkpoint "
                            f"is kept at {ckpt_path}: lower --lr and --resume")
        elapsed += time.time() - t0
        loss_sum, n_sum = loss_sum + loss_val, n_sum + 1
        bar.update(1)
        if step % cfg["log_every"] == 0 or step == cfg["ddpm_steps"]:
            ips = n_sum * cfg["batch_size"] / (time.time() - t_last)
            bar.set_postfix(loss=f"{loss_sum / n_sum:.4f}", img_s=f"{ips:.0f}")
            log.write(f"{step},{loss_sum / n_sum:.5f},{ips:.1f}\n")
            log.flush()
            t_last, loss_sum, n_sum = time.time(), 0.0, 0
        if step % cfg["sample_every"] == 0 or step == cfg["ddpm_steps"]:
            sample_grid(ema, sched, x_T, real, os.path.join(out, f"samples_{step}.png"))
        if step % cfg["ckpt_every"] == 0 or step == cfg["ddpm_steps"]:
            save()
    bar.close()
    log.close()
    print(f"[ddpm] done: {step} steps in {elapsed / 60:.1f} min of training; checkpoint {ckpt_path}")
    return ckpt_path
