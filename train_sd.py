"""ShortFT on Stable Diffusion 1.5 with a few-step LoRA shortcut (PAPER.md Sec. 3 and 5): the SD model of the
main entry point, `python train_toy.py --model=sd15 ...` (this file alone: `python train_sd.py ...`, the same).

    python train_toy.py --model=sd15 --sd_path=DIR --shortcut=hyper-sd --prompts=prompts.txt --reward=saturation
    python train_toy.py --model=sd15 --resume ...      # continue a killed run from <out_dir>/sd15/ckpt.pt
    python train_sd.py sample --sd_path=DIR --lora_dir=out/sd15/lora --prompts=prompts.txt   # DDIM-50
    torchrun --nproc_per_node=2 train_sd.py ...        # or: accelerate launch --multi_gpu train_sd.py ...

The toy pipeline's stages, and their SD counterparts:
    ddpm, shortcut  not trained: SD 1.5 is loaded from --sd_path, the few-step LoRA (Hyper-SD / TCD / LCM)
                    from --shortcut, both frozen
    classifier      the reward is set up: image statistics, CLIP score or the LAION aesthetic head (sftlib/sd_rewards.py)
    shortft         fine-tune T-LoRA against the reward through the shortcut chain (train() below)
    sample          validation grids while training; `sample` renders prompts after it (DDIM-50, no shortcut)

The chain is shortft.shortft_chain, unchanged (sftlib/sd.py adapts SD to it): DDIM-50 "leading" timesteps
981..1 in k = 4 segments with edges 761, 501, 261, 1; trainable T-LoRA (peft adapters lora1..lora4)
on the base UNet; the few-step LoRA (adapter "shortcut", frozen) jumps 741->501, 481->261, 241->1.
Writes <out_dir>/sd15/: ckpt.pt (kind "sd_shortft": the T-LoRA, Adam's state, the step and the config; the
resume checkpoint), log.csv, samples_{step}.png (the validation grid: DDIM-50 of the fine-tuned base model for
the first n_eval prompts from fixed noise; samples_0.png is the base model) and lora/lora<j>/ (diffusers
LoRA format) plus lora/tlora.json (which adapter is on at which timestep).

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
from sftlib.stage import Stage
from shortft import ptrain_phase, segment_groups, shortft_chain

DEFAULTS = dict(  # the paper's run on one GPU; the keys the toy pipeline also has keep its names and meaning
    # --- run ---
    model="sd15",  # sd15: this pipeline; toy: the CIFAR-10 one (python train_toy.py --help)
    device="auto",
    out_dir="out",  # the SD stage writes under <out_dir>/sd15/: ckpt.pt, log.csv, samples_{step}.png, lora/
    seed=0,
    resume=False,  # continue a killed run from <out_dir>/sd15/ckpt.pt
    bf16=True,  # bf16 weights and autocast on CUDA (ignored elsewhere); the LoRA stays in fp32
    log_every=10,  # progress bar and log.csv: a row (running means) every this many steps
    sample_every=50,  # the validation grid samples_{step}.png every this many steps (and at steps 0 and ft_steps)
    sample_steps=50,  # DDIM steps of the validation grid's chain (the paper evaluates DDIM-50)
    # --- the base model and its shortcut: loaded, not trained ---
    sd_path="stable-diffusion-v1-5/stable-diffusion-v1-5",  # a hub id or a local diffusers folder
    shortcut="hyper-sd",  # hyper-sd | tcd | lcm | a hub id | a local .safetensors file or folder
    shortcut_weight="",  # the file inside a hub repo / folder given as --shortcut (empty: its default)
    shortcut_guidance=1.0,  # CFG scale of the shortcut's calls; 1 = one conditional call (*choice*)
    resolution=512,
    guidance=7.5,  # classifier-free guidance scale of the base model's calls (*choice*: SD's default)
    # --- the reward ---
    reward="saturation",  # brightness | saturation | contrast | clip | aesthetic, or sums: 0.5*aesthetic+0.5*clip
    prompts="",  # a text file, one prompt a line; empty = the few built-in PROMPTS
    clip_path="openai/clip-vit-large-patch14",  # CLIP for the clip / aesthetic rewards (hub id or folder)
    aesthetic_path="",  # the LAION aesthetic predictor's weights, sac+logos+ava1-l14-linearMSE.pth
    # --- ShortFT reward fine-tuning (shortft.py) ---
    k_segments=4,  # segments of the DDIM-50 chain: edges 761, 501, 261, 1 (PAPER.md Sec. 3)
    ft_steps=400,  # optimiser steps (each process: ft_batch samples a step)
    ft_batch=1,  # samples per process and step
    ft_lr=1e-4,
    ft_grad_clip=1.0,
    ft_reward_scale=1.0,  # loss = -ft_reward_scale * mean reward
    ft_ckpt_every=50,  # ckpt.pt and lora/ every this many steps
    ft_grad_checkpoint=True,  # recompute each UNet call and the VAE decode in backward
    lora_rank=128,  # reported for the paper's T-LoRA
    lora_alpha=128.0,
    lora_targets=sd.LORA_TARGETS,  # attention and feed-forward layers
    tlora=True,  # one LoRA per segment, stacked (PAPER.md Sec. 3)
    progressive=True,  # P-Training: k phases, the real chain grows by a segment each phase
    ptrain_t1_phase=False,  # also run P-Training's last phase (only LoRA k, at t = 1: shortft.ptrain_phase says why not)
    n_eval=4,  # the validation grid: DDIM-50 samples of the first n_eval prompts, from fixed noise
)
SAMPLE_DEFAULTS = dict(sd_path=DEFAULTS["sd_path"], lora_dir="out/sd15/lora", prompts="", n=1, guidance=7.5,
                       resolution=512, seed=0, out="out/sd15/samples", device="auto", bf16=True)
PROMPTS = ["a photo of a cat", "a photo of a dog", "a red bicycle in the street", "a bowl of fruit on a table",
           "a lighthouse at sunset", "a horse in a meadow", "a cup of coffee", "a castle on a hill"]
COLUMNS = ("loss", "reward", "grad_norm", "phase", "ms", "peak_mib")  # log.csv, besides step and img_per_s


def load_prompts(path):
    if not path:
        return PROMPTS
    if not os.path.isfile(path):
        raise UserError(f"--prompts={path}: no such file (one prompt a line)")
    from sftlib.readers import read_text

    prompts = [line.strip() for line in read_text(path, "prompts file").splitlines() if line.strip()]  # UTF-8 text
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
        for p in sd.adapter_state(pipe.unet, names).values():
            p.data = p.data.float()  # the trainable LoRA in fp32 even when the frozen weights are bf16
    elif not names_or_dir:
        names, edges, tlora = [], segment_edges(1000, N_CHAIN, 1), False
    else:
        meta_path = os.path.join(names_or_dir, "tlora.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"--lora_dir={names_or_dir}: no tlora.json there (written by the sd15 model's training)")
        from sftlib.readers import check_edges, read_json

        meta = read_json(meta_path, {"names": list, "edges": list, "tlora": bool}, "LoRA description")
        check_edges(meta["edges"], 1000, meta_path)
        names, edges, tlora = meta["names"], meta["edges"], meta["tlora"]
        for name in names:
            sd.load_lora(pipe, os.path.join(names_or_dir, name), name, flag="--lora_dir")
    groups = segment_groups(ddpm.ddim_timesteps(1000, N_CHAIN), edges)
    ft = sd.SDFineTuned(pipe.unet, groups, names, tlora=tlora, guidance=cfg["guidance"],
                        shortcut_guidance=cfg.get("shortcut_guidance", 1.0),
                        grad_checkpoint=cfg.get("ft_grad_checkpoint", False), autocast=autocast)
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


def draw(cfg, prompts, rank, step, h, device):
    """The prompts and latent noise x_T (B, 4, h, h) of one step in one process, from a seed of its own
    (seed, rank, step) rather than the global RNG: a resumed run draws what the uninterrupted one would have."""
    seed = (cfg["seed"] * 1000 + rank) * 10**7 + step
    batch = random.Random(seed).choices(prompts, k=cfg["ft_batch"])
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on any device
    return batch, torch.randn(cfg["ft_batch"], 4, h, h, generator=g).to(device)


@torch.no_grad()  # sampling only: no graph
def render(pipe, ft, sched, prompts, x_T, steps=N_CHAIN):
    """Images (N, 3, H, W) in [-1, 1] of the fine-tuned base model's long chain (DDIM-`steps`, no shortcut):
    prompt i from noise x_T[i] (N, 4, h, w)."""
    ft.set_prompts(*sd.encode(pipe, prompts))
    z0 = ddpm.ddim_sample(ft, sched, x_T, ddpm.ddim_timesteps(1000, steps))  # (N, 4, h, w)
    return sd.decode(pipe.vae, z0)  # (N, 3, H, W)


def train(cfg):
    """The SD counterparts of the toy stages: load the base and its shortcut, set up the reward, fine-tune."""
    stage = Stage(cfg, "sd15", kind="sd_shortft", steps="ft_steps", columns=COLUMNS)
    ckpt = stage.resume_or_skip(complete=lambda c: c["done"])  # on resume, cfg is now the checkpoint's config
    if stage.skipped:
        return stage.ckpt_path
    device, rank, world, bf16 = setup(cfg)
    main = rank == 0
    prompts = load_prompts(cfg["prompts"])
    sd.quiet()
    seed_all(cfg["seed"])  # the same LoRA initialisation in every process
    pipe, ft, sched = build(cfg, device, bf16, cfg["k_segments"])  # stages ddpm and shortcut: loaded
    sd.load_lora(pipe, cfg["shortcut"], "shortcut", "--shortcut", cfg["shortcut_weight"])
    reward = sd_rewards.build_reward(cfg["reward"], device, cfg["clip_path"], cfg["aesthetic_path"])
    lora = sd.adapter_state(pipe.unet, ft.names)  # {name: parameter} of the trainable T-LoRA
    params = list(lora.values())
    opt = torch.optim.Adam(params, lr=cfg["ft_lr"])
    step = 0
    if ckpt is not None:
        with torch.no_grad():
            for n, p in lora.items():
                p.copy_(ckpt["lora"][n])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
    elif world > 1:  # every process starts from rank 0's LoRA (the seed makes them equal already; this makes sure)
        import torch.distributed as dist

        for p in params:
            dist.broadcast(p.data, 0)
    k, h = len(ft.groups), cfg["resolution"] // pipe.vae_scale_factor
    val_prompts = [prompts[i % len(prompts)] for i in range(cfg["n_eval"])]
    x_val = torch.randn(cfg["n_eval"], 4, h, h, generator=torch.Generator().manual_seed(4321)).to(device)

    def validate():  # the validation grid: one column a prompt, the same noise at every step
        save_grid(render(pipe, ft, sched, val_prompts, x_val, cfg["sample_steps"]), os.path.join(stage.out, f"samples_{step}.png"),
                  nrow=len(val_prompts))

    def save(done):
        stage.save(lora={n: p.detach().float().cpu() for n, p in lora.items()}, opt=opt.state_dict(), step=step,
                   done=done)
        export(pipe.unet, ft, stage.out)

    if main:
        stage.say(f"{world} process(es) on {device}{' bf16' if bf16 else ''}: {k} segments "
                  f"{[g[-1] for g in ft.groups]}, T-LoRA {ft.tlora} ({sum(p.numel() for p in params) / 1e6:.2f}M "
                  f"trainable), progressive {cfg['progressive']}, reward {cfg['reward']}, {len(prompts)} prompts")
        stage.start(step)
        if step == 0:
            validate()  # samples_0.png: the base model, before fine-tuning
    while step < cfg["ft_steps"]:
        t0 = time.time()
        # P-Training: k equal phases; in phase i LoRAs i..k-1 train and segments 0..i run the real chain
        phase = ptrain_phase(k, step / cfg["ft_steps"], cfg["ptrain_t1_phase"]) if cfg["progressive"] and ft.tlora else 0
        sd.set_phase(ft, phase)
        batch, x_T = draw(cfg, prompts, rank, step, h, device)  # x_T: (B, 4, H/8, W/8) latent noise
        ft.set_prompts(*sd.encode(pipe, batch))
        z0 = shortft_chain(ft, ft.shortcut, sched, x_T, ft.groups, phase)  # (B, 4, H/8, W/8)
        x0 = sd.decode(pipe.vae, z0, cfg["ft_grad_checkpoint"])  # (B, 3, H, W) in [-1, 1]
        r = reward(x0, batch)  # (B,) higher is better
        loss = -cfg["ft_reward_scale"] * r.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            average_gradients(params, world)
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                                         cfg["ft_grad_clip"]))
        if not (torch.isfinite(loss) and grad_norm == grad_norm):  # before opt.step: the weights stay good
            raise UserError(f"loss {loss.item()} / grad norm {grad_norm} at step {step + 1}: stopped; the last "
                            f"good checkpoint is kept at {stage.ckpt_path}: lower --ft_lr and --resume")
        opt.step()
        step += 1
        ms = (time.time() - t0) * 1000
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
        if main:
            stage.tick(step, cfg["ft_batch"] * world, "ft_lr", cfg["log_every"], loss=loss.item(),
                       reward=r.mean().item(), grad_norm=grad_norm, phase=phase, ms=ms, peak_mib=peak)
            if stage.due(step, cfg["sample_every"]):
                validate()
            if stage.due(step, cfg["ft_ckpt_every"]):
                save(done=step == cfg["ft_steps"])
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if main:
        stage.close()
        print(f"[sd15] done: the LoRA is in {stage.out}/lora, the validation grids in {stage.out}/samples_*.png; "
              f"render with: python train_sd.py sample --sd_path={cfg['sd_path']} --lora_dir={stage.out}/lora")
    return stage.ckpt_path


def export(unet, ft, out):
    """Every adapter in diffusers' LoRA format under out/lora/, and tlora.json: which ones are on at which timestep."""
    lora_dir = os.path.join(out, "lora")
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
    for i, prompt in enumerate(prompts):
        x0 = render(pipe, ft, sched, [prompt] * opts["n"], torch.randn(opts["n"], 4, h, h, device=device))
        for j, img in enumerate(x0):  # x0: (n, 3, H, W) in [-1, 1]
            save_grid(img[None], os.path.join(opts["out"], f"{i:03d}_{j}.png"), nrow=1)
        images.append(x0)
        print(f"[sample] {i + 1}/{len(prompts)}: {prompt}")
    save_grid(torch.cat(images), os.path.join(opts["out"], "grid.png"), nrow=max(opts["n"], 4))
    print(f"[sample] wrote {len(prompts) * opts['n']} images and grid.png to {opts['out']}")


