"""One flat, typed configuration (in the style of nanoGPT's configurator).

DEFAULTS *are* the CPU run: reading them tells you exactly what `python train_toy.py` does on a
laptop. PRESETS["gpu"] overrides a few of them for the real run. `--key=value` on the command line
overrides both; the type of each value is the type of its default, and an unknown key is an error.
The resolved config is printed at start and stored in every checkpoint.
"""
import difflib

from common import UserError

DEFAULTS = dict(
    # --- run ---
    preset="auto",  # auto | cpu | gpu  (auto: gpu when CUDA is available, else cpu)
    device="auto",  # auto | cuda | mps | cpu  (auto: cuda -> mps -> cpu)
    stages="all",  # which pipeline stages to run: all, or a comma list (e.g. ddpm)
    out_dir="out",  # every stage writes under here: out/ddpm/ckpt.pt, out/ddpm/samples_*.png, ...
    data_root="data",  # CIFAR-10: ImageFolder layout (train/<class>/*.jpg) or torchvision's download
    n_train=0,  # use only the first n_train training images (evenly over classes); 0 = all 50k
    seed=0,
    resume=False,  # continue a killed stage from its checkpoint
    bf16=False,  # bf16 autocast (CUDA only)
    compile=False,  # torch.compile the UNet (CUDA only)
    # --- the diffusion process (Ho et al. 2020) ---
    T=1000,
    beta_1=1e-4,
    beta_T=0.02,
    clip_x0=True,  # samplers clip the predicted x_0 to [-1, 1] (ddpm.py's docstring says why)
    # --- the UNet (CPU: 0.7M parameters) ---
    ch=16,
    ch_mult="1,2,4",
    num_res_blocks=1,
    attn_res="8",  # resolutions with self-attention, comma separated
    dropout=0.0,
    # --- DDPM training ---
    ddpm_steps=900,
    batch_size=64,
    lr=1e-3,
    warmup=100,
    grad_clip=1.0,
    ema_decay=0.999,
    log_every=25,
    sample_every=300,  # sample grid from fixed noise (DDIM-50, EMA weights)
    ckpt_every=100,
    # --- reward classifier and held-out evaluator ---
    classifier_width=8,  # the reward classifier: ResNet-9 (Page 2018), channels w, 2w, 4w, 8w
    classifier_steps=2000,  # 5 epochs of batch 128: a weaker reward classifier is easier to hack (README)
    evaluator_width=8,  # the held-out evaluator: VGG-style, channels w..8w (its 8w features give the FD)
    evaluator_steps=1500,
    cls_batch_size=128,  # these five are shared by both nets: SGD + Nesterov, one-cycle lr
    cls_lr=0.2,
    cls_weight_decay=5e-4,
    cls_label_smoothing=0.2,
    cls_ckpt_every=100,
    n_test=0,  # use only the first n_test test images (evenly over classes); 0 = all 10k
    # --- shortcut (consistency distillation) ---
    k_segments=4,  # segments of the DDIM-50 chain; edges at their last timesteps (k=4: 761, 501, 261, 1)
    distill_steps=300,
    distill_batch=64,
    distill_lr=1e-3,
    cd_loss="huber",  # huber (pseudo-Huber, Song & Dhariwal 2023) | l2 (Song et al. 2023)
    cd_target_ema=0.0,  # mu of the target network: 0 = stop-grad student (Song & Dhariwal 2023); Song et al. 2023: 0.95
    distill_ema=0.99,  # EMA of the student: the weights sampled, and used as the shortcut by ShortFT
    teacher_solver="ddim",  # ddim | heun: the teacher's ODE step t_{n+1} -> t_n
    teacher_chain_frac=0.5,  # part of each batch on the teacher's own DDIM-50 chains, not q(x_t|x_0) of real data
    distill_init="",  # a shortcut ckpt.pt to start the student from (its EMA) instead of the teacher: k ablations
    # --- ShortFT reward fine-tuning (shortft.py, train_shortft.py) ---
    reward="classifier:ship",  # rewards.py spec: brightness, brightness:0.8, classifier:<class>, 0.7*a+0.3*b
    ft_steps=60,  # with ft_lr: held-out ship rate ~3x the base's before quality drops much (README: the curve)
    ft_seconds=0.0,  # > 0: a wall-clock budget of training seconds instead of ft_steps (equal compute)
    ft_batch=8,
    ft_lr=4e-4,
    ft_grad_clip=1.0,
    reward_scale=1.0,  # loss = -reward_scale * mean reward
    lora_rank=4,  # the paper uses 128 on SD 1.5
    lora_alpha=4.0,
    lora_targets="",  # comma list of layer-name parts to put LoRA on (e.g. attn,temb); empty = every conv/linear
    full_ft=False,  # train all base weights instead of LoRA (no T-LoRA then)
    tlora=True,  # timestep-aware LoRA: one LoRA per segment, stacked (PAPER.md Sec. 3)
    progressive=True,  # P-Training: k stages, the real chain grows by a segment each stage
    n_eval=256,  # DDIM-50 samples from fixed noise, scored before and after fine-tuning
    ft_ckpt_every=20,
    ft_eval_every=0,  # > 0: also score DDIM-50 samples every this many steps (eval.csv: the reward/quality curve)
    method="shortft",  # shortft | draft | draft_lv | alignprop | full: where the gradient is cut (shortft.py)
    draft_k=1,  # DRaFT-K: the last K of the 50 steps carry gradient
    lv_n=2,  # DRaFT-LV: copies of the last step
    alignprop_min=35,  # AlignProp: the cut is uniform in [min, max] of the 50 steps (its default 35..45)
    alignprop_max=45,
    full_checkpoint=False,  # full backprop: gradient checkpointing on every UNet call
)

