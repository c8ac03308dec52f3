"""ShortFT on Stable Diffusion 1.5 with a few-step LoRA shortcut (PAPER.md Sec. 3 and 5): the SD entry point.

    python train_sd.py --sd_path=DIR --shortcut=hyper-sd --prompts=prompts.txt --reward=saturation
    python train_sd.py sample --sd_path=DIR --lora_dir=out/sd/lora --prompts=prompts.txt   # DDIM-50
    torchrun --nproc_per_node=2 train_sd.py ...        # or: accelerate launch --multi_gpu train_sd.py ...

The chain is shortft.shortft_chain, unchanged (sftlib/sd.py adapts SD to it): DDIM-50 "leading" timesteps
981..1 in k = 4 segments with edges 761, 501, 261, 1; trainable T-LoRA (peft adapters lora1..lora4)
on the base UNet; the few-step LoRA (adapter "shortcut", frozen) jumps 741->501, 481->261, 241->1.
Writes <out_dir>/config.json, <out_dir>/log.csv and <out_dir>/lora/lora<j>/ (diffusers LoRA format)
plus <out_dir>/lora/tlora.json (which adapter is on at which timestep); `sample` renders prompts with
the fine-tuned base model's DDIM-50 chain, no shortcut.

Multi-GPU: under torchrun or `accelerate launch` (both set WORLD_SIZE, RANK, LOCAL_RANK) every process
samples its own prompts and noise; the LoRA gradients are averaged over processes after backward.
"""
import json
import os
import random
import time

import torch

import ddpm
from consistency import segment_edges
from ddpm import N_CHAIN  # fine-tune through DDIM-50, sample with DDIM-50
from sftlib import config, sd, sd_rewards
from sftlib.common import UserError, pick_device, run_main, save_grid, seed_all
from shortft import segment_groups, shortft_chain

DEFAULTS = dict(
    sd_path="stable-diffusion-v1-5/stable-diffusion-v1-5",  # a hub id or a local diffusers folder
    shortcut="hyper-sd",  # hyper-sd | tcd | lcm | a hub id | a local .safetensors file or folder
    shortcut_weight="",  # the file inside a hub repo / folder given as --shortcut (empty: its default)
    shortcut_guidance=1.0,  # CFG scale of the shortcut's calls; 1 = one conditional call (*choice*)
    prompts="",  # a text file, one prompt a line; empty = the few built-in PROMPTS
    reward="saturation",  # brightness | saturation | contrast | clip | aesthetic, or sums: 0.5*aesthetic+0.5*clip
    clip_path="openai/clip-vit-large-patch14",  # CLIP for the clip / aesthetic rewards (hub id or folder)
    aesthetic_path="",  # the LAION aesthetic predictor's weights, sac+logos+ava1-l14-linearMSE.pth
    resolution=512,
    guidance=7.5,  # classifier-free guidance scale of the base model's calls (*choice*: SD's default)
    k_segments=4,  # segments of the DDIM-50 chain: edges 761, 501, 261, 1 (PAPER.md Sec. 3)
    lora_rank=128,  # reported for the paper's T-LoRA
    lora_alpha=128.0,
    lora_targets="to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2",  # attention and feed-forward layers
    tlora=True,  # one LoRA per segment, stacked (PAPER.md Sec. 3)
    progressive=True,  # P-Training: k stages, the real chain grows by a segment each stage
    steps=400,  # optimiser steps (each process: batch samples a step)
    batch=1,  # samples per process and step
    lr=1e-4,
    grad_clip=1.0,
    reward_scale=1.0,  # loss = -reward_scale * mean reward
    grad_checkpoint=True,  # recompute each UNet call and the VAE decode in backward
    bf16=True,  # bf16 weights and autocast on CUDA (ignored elsewhere); the LoRA stays in fp32
    device="auto",
    seed=0,
    out_dir="out/sd",
    save_every=50,
)
SAMPLE_DEFAULTS = dict(sd_path=DEFAULTS["sd_path"], lora_dir="out/sd/lora", prompts="", n=1, guidance=7.5,
                       resolution=512, seed=0, out="out/sd/samples", device="auto", bf16=True)
PROMPTS = ["a photo of a cat", "a photo of a dog", "a red bicycle in the street", "a bowl of fruit on a table",
           "a lighthouse at sunset", "a horse in a meadow", "a cup of coffee", "a castle on a hill"]


def load_prompts(path):
    if not path:
        return PROMPTS
    if not os.path.isfile(path):
        raise UserError(f"--prompts={path}: no such file (one prompt a line)")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UserError(f"--prompts={path} holds no prompt")
    return prompts