def resolve(args):
    """DEFAULTS, then the command line (no presets: the defaults are the paper's GPU run); checked."""
    cfg = dict(DEFAULTS)
    cfg.update(config.parse_overrides(args, DEFAULTS, prog="train_toy.py --model=sd15", description=__doc__,
                                      source=__file__))
    if cfg["model"] != "sd15":
        raise UserError(f"--model={cfg['model']}: this is the sd15 model; run python train_toy.py --model={cfg['model']}")
    for key in ("ft_steps", "ft_batch", "k_segments", "lora_rank", "ft_ckpt_every", "log_every", "sample_every",
                "sample_steps", "n_eval"):
        if cfg[key] < 1:
            raise UserError(f"--{key} must be at least 1, got {cfg[key]}")
    if cfg["resolution"] % 8:
        raise UserError(f"--resolution must be a multiple of 8, got {cfg['resolution']}")
    return cfg


def main(argv):
    """`train_toy.py --model=sd15 ARGS` and `train_sd.py ARGS`: train; `train_sd.py sample ARGS`: render."""
    if argv and argv[0] == "sample":
        opts = dict(SAMPLE_DEFAULTS)
        opts.update(config.parse_overrides(argv[1:], SAMPLE_DEFAULTS, prog="train_sd.py sample",
                                           description=sample.__doc__, source=__file__))
        print("config:", " ".join(f"{k}={v}" for k, v in opts.items()))
        check_extras()
        sd.check_sd_path(opts["sd_path"])
        return sample(opts)
    cfg = resolve(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        print("config:", " ".join(f"{k}={v}" for k, v in cfg.items()))
    check_extras()
    sd.check_sd_path(cfg["sd_path"])
    return train(cfg)


def check_extras():
    """The SD path needs its extras; without them, one line saying how to get them."""
    import importlib.util

    missing = [m for m in ("diffusers", "transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"the SD path needs its extras ({', '.join(missing)} missing): pip install -r requirements-sd.txt")


if __name__ == "__main__":
    run_main(main)
