"""One flat, typed configuration (in the style of nanoGPT's configurator), read by argparse.

DEFAULTS *are* the CPU run: reading them tells you exactly what `python train_toy.py` does on a
laptop. PRESETS["gpu"] overrides a few of them for the 8-minute run on one GPU (PRESETS["gpu_long"]: the 35.7M
UNet of Ho et al. 2020, for users with an hour). `--key=value` (or `--key value`)
on the command line overrides both; the type of each value is the type of its default, an unknown
key is an error (with a "did you mean"), and `--help` lists every key with its type, default and
the comment beside it here. Keys carry their stage as prefix: ddpm_*, shortcut_*, cls_*, ft_*.
The resolved config is printed at start and stored in every checkpoint.
"""
import argparse
import difflib
import inspect
import os
import re

from baselines import METHODS
from ddpm import N_CHAIN
from rewards import parse_reward_spec
from sftlib.errors import UserError

DEFAULTS = dict(
    # --- run ---
    model="toy",  # toy: the CIFAR-10 pipeline below | sd15: Stable Diffusion 1.5 (train_sd.py; --model=sd15 --help lists its keys)
    preset="auto",  # auto | cpu | gpu | gpu_long | quick  (auto: gpu when CUDA is available, else cpu; gpu: 8 min on one H100/H200; gpu_long: Ho et al.'s 35.7M UNet, about an hour; quick: the shipped checkpoints, then ShortFT with a smaller evaluation, 5 min on 2 free CPU cores)
    device="auto",  # auto | cuda | mps | cpu  (auto: cuda -> mps -> cpu)
    stages="all",  # which pipeline stages to run: all, or a comma list (e.g. ddpm)
    out_dir="out",  # every stage writes under here: out/ddpm/ckpt.pt, out/ddpm/samples_*.png, ...
    data_root="data",  # CIFAR-10: a folder in ImageFolder layout (train/<class>/*.jpg), else downloaded here; default: $SHORTFT_CIFAR if set
    n_train=0,  # use only the first n_train training images (evenly over classes); 0 = all 50k
    seed=0,
    resume=False,  # continue a killed stage from its checkpoint
    pretrained=False,  # start from the shipped classroom checkpoints (checkpoints/): the pipeline goes straight to ShortFT
    bf16=False,  # bf16 autocast (CUDA only): training, sampling and the fine-tuning chains (rewards and losses in fp32)
    channels_last=False,  # the UNet's weights and activations in NHWC (CUDA only), what cuDNN's fast bf16 convolutions take
    compile=False,  # torch.compile the UNet (CUDA only)
    log_every=25,  # progress bar and log.csv: a row every this many steps
    sample_every=300,  # ddpm and shortcut stages: a sample grid from fixed noise every this many steps
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
    eps_skip=True,  # eps = c_skip(t) x_t + UNet(x_t, t), c_skip the best linear guess of eps (unet.py says why)
    dropout=0.0,
    # --- DDPM training (train_ddpm.py) ---
    ddpm_steps=1700,  # about 10 minutes on 2 CPU cores (the recipe ablation: docs/results.md, appendix)
    ddpm_seconds=0.0,  # > 0: also stop after this many seconds of training, whichever comes first (the gpu preset's budget)
    ddpm_batch=64,
    ddpm_lr=1e-3,
    ddpm_warmup=100,  # linear lr warmup steps (Ho et al. 2020 use 5000 at full scale)
    ddpm_grad_clip=1.0,
    ddpm_ema=0.999,  # EMA rate of the weights that are sampled
    ddpm_min_snr=0.0,  # > 0: Min-SNR-gamma loss weighting with this gamma (Hang et al. 2023; ddpm.eps_loss); 0: off
    ddpm_lr_schedule="constant",  # constant | cosine (after the warmup, the lr decays to 0 at ddpm_steps)
    ddpm_ckpt_every=100,
    # --- reward classifier, held-out evaluator and judge (train_classifier.py) ---
    classifier_width=8,  # the reward classifier: ResNet-9 (Page 2018), channels w, 2w, 4w, 8w
    classifier_steps=2000,  # 5 epochs of batch 128: a weaker reward classifier is easier to hack
    evaluator_width=8,  # the held-out evaluator: VGG-style, channels w..8w (its 8w features give the FD)
    evaluator_steps=1500,
    judge_width=16,  # the judge (never a reward, never tuned on): all-conv + GroupNorm, channels w..8w (its 8w features give sftlib/judge.py's FD), trained on the second half of every class
    judge_steps=1000,  # 2.3 min on one shared CPU core, 72 % test accuracy (checkpoints/README.md)
    cls_batch=128,  # these five are shared by the three nets: SGD + Nesterov, one-cycle lr
    cls_lr=0.2,
    cls_weight_decay=5e-4,
    cls_label_smoothing=0.2,
    cls_ckpt_every=100,
    n_test=0,  # use only the first n_test test images (evenly over classes); 0 = all 10k
    # --- the shortcut: consistency distillation (train_shortcut.py, consistency.py) ---
    k_segments=4,  # segments of the DDIM-50 chain; edges at their last timesteps (k=4: 761, 501, 261, 1)
    shortcut_steps=300,
    shortcut_seconds=0.0,  # > 0: also stop after this many seconds of training, whichever comes first
    shortcut_batch=64,
    shortcut_lr=1e-3,
    shortcut_grad_clip=1.0,
    shortcut_ckpt_every=100,
    cd_loss="huber",  # huber (pseudo-Huber, Song & Dhariwal 2023) | l2 (Song et al. 2023)
    cd_target_ema=0.95,  # mu of the target network (Song et al. 2023); 0 = stop-grad student (Song & Dhariwal 2023), which fails on the eps-skip base (docs/results.md)
    shortcut_ema=0.99,  # EMA of the student: the weights sampled, and used as the shortcut by ShortFT
    teacher_solver="ddim",  # ddim | heun: the teacher's ODE step t_{n+1} -> t_n
    teacher_chain_frac=0.5,  # part of each batch on the teacher's own DDIM-50 chains, not q(x_t|x_0) of real data
    shortcut_init="",  # a shortcut ckpt.pt to start the student from (its EMA) instead of the teacher: k ablations
    # --- ShortFT reward fine-tuning (shortft.py, train_shortft.py) ---
    reward="classifier:ship",  # rewards.py spec: brightness, brightness:0.8, classifier:<class>, 0.7*a+0.3*b
    ft_steps=30,  # optimizer steps (P-Training splits them into equal phases); 30: the held-out diversity stays >= 90 % of the base's (60 collapsed it: docs/results.md, "The whole CPU pipeline")
    ft_batch=8,
    ft_lr=4e-4,
    ft_grad_clip=1.0,
    ft_reward_scale=1.0,  # loss = -ft_reward_scale * mean reward
    lora_rank=4,  # the paper uses 128 on SD 1.5
    lora_alpha=4.0,
    lora_targets="",  # comma list of layer-name parts to put LoRA on (e.g. attn,temb); empty = every conv/linear
    full_ft=False,  # train all base weights instead of LoRA (no T-LoRA then)
    tlora=True,  # timestep-aware LoRA: one LoRA per segment, stacked (PAPER.md Sec. 3)
    progressive=True,  # P-Training: k phases, the real chain grows by a segment each phase
    ptrain_t1_phase=False,  # P-Training's last phase trains LoRA k alone at t = 1, where it moves x_0 by <= 1.5 % of its eps change: skipped (k - 1 phases) unless true
    n_eval=256,  # DDIM-50 samples from fixed noise, scored before and after fine-tuning
    ft_ckpt_every=20,
    method="shortft",  # shortft | shortft_naive | shortft_perfect | draft | draft_lv | alignprop | drtune | full: where the gradient is cut (shortft.py)
    draft_k=1,  # DRaFT-K: the last K of the 50 steps carry gradient
    lv_n=2,  # DRaFT-LV: re-noised copies of sg(x_0), each taking the last step with gradient
    alignprop_min=0,  # AlignProp: at every step i a cut uniform in [min, max] is drawn, eps detached if i < cut
    alignprop_max=50,  # (0, 50): AlignProp's aesthetic/HPS configs
    drtune_k=5,  # DRTune: evenly spaced steps of the 50 that train (the UNet input is sg(x_t) at every step)
    full_checkpoint=False,  # full backprop: gradient checkpointing on every UNet call
    ft_clip_grad="hard",  # with --clip_x0, the training chains' clip: hard (a clipped pixel passes no gradient) | straight_through (same values, identity gradient; ddpm.clip)
    # --- sizes of the grids and evaluations (DDIM-50 samples cost 50 network calls each) ---
    grid_ddpm=56,  # ddpm stage: DDIM-50 samples in each grid (below a row of 8 real images)
    grid_shortcut=16,  # shortcut stage: teacher DDIM-50 samples and shortcut samples in each grid
    grid_ft=32,  # shortft stage: base and fine-tuned samples in before_after.png
    sample_batch=256,  # images per network call when sampling for grids and evaluations
    # --- Inception FID in the fine-tuning's evaluation (sftlib/fid.py, sftlib/metrics.py) ---
    fid_n=0,  # > 0: also Inception FID/KID of this many DDIM-50 samples before and after fine-tuning (metrics.json)
    fid_ref_n=10000,  # real test images behind the FID statistics when checkpoints/fid_cifar10_test.npz is absent
)

