"""Small shared helpers: errors for users and the entry points' guard, device choice, atomic checkpoints
and safetensors exports, EMA, image grids and line plots."""
import contextlib
import json
import os
import random
import sys

import numpy as np
import torch


class UserError(Exception):
    """A problem with the user's input: every entry point prints it as one line and exits with code 2."""


def run_main(main):
    """The guard of every entry point: main(sys.argv[1:]); a UserError is one line on stderr and exit
    code 2, never a traceback; Ctrl-C keeps the last checkpoint and says how to go on."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; rerun with --resume to continue", file=sys.stderr)
        sys.exit(130)


def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device must be auto, cuda, mps or cpu; got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but CUDA is not available here")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device=mps but MPS is not available here")
    return torch.device(name)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every generator's state, in types that torch.load(weights_only=True) reads back (no numpy arrays)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss,
                                                       gauss), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a run killed mid-write never leaves a torn file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX and Windows


def load_checkpoint(path, kind):
    """Load a checkpoint written by this project and check it is of the expected kind (or kinds)."""
    if not path:
        raise UserError("no checkpoint given: pass --ckpt=PATH (e.g. out/ddpm/ckpt.pt)")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
    except Exception as e:  # pickle/zip errors: the file is truncated or not a checkpoint
        raise UserError(f"could not read checkpoint {path} ({type(e).__name__}): is it corrupt?") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if ckpt["kind"] not in kinds:
        raise UserError(f"{path} is a {ckpt['kind']!r} checkpoint, expected {' or '.join(map(repr, kinds))}")
    return ckpt


def export_safetensors(state_dict, cfg, path, **meta):
    """Weights meant for sharing, as .safetensors (no pickle: safe to load from anyone) with the run's
    config (and any other strings in meta) as JSON in the file's metadata."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={"config": json.dumps(cfg), **{k: json.dumps(v) for k, v in meta.items()}})
    os.replace(tmp, path)


def read_safetensors(path):
    """(state_dict, metadata with its JSON values decoded) of a file written by export_safetensors."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


@torch.no_grad()  # the EMA is bookkeeping, not part of any graph
def ema_update(ema, model, decay):
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def to_uint8(x):
    """Images in [-1, 1] (B, C, H, W) -> uint8 numpy (B, H, W, C)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x, path, nrow=8):
    """Save images in [-1, 1] (B, C, H, W) as one PNG grid."""
    from torchvision.utils import save_image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_image((x.detach().float().cpu().clamp(-1, 1) + 1) / 2, path, nrow=nrow, padding=2)


def bf16_autocast(cfg, device):
    """bf16 autocast when --bf16 is set on CUDA, else a no-op context."""
    if cfg["bf16"] and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def open_log(out, header, fresh):
    """<out>/log.csv: started anew (with its header) for a fresh run or when missing, else appended to.
    Returns (file, whether it was started anew)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "log.csv")
    fresh = fresh or not os.path.exists(path)
    log = open(path, "w" if fresh else "a")
    if fresh:
        log.write(header + "\n")
    return log, fresh


def plot_lines(series, path, xlabel, ylabel, smooth=20):
    """A PNG of named lines {label: (x, y)} and their running means (a window of len / smooth points)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, y) in series.items():
        x, y = np.asarray(x, float), np.asarray(y, float)
        w = max(1, len(y) // smooth)
        line, = ax.plot(x, y, alpha=0.25)
        ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, "valid"), color=line.get_color(), label=f"{label} (mean of {w})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