PRESETS = {
    "cpu": {},
    # The DDPM of Ho et al. 2020 for CIFAR-10 (35.7M parameters), trained for what fits ~20 min on one H100.
    "gpu": dict(ch=128, ch_mult="1,2,2,2", num_res_blocks=2, attn_res="16", dropout=0.1,
                ddpm_steps=40000, batch_size=128, lr=2e-4, warmup=1000, ema_decay=0.9999,
                log_every=100, sample_every=5000, ckpt_every=2000,
                distill_steps=10000, distill_batch=128, distill_lr=1e-4, distill_ema=0.999,
                classifier_width=64, evaluator_width=64, classifier_steps=2500, evaluator_steps=2500,
                cls_batch_size=512, cls_lr=0.4, cls_ckpt_every=500,
                ft_steps=1500, ft_batch=32, lora_rank=16, lora_alpha=16.0, n_eval=2000, ft_ckpt_every=250),
}

# keys of the `sample` command (python train_toy.py sample --ckpt=... --n=...)
SAMPLE_DEFAULTS = dict(ckpt="", n=64, sampler="ddim", steps=50, eta=0.0, out="samples.npz",
                       seed=0, device="auto", batch_size=256, clip_x0=True)

# keys of the `eval` command (python train_toy.py eval --samples=FILE.npz --target=ship); evaluate.py
EVAL_DEFAULTS = dict(samples="", target="", reward="", out_dir="out", device="auto", inception=False,
                     inception_weights="")


def _convert(key, raw, default):
    """Parse a command-line string to the type of the default, or raise a one-line error."""
    kind = type(default)
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
    else:
        try:
            return kind(raw)
        except ValueError:
            pass
    raise UserError(f"--{key} expects a {kind.__name__}, got {raw!r}")


def parse_overrides(args, defaults):
    """['--key=value', '--flag', ...] -> {key: typed value}. Unknown key or bad type: UserError."""
    out = {}
    for arg in args:
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options look like --key=value")
        key, eq, raw = arg[2:].partition("=")
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UserError(f"unknown option --{key}{hint}")
        if not eq:  # a bare --flag means --flag=true
            if type(defaults[key]) is not bool:
                raise UserError(f"--{key} needs a value: --{key}=...")
            raw = "true"
        out[key] = _convert(key, raw, defaults[key])
    return out


def resolve(args, cuda_available):
    """Defaults, then the preset, then the command line."""
    overrides = parse_overrides(args, DEFAULTS)
    cfg = dict(DEFAULTS)
    preset = overrides.get("preset", "auto")
    if preset == "auto":
        preset = "gpu" if cuda_available else "cpu"
    if preset not in PRESETS:
        raise UserError(f"--preset must be one of auto, {', '.join(PRESETS)}; got {preset!r}")
    cfg.update(PRESETS[preset])
    cfg.update(overrides)
    cfg["preset"] = preset
    return cfg