PRESETS = {
    "cpu": {},
    # The whole pipeline on one GPU in 8 minutes, the 10k-sample FID of the base and the fine-tuned model included.
    # The DDPM and the shortcut train for a time (seconds, at whatever rate the card gives); the rest in steps.
    # The UNet is Ho et al.'s layout at half the width (8.95M parameters, 3.0 GFLOP per image forward instead of
    # 12.1): at a fixed time, images seen x quality beats parameter count. Keeps the CPU preset's eps skip and slow
    # CD target (both made for briefly trained bases). Stage times are predicted from measured H200 rates
    # (`python benchmarks/gpu.py --predict=benchmarks/results/gpu_h200.json`), not yet measured end to end.
    "gpu": dict(ch=64, ch_mult="1,2,2,2", num_res_blocks=2, attn_res="16", dropout=0.0, bf16=True, channels_last=True,
                ddpm_steps=1000000, ddpm_seconds=180.0, ddpm_batch=256, ddpm_lr=8e-4, ddpm_warmup=200,
                log_every=100, sample_every=1000000, ddpm_ckpt_every=1000, sample_batch=1000,
                shortcut_steps=1000000, shortcut_seconds=40.0, shortcut_batch=256, shortcut_lr=2e-4, shortcut_ema=0.995,
                shortcut_ckpt_every=500,
                classifier_width=32, evaluator_width=32, classifier_steps=1500, evaluator_steps=1500, judge_steps=1000,
                cls_batch=512, cls_lr=0.4, cls_ckpt_every=500,
                ft_steps=80, ft_batch=32, lora_rank=8, lora_alpha=8.0, n_eval=2000, fid_n=10000, ft_ckpt_every=40),
    # The DDPM of Ho et al. 2020 for CIFAR-10 (35.7M parameters), in bf16, sized from measured step rates
    # (benchmarks/gpu.py on an H200; docs/results.md): predicted at 69 min, not measured end to end.
    # It keeps the plain eps-prediction and the stop-grad target it was measured with.
    "gpu_long": dict(ch=128, ch_mult="1,2,2,2", num_res_blocks=2, attn_res="16", dropout=0.1, bf16=True, eps_skip=False,
                cd_target_ema=0.0,
                ddpm_steps=12000, ddpm_batch=128, ddpm_lr=2e-4, ddpm_warmup=1000, ddpm_ema=0.9995,
                log_every=100, sample_every=3000, ddpm_ckpt_every=2000, sample_batch=500,
                shortcut_steps=2000, shortcut_batch=128, shortcut_lr=1e-4, shortcut_ema=0.999,
                shortcut_ckpt_every=500,
                classifier_width=64, evaluator_width=64, classifier_steps=2500, evaluator_steps=2500,
                cls_batch=512, cls_lr=0.4, cls_ckpt_every=500,
                ft_steps=300, ft_batch=32, lora_rank=16, lora_alpha=16.0, n_eval=2000, ft_ckpt_every=100),
}

