"""What the experiment exercises (6 to 11) share: the classroom checkpoints (checkpoints/), loaded into
memory without touching out/, and the few measurements every experiment needs. Not an exercise: read it,
do not edit it.

    lab = load()                         # base DDPM, its shortcut, the reward classifier, the held-out judge
    ft = finetunable(lab)                # the base with T-LoRA, as the ShortFT stage builds it
    x0 = sample(ft_or_base, lab, x_T)    # DDIM-50, no graph

The experiments run on a 2-core CPU in half a minute to four minutes each (timed in exercises/README.md).
"""
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import ddpm  # noqa: E402
from rewards import ClassifierReward, class_index  # noqa: E402
from tlora import add_lora  # noqa: E402
from sftlib import config, pretrained  # noqa: E402
from sftlib.nets import build_net  # noqa: E402
from shortft import FineTuned, segment_groups  # noqa: E402
from unet import build_unet  # noqa: E402

OUT = os.environ.get("SHORTFT_LAB_OUT", os.path.join(ROOT, "out", "lab"))  # pictures and caches of the experiments
TARGET = class_index("ship")  # the reward of every experiment: the classifier's log p(ship | x_0)


def _unet(stage):
    state, meta = pretrained.read(stage)
    net = build_unet(meta["config"])
    net.load_state_dict(state)
    return net.eval().requires_grad_(False), meta


def _classifier(stage):
    state, meta = pretrained.read(stage)
    net = build_net(meta["arch"])
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def load(seed=0):
    """The classroom models, frozen, on the CPU (fp16 weights read as float32):
    base, shortcut (the distilled student), sched, steps (DDIM-50: 981 .. 1), edges (761, 501, 261, 1),
    groups (the 4 segments), reward (x_0 -> log p(ship), the classifier), judge (the held-out evaluator)."""
    torch.manual_seed(seed)
    base, meta = _unet("ddpm")
    shortcut, smeta = _unet("shortcut")
    cfg = meta["config"]
    sched = ddpm.Schedule(cfg["T"], cfg["beta_1"], cfg["beta_T"], "cpu", cfg.get("clip_x0", True))
    steps = ddpm.ddim_timesteps(sched.T, ddpm.N_CHAIN)
    edges = list(smeta["edges"])
    return SimpleNamespace(base=base, shortcut=shortcut, sched=sched, steps=steps, edges=edges,
                           groups=segment_groups(steps, edges), cfg=cfg,
                           reward=ClassifierReward(_classifier("classifier"), TARGET), judge=_classifier("evaluator"))


def finetunable(lab, seed=0, rank=None, tlora=True):
    """A copy of the base with LoRA (rank and alpha from config.DEFAULTS, as train_shortft.py builds it),
    one LoRA per segment stacked (T-LoRA) or a single one. LoRA's B starts at zero, so the copy draws what
    the base draws until it is trained."""
    torch.manual_seed(seed)
    unet = build_unet(lab.cfg)
    unet.load_state_dict(lab.base.state_dict())
    unet.requires_grad_(False)
    rank = rank or config.DEFAULTS["lora_rank"]
    add_lora(unet, rank, config.DEFAULTS["lora_alpha"] * rank / config.DEFAULTS["lora_rank"],
             len(lab.groups) if tlora else 1, config.DEFAULTS["lora_targets"])
    return FineTuned(unet.eval(), lab.groups, tlora=tlora)


def lora_parameters(ft):
    return [p for p in ft.unet.parameters() if p.requires_grad]


