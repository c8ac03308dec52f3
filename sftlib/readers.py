"""One reader per kind of file this project reads back: .npz, JSON, CSV, text, .safetensors, checkpoint
metadata and images. Each checks what it read against a small schema (required keys, types, shapes,
dtypes, ranges) and turns any fault, torn, foreign or well-formed but wrong, into one UserError line
naming the file and what is wrong with it: a damaged artefact is never a traceback, and never silently used.

A schema is a dict {key: spec}; a spec is a type or tuple of types (NUMBER: an int or float, never a bool;
finite), a nested schema dict, or for arrays a tuple (dtype kinds, shape) with None for any length, e.g.
("u", (None, 32, 32, 3)) for uint8-like images."""
import json
import math
import os

import numpy as np

from sftlib.errors import UserError

NUMBER = "number"  # an int or a float (not a bool), finite
ARCH_NAMES = ("resnet9", "vgg", "allconv")  # sftlib/nets.py's ARCHS (not imported: nets reads checkpoints through here)
MAX_PIXELS = 4096 * 4096  # an image in the data folder larger than this is refused before it is decoded


def _exists(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")


def _type_ok(value, spec):
    if spec == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(spec, tuple):
        return any(_type_ok(value, s) for s in spec)
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, spec)


def _name(spec):
    if isinstance(spec, tuple):
        return " or ".join(_name(s) for s in spec)
    return spec if isinstance(spec, str) else "an object" if isinstance(spec, dict) else spec.__name__


def check_schema(obj, schema, path, where=""):
    """Every key of `schema` present in the dict `obj` with its type (nested dicts checked too); else one line."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: {where or 'its content'} should be an object, got {type(obj).__name__}")
    for key, spec in schema.items():
        if key not in obj:
            raise UserError(f"{path} lacks {where + '.' if where else ''}{key}: is it corrupt or from another program?")
        if isinstance(spec, dict):
            check_schema(obj[key], spec, path, f"{where}.{key}" if where else key)
        elif not _type_ok(obj[key], spec):
            raise UserError(f"{path}: {where + '.' if where else ''}{key} should be {_name(spec)}, got {obj[key]!r:.60}")
    return obj


# ---- .npz ----------------------------------------------------------------------------------------------

def read_npz(path, schema, what="file", fix=""):
    """{name: array} of the arrays `schema` names ({name: (dtype kinds, shape)}), read without pickle (an
    object array is refused), each checked for its dtype kind ('u', 'i', 'f', 'b'), its shape and, when
    floating, finite values. fix: what to do about a bad file, appended to the line."""
    _exists(path, what)
    hint = f": {fix}" if fix else ""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("an .npy, not an .npz archive")
            missing = [k for k in schema if k not in z.files]
            if missing:
                raise UserError(f"{path} lacks the array {missing[0]!r} (it has {', '.join(z.files) or 'nothing'})"
                                f"{hint}")
            arrays = {k: z[k] for k in schema}
    except UserError:
        raise
    except Exception as e:  # torn (BadZipFile, EOFError, zlib.error), pickled (ValueError), not an archive
        raise UserError(f"could not read {path} as .npz ({type(e).__name__}): is it corrupt?{hint}") from None
    for k, (kinds, shape) in schema.items():
        a = arrays[k]
        if a.dtype.kind not in kinds:
            raise UserError(f"{path}: array {k!r} has dtype {a.dtype}, expected kind {' or '.join(kinds)}{hint}")
        if shape is not None and (a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape))):
            want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
            raise UserError(f"{path}: array {k!r} has shape {a.shape}, expected {want}{hint}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise UserError(f"{path}: array {k!r} holds NaN or infinite values{hint}")
    return arrays


def npz_names(path):
    """The array names of an .npz archive, or None when it cannot be read as one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return tuple(z.files)
    except Exception:  # read_npz says what is wrong, when it is read
        return None


# ---- JSON, CSV, text -------------------------------------------------------------------------------------

def read_text(path, what="text file"):
    """The UTF-8 text of a file, or one line: missing, unreadable, not UTF-8, or binary (a NUL byte)."""
    _exists(path, what)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): is it corrupt?") from None
    if "\x00" in text:
        raise UserError(f"{path} holds binary data (a NUL byte), not text: is it corrupt?")
    return text


def read_json(path, schema=None, what="JSON file"):
    """The JSON object in `path`, checked against `schema`, or one line (torn, not UTF-8, wrong keys or types)."""
    text = read_text(path, what)
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): is it torn?") from None
    return check_schema(obj, schema or {}, path) if schema is not None else obj