# The 10-minute start (README): the shipped classroom checkpoints (--pretrained) instead of the first three
# stages, 60 steps of batch 8 (the CPU run's fine-tuning before the frontier set it to 30: on the classroom
# base these 60 end in stripes, the README's first lesson on reward hacking), and a smaller before/after
# evaluation: 128 DDIM-50 samples, 32 per network call (on a CPU, 256 per call costs twice as much per image).
# Measured: 5.0 min on 2 free CPU cores, evaluation included (checkpoints/README.md). Any key still overrides it.
PRESETS["quick"] = dict(pretrained=True, n_eval=128, sample_batch=32, ft_steps=60)
PRESET_NAMES = ("auto", *PRESETS)

SAMPLE_DEFAULTS = dict(  # keys of `python train_toy.py sample`
    ckpt="",  # a checkpoint of the ddpm, shortcut or shortft stage (e.g. out/ddpm/ckpt.pt), or a ddpm or shortcut .safetensors (e.g. checkpoints/ddpm.safetensors)
    n=64,  # how many images
    sampler="ddim",  # ddim | ddpm | shortcut (a shortcut checkpoint: k + 1 network calls)
    steps=50,  # DDIM steps
    eta=0.0,  # DDIM stochasticity (Song et al. 2021, Eq. 16)
    out="samples.npz",  # uint8 (N, 32, 32, 3) under 'images', and a PNG grid next to it
    seed=0,
    device="auto",
    batch=256,  # images per network call
    clip_x0=True,  # clip the predicted x_0 to [-1, 1] (ddpm.py)
)