def noise(n, seed):
    """n fixed Gaussian noises x_T (n, 3, 32, 32)."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()  # sampling only
def sample(model, lab, x_T, batch=32):
    """x_0 of the DDIM-50 chain (eta = 0) from each noise, in [-1, 1]."""
    return torch.cat([ddpm.ddim_sample(model, lab.sched, x_T[i:i + batch], lab.steps)
                      for i in range(0, len(x_T), batch)])


@torch.no_grad()
def judge(lab, x0):
    """The held-out evaluator on images in [-1, 1]: (features (N, D) numpy, predicted classes (N,) numpy)."""
    f = lab.judge.features(x0.float())
    return f.numpy(), lab.judge.head(f).argmax(1).numpy()


def real_features(data_root=None, n_per_class=200, cache=None):
    """The judge's features of n_per_class real CIFAR-10 test images per class, and their labels,
    cached under out/lab/ ($SHORTFT_LAB_OUT). data_root: as train_toy.py's --data_root (default: $SHORTFT_CIFAR,
    else data/)."""
    from sftlib.data import load_cifar10

    cache = cache or OUT
    path = os.path.join(cache, f"real_features_{n_per_class}.npz")
    if os.path.isfile(path):
        with np.load(path) as f:
            return f["feats"], f["labels"]
    root = data_root or os.environ.get("SHORTFT_CIFAR") or config.DEFAULTS["data_root"]
    x, y = load_cifar10(root, "test", n_per_class * 10, cache)  # (N, 3, 32, 32) uint8, evenly over classes
    lab_judge = _classifier("evaluator")
    with torch.no_grad():
        feats = torch.cat([lab_judge.features(x[i:i + 500].float() / 127.5 - 1) for i in range(0, len(x), 500)])
    os.makedirs(cache, exist_ok=True)
    np.savez(path, feats=feats.numpy(), labels=y.numpy())
    return feats.numpy(), y.numpy()


def two_level(n_seeds, n_noises, n_boot=2000, seed=0):
    """The index pairs of a two-level bootstrap over training seeds and evaluation noises: n_boot pairs
    (seeds (n_seeds,), noises (n_noises,)), each drawn with replacement. One draw of noises serves every seed,
    as every seed's model is measured on the same noises (a paired resampling). The spread it gives covers both
    another training run and other noises."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield rng.integers(0, n_seeds, n_seeds), rng.integers(0, n_noises, n_noises)


def bootstrap(values, n_boot=2000, seed=0):
    """(mean, [2.5 %, 97.5 %] percentile bootstrap interval) of per-noise values (N,), or of per-seed,
    per-noise values (S, N): then a two-level bootstrap (two_level), seeds and noises both resampled."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 2:
        means = np.array([v[s][:, i].mean() for s, i in two_level(*v.shape, n_boot, seed)])
    else:
        means = v[np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))].mean(1)
    return float(v.mean()), [float(x) for x in np.percentile(means, [2.5, 97.5])]


def mean_ci(values, digits=3, sign=False):
    """ "mean [2.5 %, 97.5 %]" of per-noise values (N,) or per-seed, per-noise values (S, N), the interval a
    percentile bootstrap over them (bootstrap): the form every experiment prints its numbers in."""
    m, (lo, hi) = bootstrap(values)
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(m)} [{f.format(lo)}, {f.format(hi)}]"


def flat(grads, params):
    """One vector of a gradient list (None, for a parameter the reward does not reach: zeros)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def cos(a, b):
    """cos(a, b) of two tensors, flattened (0 if either is zero)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-30))


class Clock:
    """Seconds since it was made, for the experiments' own timing lines."""

    def __init__(self):
        self.t0 = time.time()

    def __str__(self):
        return f"{time.time() - self.t0:.0f} s"


def quick_flag(argv=None):
    """The command line of an experiment: nothing, or --quick (fewer noises and steps); --help says so; anything
    else is a one-line error and exit code 2, not silently ignored."""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print("usage: python -m exercises.exN_... [--quick]   (--quick: fewer noises and steps, to try your code)")
        sys.exit(0)
    unknown = [a for a in args if a != "--quick"]
    if unknown:
        print(f"error: unknown option {unknown[0]!r}: an experiment takes only --quick", file=sys.stderr)
        sys.exit(2)
    return "--quick" in args


def run(experiment):
    """`python -m exercises.exN_...` [--quick]: the experiment, with a one-line error (not a traceback) for
    what the user can fix, such as a missing CIFAR-10 folder or checkpoint, or an unknown option."""
    from sftlib.common import UserError, raised_by_a_concept

    quick = quick_flag()
    try:
        experiment(quick=quick)
    except (UserError, ValueError) as e:  # ValueError: a concept function's argument outside its domain
        if not isinstance(e, UserError) and not raised_by_a_concept(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def show_prediction(prediction):
    """Every experiment asks for a written prediction before it runs."""
    if not prediction:
        print("You have not written a PREDICTION at the top of the file: write one before you look at the table.")
    else:
        print(f"Your prediction: {prediction}")
