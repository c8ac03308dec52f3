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
)

PRESETS = {
    "cpu": {},
    # The DDPM of Ho et al. 2020 for CIFAR-10 (35.7M parameters), trained for what fits ~20 min on one H100.
    "gpu": dict(ch=128, ch_mult="1,2,2,2", num_res_blocks=2, attn_res="16", dropout=0.1,
                ddpm_steps=40000, batch_size=128, lr=2e-4, warmup=1000, ema_decay=0.9999,
                log_every=100, sample_every=5000, ckpt_every=2000),
}

# keys of the `sample` command (python train_toy.py sample --ckpt=... --n=...)
SAMPLE_DEFAULTS = dict(ckpt="", n=64, sampler="ddim", steps=50, eta=0.0, out="samples.npz",
                       seed=0, device="auto", batch_size=256)


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
