"""Small shared helpers: errors for users and the entry points' guard, device choice, atomic checkpoints
and safetensors exports, EMA, image grids and line plots."""
import contextlib
import errno
import glob
import json
import os
import pickle
import random
import sys

import numpy as np
import torch

from sftlib.errors import UserError  # noqa: F401 (re-exported: every entry point imports it from here)


def run_main(main):
    """The guard of every entry point: main(sys.argv[1:]); a UserError (or ValueError), an unreadable or unwritable file
    (disk full, no permission) and Ctrl-C are each one line on stderr and a non-zero exit code, never a
    traceback; the last checkpoint is kept."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:
        if not raised_by_a_concept(e):  # a bug somewhere else: its traceback is what helps
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the file system said no: bad file, disk full, read-only, no permission
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; rerun with --resume to continue", file=sys.stderr)
        sys.exit(130)


def raised_by_a_concept(e):
    """Whether the exception was raised in one of the project's root files (ddpm.py, shortft.py, ...): the
    concept files raise ValueError for arguments outside their equations' domain, a user's input."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return tb is not None and os.path.dirname(os.path.abspath(tb.tb_frame.f_code.co_filename)) == root


def os_error_line(e, path=None):
    """One line for an OSError: what failed, on which file, and what to do about it."""
    where = path or getattr(e, "filename", None) or "a file"
    if e.errno == errno.ENOSPC:
        return f"disk full while writing {where}: free some space (earlier files are kept intact)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write or read {where} ({e.strerror})"
    return f"{e.strerror or type(e).__name__}: {where}"


def pick_device(name="auto"):
    """The torch.device that --device names (auto: cuda -> mps -> cpu), with CUDA's fast paths on (fast_device)."""
    if name == "auto":
        if torch.cuda.is_available():
            return fast_device(torch.device("cuda"))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device must be auto, cuda, mps or cpu; got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but CUDA is not available here")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device=mps but MPS is not available here")
    return fast_device(torch.device(name))


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


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary name next to `path` to write to; on success it is renamed to `path` (a run
    killed mid-write never leaves a torn file), on any failure it is removed. A full disk (ENOSPC, or
    torch.save's RuntimeError for it) becomes one UserError line; the earlier `path` stays as it was."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"  # per process: two writers never share it; ext: np.savez keeps it
    try:
        yield tmp
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(os_error_line(e, path)) from None
        if isinstance(e, RuntimeError) and _low_space(path):  # torch.save's writer hides ENOSPC in a RuntimeError
            raise UserError(os_error_line(OSError(errno.ENOSPC, "no space"), path)) from None
        raise


def _low_space(path, margin=1 << 20):
    import shutil

    return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < margin


def remove_stale_temps(folder):
    """Temporary files left by a run killed mid-write (atomic_path cleans up after every other failure)."""
    for tmp in glob.glob(os.path.join(glob.escape(folder), "*.tmp[0-9]*")):
        with contextlib.suppress(OSError):
            os.remove(tmp)


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a run killed mid-write never leaves a torn file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_text(path, text):
    """A text file (a CSV, a JSON), written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


# what each kind of checkpoint must hold to be loaded as a model (resuming checks more: stage.py)
CKPT_KEYS = {"ddpm": ("config", "ema", "model"), "shortcut": ("config", "ema", "model", "edges"),
             "classifier": ("config", "model", "arch"), "evaluator": ("config", "model", "arch"),
             "judge": ("config", "model", "arch"),
             "shortft": ("config", "unet", "base", "base_sha256", "edges")}


def file_sha256(path):
    """The SHA-256 of a file's bytes: names a checkpoint unambiguously, wherever it lies."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def torch_load_trusted(path):
    """torch.load with weights_only=True: tensors and plain containers only, so a pickled object (which
    could run code while loading) is refused with one line, not executed."""
    import zipfile

    if not zipfile.is_zipfile(path):  # what torch.save writes; anything else is torn or another format
        raise UserError(f"could not read checkpoint {path} (not a torch.save archive): is it corrupt?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise UserError(f"{path} is not a trusted checkpoint: it holds pickled objects beyond tensors and "
                            f"plain containers, which could run code; refused") from None
        raise UserError(f"could not read checkpoint {path} (UnpicklingError): is it corrupt?") from None
    except Exception as e:  # zip errors, truncation, EOF: the file is torn or not a checkpoint
        raise UserError(f"could not read checkpoint {path} ({type(e).__name__}): is it corrupt?") from None


def load_checkpoint(path, kind, keys=None):
    """Load a checkpoint written by this project (weights_only: no code runs) and check it is of the
    expected kind (or kinds) and holds `keys` (default: what its kind needs to be loaded, CKPT_KEYS)."""
    if not path:
        raise UserError("no checkpoint given: pass --ckpt=PATH (e.g. out/ddpm/ckpt.pt)")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    ckpt = torch_load_trusted(path)
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(ckpt["kind"], str) or ckpt["kind"] not in kinds:
        raise UserError(f"{path} is a {ckpt['kind']!r} checkpoint, expected {' or '.join(map(repr, kinds))}")
    missing = [k for k in (CKPT_KEYS.get(ckpt["kind"], ()) if keys is None else keys) if k not in ckpt]
    if missing or not isinstance(ckpt.get("config", {}), dict):
        raise UserError(f"{path} is incomplete: it lacks {', '.join(missing) or 'a config'}")
    from sftlib.readers import check_checkpoint  # its fields' types and ranges, and finite weights

    return check_checkpoint(ckpt, path)


def export_safetensors(state_dict, cfg, path, **meta):
    """Weights meant for sharing, as .safetensors (no pickle: safe to load from anyone) with the run's
    config (and any other strings in meta) as JSON in the file's metadata."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"config": json.dumps(cfg), **{k: json.dumps(v) for k, v in meta.items()}})


def read_safetensors(path):
    """(state_dict, metadata with its JSON values decoded) of a file written by export_safetensors, checked
    (sftlib/readers.py): a torn file or wrong metadata is one UserError line."""
    from sftlib.readers import read_safetensors as read

    return read(path)


@torch.no_grad()  # the EMA is bookkeeping, not part of any graph
def ema_update(ema, model, decay):
    """ema <- decay ema + (1 - decay) model, every parameter at once (one multi-tensor kernel on a GPU, not one per
    parameter); buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
    buffers = list(ema.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(model.buffers()))


def adam(params, lr):
    """torch.optim.Adam with its fused kernel (one kernel for every parameter, its step counter on the device)
    where the parameters' device has one (CUDA, CPU), else the multi-tensor one."""
    params = list(params)
    kinds = {p.device.type for p in params}
    fused = bool(params) and kinds <= {"cuda", "cpu"} and all(p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None, foreach=None if fused else True)


def load_optimizer(opt, state):
    """opt.load_state_dict(state) for an optimizer built by `adam` here and now: the implementation stays the one
    `adam` chose for this device (a state saved elsewhere carries its own fused flag), Adam's moments take their
    weights' memory layout (a run saved in channels_last may resume in NCHW: the fused kernel needs them alike) and
    its step counters go where that implementation keeps them (on the device when fused, else on the host)."""
    fused, foreach = opt.defaults.get("fused"), opt.defaults.get("foreach")
    opt.load_state_dict(state)
    for group in opt.param_groups:
        group["fused"], group["foreach"] = fused, foreach
    for p, st in opt.state.items():
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                st[k] = torch.empty_like(p).copy_(st[k])  # empty_like: p's device, dtype and memory layout
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].to(device=p.device if fused else "cpu", dtype=torch.float32)


