"""Benchmark: one ShortFT step vs one full-chain backprop step on Stable Diffusion, random weights.

    python bench_sd.py                          # tiny random SD components, 32x32 images (CPU-friendly)
    python bench_sd.py --size=sd15 --resolution=512 --device=cuda   # SD 1.5's shapes, random weights

Prints ms/step and peak memory per method, then one line of JSON. Each method runs in its own process,
so peak memory is its own: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on CPU
(reported with the RSS after setup, whose difference is what the step itself costs). Random weights
time the same computation as real ones; no download is needed. `random_pipeline` also builds the tiny
pipeline the tests use.

Methods (all: CFG on the base calls, VAE decode in the graph, brightness reward, Adam step on LoRA):
    shortft        shortft.shortft_chain, stage 0: 12 no-grad steps, then 7 UNet calls with a graph
    full           shortft.full_chain over DDIM-50: all 50 UNet calls keep their graph
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

import config
from common import UserError, pick_device

DEFAULTS = dict(size="tiny", resolution=32, batch=1, iters=3, methods="shortft,full,full_ckpt,shortft_nockpt",
                device="cpu", bf16=True, lora_rank=4, one="", seed=0)


def tiny_tokenizer():
    """A byte-level CLIP tokenizer with no merges (one token per character): no download needed."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in sorted(ByteLevel.alphabet()):
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def random_pipeline(size="tiny", cross_attention_dim=None, seed=0):
    """A StableDiffusionPipeline with random weights built from configs. tiny: 0.8M-parameter UNet, VAE
    downsampling x2; sd15: SD 1.5's shapes (UNet 859.5M, VAE 83.7M downsampling x8, CLIP ViT-L/14's text
    transformer, 85.5M with this byte-level vocabulary instead of CLIP's 49408 tokens)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    if size == "tiny":
        dim = cross_attention_dim or 32
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=dim, attention_head_dim=8, norm_num_groups=8)
        vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
        text = CLIPTextConfig(hidden_size=dim, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    elif size == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=512)
        text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                              vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    else:
        raise UserError(f"--size must be tiny or sd15, got {size!r}")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # SD 1.5's scheduler settings
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tok,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_lora(unet, rank, seed, scale=0.05):
    """A random LoRA for `unet` in diffusers' format (a stand-in few-step shortcut): peft state dict."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    u = copy.deepcopy(unet)
    u.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                  adapter_name="x")
    g = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(u, adapter_name="x")
    return {"unet." + k: scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def run_one(opts):
    """Build everything, run `iters` timed steps of one method after a warm-up; returns a dict."""
    import ddpm
    import sd
    from consistency import segment_edges
    from rewards import brightness
    from shortft import full_chain, segment_groups, shortft_chain

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
    sd.set_stage(ft, 0)
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
            z0 = shortft_chain(ft, ft.shortcut, sched, x_T, groups, stage=0)
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
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