EVAL_DEFAULTS = dict(  # keys of `python train_toy.py eval` (sftlib/metrics.py)
    samples="",  # a .npz written by `python train_toy.py sample`
    target="",  # a CIFAR-10 class: adds the target-class rate and mean log p(target)
    reward="",  # a rewards.py spec: adds the samples' mean reward
    out_dir="out",  # where the evaluator and reward classifier checkpoints are
    device="auto",
    fid=False,  # also Inception FID and KID against the CIFAR-10 test split, shown first (sftlib/fid.py; ~0.4 s/image on a CPU)
    fid_stats="",  # the test split's Inception statistics (.npz); empty: checkpoints/fid_cifar10_test.npz, else computed once
    fid_ref_n=10000,  # real test images behind the FID statistics when checkpoints/fid_cifar10_test.npz is absent
    n_boot=200,  # bootstrap resamples of the samples behind the 95 % intervals (0: none)
)


# --- range checks: a value outside its range is a one-line error before anything is read or written ---
AT_LEAST_1 = ("ddpm_steps", "ddpm_batch", "ddpm_warmup", "ddpm_ckpt_every", "log_every", "sample_every", "T", "ch",
              "num_res_blocks", "classifier_width", "classifier_steps", "evaluator_width", "evaluator_steps",
              "judge_width", "judge_steps",
              "cls_batch", "cls_ckpt_every", "shortcut_steps", "shortcut_batch", "shortcut_ckpt_every",
              "ft_steps", "ft_batch", "lora_rank", "ft_ckpt_every", "lv_n", "grid_ddpm", "grid_shortcut",
              "grid_ft", "sample_batch", "fid_ref_n")
AT_LEAST_0 = ("n_boot", "ddpm_min_snr", "n_train", "n_test", "seed", "cls_weight_decay", "alignprop_min", "fid_n",
              "ddpm_seconds", "shortcut_seconds")
POSITIVE = ("ddpm_lr", "cls_lr", "shortcut_lr", "ft_lr", "ddpm_grad_clip", "shortcut_grad_clip", "ft_grad_clip",
            "lora_alpha", "ft_reward_scale", "beta_1")  # a clip <= 0 zeroes or reverses the gradient
IN_0_1 = ("ddpm_ema", "shortcut_ema", "cd_target_ema", "teacher_chain_frac")  # probabilities and EMA rates
BELOW_1 = ("dropout", "cls_label_smoothing")  # in [0, 1)
CHOICES = dict(device=("auto", "cuda", "mps", "cpu"), ddpm_lr_schedule=("constant", "cosine"),
               ft_clip_grad=("hard", "straight_through"), cd_loss=("huber", "l2"), teacher_solver=("ddim", "heun"),
               method=METHODS)
MAX_SEED = 2**32 - 1  # numpy's seeds
# upper bounds of the sizes and counts: far above any useful value, below what would fail as an allocation
BOUNDS = {**{k: 1 << 16 for k in ("ddpm_batch", "shortcut_batch", "cls_batch", "ft_batch", "sample_batch")},
          **{k: 10**8 for k in ("ddpm_steps", "shortcut_steps", "classifier_steps", "evaluator_steps", "judge_steps",
                                "ft_steps", "log_every", "sample_every", "ddpm_warmup", "ddpm_ckpt_every",
                                "shortcut_ckpt_every", "cls_ckpt_every", "ft_ckpt_every")},
          **{k: 1024 for k in ("classifier_width", "evaluator_width", "judge_width", "lora_rank", "grid_ddpm",
                               "grid_shortcut", "grid_ft", "lv_n")},
          "n_eval": 100000, "fid_n": 100000, "fid_ref_n": 100000, "n_boot": 100000, "n_train": 50000, "n_test": 10000}