def setup(cfg):
    """(device, rank, world size, bf16?): one process, or one of WORLD_SIZE under torchrun / accelerate."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world == 1:
        device = pick_device(cfg["device"])
    else:
        import torch.distributed as dist

        cuda = torch.cuda.is_available() and cfg["device"] != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
    return device, rank, world, cfg["bf16"] and device.type == "cuda"


def build(cfg, device, bf16, names_or_dir):
    """The pipeline and its UNet as shortft.py's eps-predictors (sd.SDFineTuned) and schedule. names_or_dir:
    an int k (fresh trainable T-LoRA, training), a lora dir written by `train` (sampling), or "" (no LoRA)."""
    pipe = sd.load_pipeline(cfg["sd_path"], device, torch.bfloat16 if bf16 else torch.float32)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else None
    if isinstance(names_or_dir, int):
        edges, tlora = segment_edges(1000, N_CHAIN, names_or_dir), cfg["tlora"]
        names = sd.add_tlora(pipe.unet, len(edges) if tlora else 1, cfg["lora_rank"], cfg["lora_alpha"],
                             cfg["lora_targets"])
        for name in names:
            for p in sd.adapter_params(pipe.unet, name):
                p.data = p.data.float()  # the trainable LoRA in fp32 even when the frozen weights are bf16
    elif not names_or_dir:
        names, edges, tlora = [], segment_edges(1000, N_CHAIN, 1), False
    else:
        meta_path = os.path.join(names_or_dir, "tlora.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"--lora_dir={names_or_dir}: no tlora.json there (written by train_sd.py)")
        with open(meta_path) as f:
            meta = json.load(f)
        names, edges, tlora = meta["names"], meta["edges"], meta["tlora"]
        for name in names:
            sd.load_lora(pipe, os.path.join(names_or_dir, name), name, flag="--lora_dir")
    groups = segment_groups(ddpm.ddim_timesteps(1000, N_CHAIN), edges)
    ft = sd.SDFineTuned(pipe.unet, groups, names, tlora=tlora, guidance=cfg["guidance"],
                        shortcut_guidance=cfg.get("shortcut_guidance", 1.0),
                        grad_checkpoint=cfg.get("grad_checkpoint", False), autocast=autocast)
    return pipe, ft, sd.SDSchedule(pipe.scheduler.alphas_cumprod, device)


def average_gradients(params, world):
    """Average the LoRA gradients over processes: what DDP does, written out because one step calls the
    UNet many times with different adapters (DDP expects one forward per backward)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])  # (n,) one all-reduce for all of them
    dist.all_reduce(flat)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g) / world)


def train(cfg):
    device, rank, world, bf16 = setup(cfg)
    main = rank == 0
    prompts = load_prompts(cfg["prompts"])
    sd.quiet()
    seed_all(cfg["seed"])  # the same LoRA initialisation in every process
    pipe, ft, sched = build(cfg, device, bf16, cfg["k_segments"])
    sd.load_lora(pipe, cfg["shortcut"], "shortcut", "--shortcut", cfg["shortcut_weight"])
    reward = sd_rewards.build_reward(cfg["reward"], device, cfg["clip_path"], cfg["aesthetic_path"])
    params = [p for name in ft.names for p in sd.adapter_params(pipe.unet, name)]
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    if world > 1:  # every process starts from rank 0's LoRA (the seed makes them equal already; this makes sure)
        import torch.distributed as dist

        for p in params:
            dist.broadcast(p.data, 0)
    seed_all(cfg["seed"] + rank)  # but each process its own prompts and noise
    k, h = len(ft.groups), cfg["resolution"] // pipe.vae_scale_factor
    if main:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        with open(os.path.join(cfg["out_dir"], "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        print(f"[train_sd] {world} process(es) on {device}{' bf16' if bf16 else ''}: {k} segments "
              f"{[g[-1] for g in ft.groups]}, T-LoRA {ft.tlora} ({sum(p.numel() for p in params) / 1e6:.2f}M "
              f"trainable), progressive {cfg['progressive']}, reward {cfg['reward']}, {len(prompts)} prompts")
        log = open(os.path.join(cfg["out_dir"], "log.csv"), "w")
        log.write("step,stage,reward,grad_norm,ms,peak_mib\n")
    for step in range(1, cfg["steps"] + 1):
        t0 = time.time()
        # P-Training: k equal stages; in stage i LoRAs i..k-1 train and segments 0..i run the real chain
        stage = min(k - 1, (step - 1) * k // cfg["steps"]) if cfg["progressive"] and ft.tlora else 0
        sd.set_stage(ft, stage)
        batch = random.choices(prompts, k=cfg["batch"])
        ft.set_prompts(*sd.encode(pipe, batch))
        x_T = torch.randn(cfg["batch"], 4, h, h, device=device)  # (B, 4, H/8, W/8) latent noise
        z0 = shortft_chain(ft, ft.shortcut, sched, x_T, ft.groups, stage)  # (B, 4, H/8, W/8)
        x0 = sd.decode(pipe.vae, z0, cfg["grad_checkpoint"])  # (B, 3, H, W) in [-1, 1]
        r = reward(x0, batch)  # (B,) higher is better
        loss = -cfg["reward_scale"] * r.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            average_gradients(params, world)
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg["grad_clip"]))
        if not (torch.isfinite(loss) and grad_norm == grad_norm):
            raise UserError(f"loss {loss.item()} / grad norm {grad_norm} at step {step}: stopped; lower --lr")
        opt.step()
        ms = (time.time() - t0) * 1000
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
        if main:
            log.write(f"{step},{stage},{r.mean().item():.5f},{grad_norm:.4f},{ms:.0f},{peak:.0f}\n")
            log.flush()
            print(f"[train_sd] step {step}/{cfg['steps']} stage {stage} reward {r.mean().item():.4f} "
                  f"grad {grad_norm:.3f} {ms:.0f} ms" + (f" peak {peak:.0f} MiB" if peak else ""))
            if step % cfg["save_every"] == 0 or step == cfg["steps"]:
                save(pipe.unet, ft, cfg["out_dir"])
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if main:
        log.close()
        print(f"[train_sd] done: the LoRA is in {cfg['out_dir']}/lora; render with: python train_sd.py sample "
              f"--sd_path={cfg['sd_path']} --lora_dir={cfg['out_dir']}/lora")