def read_csv(path, header=None, what="CSV file"):
    """(column names, rows of floats) of a numeric CSV with a header line; header: the columns expected.
    A row with another number of fields or a cell that is not a number is one line naming it."""
    lines = read_text(path, what).splitlines()
    if not lines:
        raise UserError(f"{path} is empty: it should start with a header line")
    names = lines[0].split(",")
    if header is not None and names != list(header):
        raise UserError(f"{path}: header {lines[0]!r:.80}, expected {','.join(header)!r}: is it corrupt?")
    rows = []
    for i, line in enumerate(lines[1:], 2):
        cells = line.split(",")
        try:
            if len(cells) != len(names):
                raise ValueError
            rows.append([float(c) for c in cells])
        except ValueError:
            raise UserError(f"{path}: line {i} is not {len(names)} numbers ({line!r:.60}): is it torn?") from None
    return names, rows


# ---- .safetensors and checkpoints ----------------------------------------------------------------------

SAFETENSORS_META = {"kind": str, "config": dict}
SAFETENSORS_KIND_META = {"shortcut": {"edges": list}, "lora": {"edges": list}}


def read_safetensors(path, kinds=None):
    """(state dict, metadata with its JSON values decoded) of a .safetensors this project wrote, checked:
    readable, metadata JSON with a kind (one of `kinds`) and a config, every floating tensor finite."""
    from safetensors import safe_open

    _exists(path, "checkpoint")
    try:
        with safe_open(path, "pt") as f:
            raw = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a torn header, a foreign or truncated file
        raise UserError(f"could not read {path} ({type(e).__name__}): is it corrupt?") from None
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            raise UserError(f"{path}: its metadata {k!r} is not JSON: not a file this project wrote") from None
    if kinds is not None and meta.get("kind") not in kinds:
        raise UserError(f"{path} holds a {meta.get('kind')!r}, not a {' or '.join(map(repr, kinds))}")
    check_schema(meta, {**SAFETENSORS_META, **SAFETENSORS_KIND_META.get(meta.get("kind"), {})}, path, "metadata")
    check_config(meta["config"], meta["kind"], path)
    if "edges" in meta:
        check_edges(meta["edges"], meta["config"].get("T", 1000), path)
    check_finite_state(state, path)
    return state, meta


UNET_CONFIG = ("T", "beta_1", "beta_T", "ch", "ch_mult", "num_res_blocks", "attn_res", "dropout")
CONFIG_NEEDS = {"ddpm": UNET_CONFIG, "shortcut": UNET_CONFIG,
                "shortft": UNET_CONFIG + ("method", "lora_rank", "lora_alpha", "lora_targets", "tlora", "full_ft"),
                "evaluator": ("data_root", "n_train", "n_test"), "judge": ("data_root", "n_train", "n_test")}
# what else a checkpoint's fields must be, by name, where present
CKPT_FIELDS = {"step": int, "elapsed": NUMBER, "done": bool, "base": str, "base_sha256": str, "test_acc": (NUMBER, type(None)),
               "arch": dict, "edges": list, "model": dict, "ema": dict, "unet": dict, "target": dict, "train_s": NUMBER,
               "history": list, "before": dict}
WEIGHTS = ("model", "ema", "unet", "target")


def check_config(cfg, kind, path):
    """A stored config: a dict holding the keys its kind needs, each key of config.DEFAULTS of its default's
    type (an int where a float is expected is fine) and within config.check's ranges. A Stable Diffusion
    checkpoint (kind sd_*) has its own keys (train_sd.py), some of the same name: only its being a dict is checked."""
    from sftlib import config

    if not isinstance(cfg, dict):
        raise UserError(f"{path}: its config should be an object, got {type(cfg).__name__}")
    if str(kind).startswith("sd"):
        return
    missing = [k for k in CONFIG_NEEDS.get(kind, ()) if k not in cfg]
    if missing:
        raise UserError(f"{path}: its config lacks {', '.join(missing)}: is it corrupt?")
    for k, v in cfg.items():
        if k not in config.DEFAULTS:
            continue
        want = type(config.DEFAULTS[k])
        ok = _type_ok(v, NUMBER) if want is float else _type_ok(v, want)
        if not ok:
            raise UserError(f"{path}: its config has {k}={v!r:.60}, expected a {want.__name__}")
    try:
        config.check({k: v for k, v in cfg.items() if k in config.DEFAULTS})
    except UserError as e:
        raise UserError(f"{path}: its config is out of range: {str(e).lstrip('-')}") from None


def check_edges(edges, T, path):
    """Shortcut edges: a non-empty list of ints, strictly decreasing, in [0, T)."""
    ok = (isinstance(edges, list) and edges and all(_type_ok(e, int) for e in edges)
          and all(0 <= e < T for e in edges) and all(a > b for a, b in zip(edges, edges[1:])))
    if not ok:
        raise UserError(f"{path}: its edges {edges!r:.60} are not decreasing timesteps in [0, {T})")


def floating_tensors(obj, name=""):
    """[(name, tensor)] of every floating tensor in obj (nested dicts, lists, tuples)."""
    import torch

    if torch.is_tensor(obj):
        return [(name, obj)] if obj.is_floating_point() else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [nt for k, v in items for nt in floating_tensors(v, f"{name}.{k}" if name else str(k))]


