"""What the checks share: loading the module under test, and tiny random models that run in seconds.

The module under test comes from $SHORTFT_EXERCISE_DIR (default: this folder, i.e. your starter):

    python -m pytest exercises/check_ex1_ddim.py                                        # your answer
    SHORTFT_EXERCISE_DIR=exercises/solutions python -m pytest exercises/check_ex1_ddim.py  # the reference
"""
import contextlib
import functools
import importlib
import importlib.util
import inspect
import os
import sys

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the project's own modules (ddpm, consistency, shortft, ...) are the reference

import ddpm  # noqa: E402
import tlora  # noqa: E402
from unet import UNet  # noqa: E402


class LibraryDisabled(AssertionError):
    """Raised when an answer calls the project function the exercise asks the student to write."""


def _stub(dotted, name):
    def disabled(*args, **kwargs):
        raise LibraryDisabled(f"{dotted} is disabled while your {name}.py runs: the exercise asks you to "
                              f"write it yourself (read it in the project, then close the file)")
    return disabled


def _project_modules():
    """The imported modules whose file lies in this repository (not in a virtual environment inside it)."""
    return [m for m in list(sys.modules.values())
            if getattr(m, "__file__", None) and os.path.abspath(m.__file__).startswith(ROOT + os.sep)
            and "site-packages" not in m.__file__]


_HOLDERS = {}  # (names, number of modules imported) -> [(module, attr, original)]: found once, not per call


def _holders(names):
    key = (tuple(names), len(sys.modules))
    if key not in _HOLDERS:
        found = []
        for dotted in names:
            mod_name, attr = dotted.rsplit(".", 1)
            original = getattr(importlib.import_module(mod_name), attr)
            found += [(m, attr, original) for m in _project_modules() if getattr(m, attr, None) is original]
        _HOLDERS[key] = found
    return _HOLDERS[key]


_DEPTH = [0]  # nesting of disabled(): only the outermost entry stubs and only the outermost exit restores


@contextlib.contextmanager
def disabled(names, exercise):
    """While inside: each "module.function" of `names` is replaced by a stub that fails, in its module
    and in every project module that imported it by name. Nested entries (the student's function calling
    another of its own) keep the stubs in place until the outermost one exits."""
    if _DEPTH[0] > 0:
        _DEPTH[0] += 1
        try:
            yield
        finally:
            _DEPTH[0] -= 1
        return
    _DEPTH[0] = 1
    saved = _holders(names)
    n_modules = len(sys.modules)
    for mod, attr, original in saved:
        setattr(mod, attr, _stub(f"{original.__module__}.{original.__name__}", exercise))
    try:
        yield
    finally:
        _DEPTH[0] = 0
        for mod, attr, original in reversed(saved):
            setattr(mod, attr, original)
        if len(sys.modules) != n_modules:  # a project module first imported inside took a stub by name: give it back
            for dotted in names:
                mod_name, attr = dotted.rsplit(".", 1)
                original = getattr(importlib.import_module(mod_name), attr)
                for mod in _project_modules():
                    if getattr(getattr(mod, attr, None), "__name__", "") == "disabled":
                        setattr(mod, attr, original)


def _guarded(f, names, exercise):
    @functools.wraps(f)
    def call(*args, **kwargs):
        with disabled(names, exercise):
            return f(*args, **kwargs)
    return call


def load(name, disable=()):
    """Import exercises/<name>.py, or <$SHORTFT_EXERCISE_DIR>/<name>.py, as a fresh module.
    disable: the project functions ("module.function") the exercise asks the student to write. They are
    disabled while the module is imported and whenever one of its functions or methods runs, so an
    answer that simply calls the project's own solution fails its check; the check itself still uses them
    as the reference."""
    folder = os.path.abspath(os.environ.get("SHORTFT_EXERCISE_DIR", HERE))
    path = os.path.join(folder, name + ".py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: SHORTFT_EXERCISE_DIR={folder} has no {name}.py")
    spec = importlib.util.spec_from_file_location(f"exercise_{name}", path)
    module = importlib.util.module_from_spec(spec)
    with disabled(disable, name):
        spec.loader.exec_module(module)
    if disable:
        for attr, obj in list(vars(module).items()):
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                setattr(module, attr, _guarded(obj, disable, name))
            elif inspect.isclass(obj) and obj.__module__ == module.__name__:
                for meth, f in list(vars(obj).items()):
                    if inspect.isfunction(f):
                        setattr(obj, meth, _guarded(f, disable, name))
    return module


def schedule64():
    """The project's linear schedule (T = 1000), in float64 so that checks can compare to 1e-10."""
    sched = ddpm.Schedule()
    sched.beta = torch.linspace(1e-4, 0.02, sched.T, dtype=torch.float64)  # (T,) as in ddpm.Schedule,
    sched.alpha = 1.0 - sched.beta  # (T,) but kept in float64 instead of rounded to float32
    sched.alpha_bar = torch.cumprod(sched.alpha, 0)  # (T,)
    return sched


def tiny_unet(seed, img_size=8):
    """The project's UNet, shrunk to 42k parameters (ch 8, two levels, no attention), float64, eval mode.
    Checks feed it 8x8 images: a network call costs a few milliseconds on a laptop CPU."""
    torch.manual_seed(seed)
    return UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(), dropout=0.0, img_size=img_size).double().eval()


def tiny_lora_unet(seed, k):
    """tiny_unet with k stacked LoRAs (tlora.py) on every layer, each with random non-zero weights
    (B starts at zero in tlora.py, which would make every LoRA's gradient path trivially dead)."""
    unet = tiny_unet(seed)
    tlora.add_lora(unet, rank=2, alpha=2.0, k=k)
    unet.double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in tlora.lora_layers(unet):
            for B in m.B:
                B.weight.copy_(0.05 * torch.randn(B.weight.shape, generator=g, dtype=B.weight.dtype))
    return unet


class TinyEps(nn.Module):
    """A stand-in eps-network eps(x_t, t): one 3x3 conv plus a timestep-dependent bias, squashed."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 3, 3, padding=1).double()
        self.temb = nn.Linear(1, 3).double()

    def forward(self, x, t):
        bias = self.temb(t.double()[:, None] / 1000)[:, :, None, None]  # (B, 3, 1, 1)
        return torch.tanh(self.conv(x) + bias)  # (B, 3, H, W)


def true_eps(sched, x0):
    """The oracle eps-network for one fixed x_0: eps*(x_t, t) = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t),
    i.e. Ho et al. 2020 Eq. 4 solved for eps. Its DDIM trajectory passes exactly through q(x_s | x_0)."""
    def eps(x_t, t):
        abar_t = sched.abar(t).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()  # (B, C, H, W)
    return eps