def save(unet, ft, out_dir):
    """Every adapter in diffusers' LoRA format, and tlora.json: which ones are on at which timestep."""
    lora_dir = os.path.join(out_dir, "lora")
    sd.save_lora(unet, ft.names, lora_dir)
    with open(os.path.join(lora_dir, "tlora.json"), "w") as f:
        json.dump(dict(names=ft.names, edges=ft.edges, tlora=ft.tlora,
                       rule="from the DDIM-50 timestep t on, the first max(1, #edges >= t) adapters are on"), f)


def sample(opts):
    """Render the prompts with the fine-tuned base model's long chain (DDIM-50, no shortcut) to PNGs."""
    device = pick_device(opts["device"])
    bf16 = opts["bf16"] and device.type == "cuda"
    prompts = load_prompts(opts["prompts"])
    sd.quiet()
    pipe, ft, sched = build(opts, device, bf16, opts["lora_dir"])  # no lora_dir: the base model, for "before"
    ft.trainable = set()
    seed_all(opts["seed"])
    h = opts["resolution"] // pipe.vae_scale_factor
    os.makedirs(opts["out"], exist_ok=True)
    images = []
    with torch.no_grad():  # sampling only: no graph
        for i, prompt in enumerate(prompts):
            ft.set_prompts(*sd.encode(pipe, [prompt] * opts["n"]))
            x_T = torch.randn(opts["n"], 4, h, h, device=device)  # (n, 4, H/8, W/8)
            z0 = ddpm.ddim_sample(ft, sched, x_T, ddpm.ddim_timesteps(1000, N_CHAIN))
            x0 = sd.decode(pipe.vae, z0)  # (n, 3, H, W) in [-1, 1]
            for j, img in enumerate(x0):
                save_grid(img[None], os.path.join(opts["out"], f"{i:03d}_{j}.png"), nrow=1)
            images.append(x0)
            print(f"[sample] {i + 1}/{len(prompts)}: {prompt}")
    save_grid(torch.cat(images), os.path.join(opts["out"], "grid.png"), nrow=max(opts["n"], 4))
    print(f"[sample] wrote {len(prompts) * opts['n']} images and grid.png to {opts['out']}")


def main(argv):
    if argv and argv[0] == "sample":
        opts = dict(SAMPLE_DEFAULTS)
        opts.update(config.parse_overrides(argv[1:], SAMPLE_DEFAULTS, prog="train_sd.py sample", description=sample.__doc__))
        print("config:", " ".join(f"{k}={v}" for k, v in opts.items()))
        sd.check_sd_path(opts["sd_path"])
        return sample(opts)
    cfg = dict(DEFAULTS)
    cfg.update(config.parse_overrides(argv, DEFAULTS, description=__doc__))
    if int(os.environ.get("RANK", "0")) == 0:
        print("config:", " ".join(f"{k}={v}" for k, v in cfg.items()))
    for key in ("steps", "batch", "k_segments", "lora_rank", "save_every"):
        if cfg[key] < 1:
            raise UserError(f"--{key} must be at least 1, got {cfg[key]}")
    if cfg["resolution"] % 8:
        raise UserError(f"--resolution must be a multiple of 8, got {cfg['resolution']}")
    sd.check_sd_path(cfg["sd_path"])
    return train(cfg)


def check_extras():
    """The SD path needs its extras; without them, one line saying how to get them."""
    import importlib.util

    missing = [m for m in ("diffusers", "transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"the SD path needs its extras ({', '.join(missing)} missing): pip install -r requirements-sd.txt")


if __name__ == "__main__":
    run_main(lambda argv: (check_extras(), main(argv)))