def memory_format(cfg, device):
    """The UNet's weight layout: channels_last (NHWC, what cuDNN's fastest bf16 convolutions take) with
    --channels_last on CUDA, else as built. A convolution follows its weight's layout, so the activations
    become NHWC after the first one."""
    return torch.channels_last if cfg.get("channels_last") and device.type == "cuda" else torch.preserve_format


def fast_device(device):
    """CUDA's fast paths for this project's fixed-shape loops: cuDNN picks the fastest convolution per shape once,
    and float32 matrix products may use TF32 (bf16 autocast, --bf16, goes further)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def to_uint8(x):
    """Images in [-1, 1] (B, C, H, W) -> uint8 numpy (B, H, W, C)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x, path, nrow=8):
    """Save images in [-1, 1] (B, C, H, W) as one PNG grid."""
    from torchvision.utils import save_image

    with atomic_path(path) as tmp:
        save_image((x.detach().float().cpu().clamp(-1, 1) + 1) / 2, tmp, nrow=nrow, padding=2, format="png")


def bf16_autocast(cfg, device):
    """bf16 autocast when --bf16 is set on CUDA, else a no-op context."""
    if cfg["bf16"] and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def open_log(out, header, fresh, keep_upto=None):
    """<out>/log.csv: started anew (with its header) for a fresh run or when missing, else appended to,
    after dropping the rows past step keep_upto (written after the checkpoint a resumed run goes on
    from). Returns (file, whether it was started anew)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "log.csv")
    fresh = fresh or not os.path.exists(path)
    if not fresh and keep_upto is not None:
        from sftlib.readers import read_text

        rows = read_text(path, "log").splitlines()  # not UTF-8 or binary: one line
        keep = [r for r in rows[1:] if r.split(",")[0].isdigit() and int(r.split(",")[0]) <= keep_upto]
        write_text(path, "\n".join(rows[:1] + keep) + "\n")
    log = open(path, "w" if fresh else "a")
    if fresh:
        log.write(header + "\n")
    return log, fresh


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported here: only the plots need it)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=100):
    """Lay out, write `fig` to `path` as a PNG atomically, and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)


def plot_lines(series, path, xlabel, ylabel, smooth=20):
    """A PNG of named lines {label: (x, y)} and their running means (a window of len / smooth points)."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for label, (x, y) in series.items():
        x, y = np.asarray(x, float), np.asarray(y, float)
        w = max(1, len(y) // smooth)
        line, = ax.plot(x, y, alpha=0.25)
        ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, "valid"), color=line.get_color(), label=f"{label} (mean of {w})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    save_figure(fig, path)