def check(cfg):
    """Every key of `cfg` that has a range, checked; the first one outside it is a UserError naming it."""
    def need(ok, key, what):
        if key in cfg and not ok(cfg[key]):
            raise UserError(f"--{key} must be {what}, got {cfg[key]!r}")

    for key in AT_LEAST_1:
        need(lambda v: v >= 1, key, "at least 1")
    for key in AT_LEAST_0:
        need(lambda v: v >= 0, key, "at least 0")
    for key in POSITIVE:
        need(lambda v: v > 0 and v != float("inf"), key, "a positive finite number")
    for key in IN_0_1:
        need(lambda v: 0 <= v <= 1, key, "in [0, 1]")
    for key in BELOW_1:
        need(lambda v: 0 <= v < 1, key, "in [0, 1)")
    for key, allowed in CHOICES.items():
        need(lambda v: v in allowed, key, "one of " + ", ".join(allowed))
    need(lambda v: v <= MAX_SEED, "seed", f"at most {MAX_SEED}")
    need(lambda v: v < 1, "beta_T", "below 1")
    need(lambda v: v > cfg.get("beta_1", 0), "beta_T", "above --beta_1")
    need(lambda v: v >= 50, "T", "at least 50 (the DDIM-50 chain)")
    need(lambda v: v in (0,) or v >= 10, "n_train", "0 (all) or at least 10 (one image per class)")
    need(lambda v: v in (0,) or v >= 10, "n_test", "0 (all) or at least 10 (one image per class)")
    need(lambda v: v >= 2, "n_eval", "at least 2 (a Fréchet distance needs a covariance)")
    need(lambda v: _ints(v) is not None and 1 <= len(_ints(v)) <= 6 and min(_ints(v)) >= 1, "ch_mult",
         "a comma list of 1 to 6 positive integers (32 px halves at most 5 times)")
    need(lambda v: _ints(v, empty=True) is not None, "attn_res", "a comma list of resolutions (integers)")
    need(lambda v: bool(str(v).strip()), "out_dir", "a folder (empty would write the stages into the working directory)")
    for key, most in (("T", 10000), ("ch", 512), ("num_res_blocks", 8), ("ddpm_seconds", 7 * 86400),
                      ("shortcut_seconds", 7 * 86400), *BOUNDS.items()):  # bounded: no allocation traceback, no endless run
        need(lambda v: v <= most, key, f"at most {most}")
    mult = _ints(cfg.get("ch_mult", "1"))
    if mult is not None and "attn_res" in cfg and _ints(cfg["attn_res"], empty=True) is not None:
        sizes = [32 // 2**i for i in range(len(mult))]  # the UNet's resolutions, 32 px halving per level
        need(lambda v: set(_ints(v, empty=True)) <= set(sizes), "attn_res", f"resolutions of the UNet, among {sizes}")
    for key in ("k_segments", "draft_k", "drtune_k"):  # segments and steps of the DDIM-50 chain
        need(lambda v: 1 <= v <= N_CHAIN, key, f"in [1, {N_CHAIN}] (the DDIM-{N_CHAIN} chain)")
    need(lambda v: v <= N_CHAIN and v >= cfg.get("alignprop_min", 0), "alignprop_max",
         f"in [--alignprop_min, {N_CHAIN}] (AlignProp's window on the DDIM-{N_CHAIN} chain)")
    if "reward" in cfg:
        try:
            parse_reward_spec(cfg["reward"])  # a typo in --reward fails here, before any stage trains
        except ValueError as e:
            raise UserError(f"--reward: {e}") from None


def _ints(text, empty=False):
    """'1,2,4' -> [1, 2, 4]; None when it is not a comma list of integers."""
    parts = [p for p in str(text).split(",") if p.strip()] if empty else str(text).split(",")
    try:
        return [int(p) for p in parts]
    except ValueError:
        return None


def check_sample(opts):
    """`sample`'s keys: counts >= 1, a known sampler, and a sample count that fits in memory."""
    for key in ("n", "steps", "batch"):
        if opts[key] < 1:
            raise UserError(f"--{key} must be at least 1, got {opts[key]}")
    if not 0 <= opts["eta"] <= 1:
        raise UserError(f"--eta must be in [0, 1], got {opts['eta']}")
    if not 0 <= opts["seed"] <= MAX_SEED:
        raise UserError(f"--seed must be in [0, {MAX_SEED}], got {opts['seed']}")
    per_image = 3 * 32 * 32 * 4 * 2  # float32 while sampling, plus the uint8 copy and slack
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 2**34
    if opts["n"] * per_image > avail:
        raise UserError(f"--n={opts['n']} images need {opts['n'] * per_image / 2**30:.1f} GiB, more than the "
                        f"{avail / 2**30:.1f} GiB of memory free: sample fewer, in several files")


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


def _comments(paths):
    """key -> the comment beside `key=...,  # comment` in the given source files (the first one wins)."""
    found = {}
    for path in paths:
        if not os.path.isfile(path):  # e.g. python -c
            continue
        with open(path) as f:
            for line in f:
                m = re.match(r"\s*(\w+)=[^#]*#\s*(.*)$", line)
                if m:
                    found.setdefault(m.group(1), m.group(2).strip())
    return found


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and exits; here bad input is one UserError line
        m = re.match(r"argument --(\w+): expected one argument", message)
        raise UserError(f"--{m.group(1)} needs a value: --{m.group(1)}=..." if m else message)


def parser(defaults, prog=None, description=None, source=None):
    """An argparse parser with one --key per defaults entry: typed by its default, documented by the
    comment beside it in this file or in `source` (the caller's file), a bare --flag meaning true."""
    notes = _comments([p for p in (source, __file__) if p])
    p = _Parser(prog=prog, description=description, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, default in defaults.items():
        kind = type(default).__name__
        note = notes.get(key, "")
        p.add_argument(f"--{key}", metavar=kind.upper(), default=argparse.SUPPRESS,
                       type=lambda raw, k=key, d=default: _convert(k, raw, d),
                       nargs="?" if isinstance(default, bool) else None,
                       const=True if isinstance(default, bool) else None,
                       help=f"{note} ({kind}, default: {default!r})".strip().replace("%", "%%"))
    return p


def parse_overrides(args, defaults, prog=None, description=None, source=None):
    """['--key=value', '--key', 'value', '--flag', ...] -> {key: typed value}, only the keys given.
    Unknown key, bad type or missing value: UserError. --help prints every key and exits."""
    if source is None:  # the caller's file: its comments document its own defaults
        source = inspect.stack()[1].filename
    ns, unknown = parser(defaults, prog, description, source).parse_known_args(list(args))
    for arg in unknown:
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options look like --key=value")
        key = arg[2:].partition("=")[0]
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        raise UserError(f"unknown option --{key}{hint}")
    return vars(ns)


def resolve(args, cuda_available, description=None):
    """Defaults, then the preset, then the command line."""
    overrides = parse_overrides(args, DEFAULTS, description=description, source=__file__)
    cfg = dict(DEFAULTS)
    preset = overrides.get("preset", "auto")
    if preset == "auto":
        preset = "gpu" if cuda_available else "cpu"
    if preset not in PRESETS:
        raise UserError(f"--preset must be one of auto, {', '.join(PRESETS)}; got {preset!r}")
    cfg.update(PRESETS[preset])
    cfg.update(overrides)
    cfg["preset"] = preset
    if cfg["data_root"] == DEFAULTS["data_root"] and os.environ.get("SHORTFT_CIFAR"):
        cfg["data_root"] = os.environ["SHORTFT_CIFAR"]  # a local copy named by the environment
    check(cfg)
    cfg = Config(cfg)
    cfg.given = set(overrides) - {"preset"}
    return cfg


class Config(dict):
    """The resolved config, a plain dict that also knows which keys were typed on the command line
    (`given`): on --resume, those are the ones compared with the checkpoint's config (stage.py).
    A checkpoint stores dict(cfg): a plain dict, which torch.load(weights_only=True) reads back."""
    given = None  # None: not known (a config built in code), so every key counts as given

    def copy(self):
        c = Config(self)
        c.given = self.given
        return c