def first_nonfinite(obj):
    """The name of the first floating tensor in obj (nested dicts, lists, tuples) with a NaN or an inf. One
    device-to-host read for all of them (per device), not one per tensor."""
    import torch

    by_device = {}
    for name, t in floating_tensors(obj):
        by_device.setdefault(t.device, []).append((name, t))
    for named in by_device.values():
        ok = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
        bad = [name for (name, _), good in zip(named, ok) if not good]
        if bad:
            return bad[0]
    return None


def check_finite_state(state, path):
    """Every floating tensor of a state dict finite: NaN weights would sample black images, silently."""
    import torch

    for k, v in state.items():
        if not torch.is_tensor(v):
            raise UserError(f"{path}: its weights hold {k!r} of type {type(v).__name__}, not a tensor")
    bad = first_nonfinite(state)
    if bad is not None:
        raise UserError(f"{path}: its weight {bad} holds NaN or infinite values: refused (retrain, or use an "
                        f"earlier checkpoint)")


def check_checkpoint(ckpt, path):
    """The fields of a loaded checkpoint (common.load_checkpoint), where present: types (CKPT_FIELDS), the
    config (check_config), edges in range, the classifier's architecture, and finite weights."""
    for k, spec in CKPT_FIELDS.items():
        if k in ckpt and not _type_ok(ckpt[k], spec):
            raise UserError(f"{path}: its {k} should be {_name(spec)}, got {type(ckpt[k]).__name__}")
    if "step" in ckpt and ckpt["step"] < 0:
        raise UserError(f"{path}: its step is {ckpt['step']}, below 0")
    if "test_acc" in ckpt and ckpt["test_acc"] is not None and not 0 <= ckpt["test_acc"] <= 1:
        raise UserError(f"{path}: its test_acc {ckpt['test_acc']} is not in [0, 1]")
    check_config(ckpt["config"], ckpt["kind"], path)
    if "edges" in ckpt:
        check_edges(ckpt["edges"], ckpt["config"].get("T", 1000), path)
    if "arch" in ckpt:
        arch = ckpt["arch"]
        if arch.get("name") not in ARCH_NAMES or not _type_ok(arch.get("width"), int) or not 1 <= arch["width"] <= 1024:
            raise UserError(f"{path}: its arch {arch!r:.60} is not one of {', '.join(ARCH_NAMES)} with a width in [1, 1024]")
    for k in WEIGHTS:
        if k in ckpt:
            check_finite_state(ckpt[k], f"{path} ({k})")
    return ckpt


# ---- images ------------------------------------------------------------------------------------------------

def check_samples(images):
    """Samples must be uint8 (N, 32, 32, 3) with N >= 2 (what `train_toy.py sample` writes)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise UserError(f"samples must be a uint8 array, got {getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.shape[0] < 2:
        raise UserError(f"samples must have shape (N, 32, 32, 3) with N >= 2, got {images.shape}")


def read_image(path, size=None):
    """An image file as uint8 RGB (H, W, 3) (resized to size x size when given), or one line: not an image,
    truncated, or larger than MAX_PIXELS (a decompression bomb is refused before it is decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise UserError(f"{path} is a {w}x{h} image, larger than {MAX_PIXELS} pixels (a decompression bomb?): "
                                f"remove it or pass --data_root=PATH to a clean copy")
            im = im.convert("RGB")
            return np.asarray(im.resize((size, size)) if size else im)
    except UserError:
        raise
    except Exception as e:  # PIL's errors for a truncated or non-image file, and its DecompressionBombError
        raise UserError(f"could not decode {path} ({type(e).__name__}): remove it or pass --data_root=PATH to a "
                        f"clean copy") from None


# ---- the held-out networks' real-image statistics (sftlib/metrics.py and sftlib/judge.py write them) --------

REAL_STATS = dict(mu_test=("f", (None,)), sigma_test=("f", (None, None)), feats_train=("f", (None, None)),
                  feats_test=("f", (None, None)), labels_test=("iu", (None,)), labels_train=("iu", (None,)),
                  n_test=("iu", ()), n_train=("iu", ()), fd_floor=("f", ()))


def checked_stats(path, n_classes=10):
    """A real_stats.npz (REAL_STATS), its arrays consistent with one another, or one line naming the file."""
    st = read_npz(path, REAL_STATS, "real-feature statistics", "delete it to compute them again")
    d = len(st["mu_test"])
    if (st["sigma_test"].shape != (d, d) or st["feats_train"].shape[1] != d or st["feats_test"].shape[1] != d
            or len(st["labels_test"]) != len(st["feats_test"]) or len(st["labels_train"]) != len(st["feats_train"])
            or len(st["feats_test"]) < 2 or len(st["feats_train"]) < 2
            or max(st["labels_test"].max(), st["labels_train"].max()) >= n_classes):
        raise UserError(f"{path}: its arrays do not fit together (feature sizes, label counts or classes): "
                        f"delete it to compute them again")
    return st
