"""The judge's scores of generated samples (sftlib/metrics.py adds them when <out_dir>/judge/ckpt.pt exists).

The judge is a third CIFAR-10 classifier (sftlib/nets.py's AllConv: GroupNorm, strided convolutions)
that never serves as a reward or for tuning, trained on other images (the second half of every class;
train_classifier.py). The reward classifier is a ResNet-9 and the evaluator a VGG, both BatchNorm nets
trained on the same images: a sample that fools them by a pattern their family shares is less likely to
fool the judge too, so the comparison reads its quality and target-rate axis here.

judge_scores() returns a flat dict, every key prefixed judge_:
- judge_fd: the Fréchet distance (Heusel et al. 2017's formula, sftlib/fid.py) between Gaussians fitted
  to the judge's penultimate features of the samples and of the real test split. Plain, not class-matched:
  a shift of the class mix counts. A judge-feature distance, *not comparable to published FID*;
- judge_fd_floor: the same distance for as many real training images (ones the judge never trained on)
  as there are samples: what real images score at that N (the distance is biased upwards at small N);
- judge_diversity: tr(Sigma_samples) / tr(Sigma_test), ~1 for real images, -> 0 under mode collapse;
- judge_class_entropy: the entropy (nats) of the judge's class histogram of the samples (uniform: ln 10);
- with a target class: judge_target_rate (the fraction the judge calls the target), judge_n_target (how
  many), and when at least 2 are: judge_fd_target (those samples against the real test images of the
  class), its floor judge_fd_target_floor (as many real training images of the class) and
  judge_diversity_target (their spread against the real class's).

The real images' features are computed once and cached in <out_dir>/judge/real_stats.npz.
"""
import os

import numpy as np
import torch

from rewards import class_index
from sftlib.common import UserError, load_checkpoint
from sftlib.data import CLASSES, load_cifar10
from sftlib.fid import fid_from_features as _fd, frechet_distance, gaussian_stats, spread
from sftlib.nets import load_classifier, net_outputs, real_feature_stats
from sftlib.readers import check_samples

N_FLOOR = 10000  # real training images behind the floors (the test split has 10k too)


def judge_path(out_dir):
    return os.path.join(out_dir, "judge", "ckpt.pt")


def has_judge(out_dir):
    """Whether <out_dir> holds a judge: folders from before it existed are scored without one."""
    return os.path.isfile(judge_path(out_dir))


def _judge(out_dir, device):
    path = judge_path(out_dir)
    if not os.path.isfile(path):
        raise UserError(f"no judge at {path}: train it with python train_toy.py --stages=classifier "
                        f"--out_dir={out_dir} (complete classifier and evaluator stages are kept)")
    return load_classifier(path, device, "judge"), load_checkpoint(path, "judge")["config"]


def real_stats(out_dir, device):
    """The real images' judge features, computed once: the test split's (and their mean and covariance),
    and those of up to N_FLOOR training images from the first half of every class (which the judge never
    saw), in a fixed random order so that the first n of them make a floor at any sample count n."""
    path = os.path.join(out_dir, "judge", "real_stats.npz")
    if os.path.isfile(path):
        from sftlib.readers import checked_stats  # the same arrays as the evaluator's

        return checked_stats(path)
    net, cfg = _judge(out_dir, device)
    cache = os.path.join(out_dir, "cache")
    x_test, y_test = load_cifar10(cfg["data_root"], "test", cfg["n_test"], cache)  # (N_test, 3, 32, 32) uint8
    n = min(N_FLOOR, cfg["n_train"]) if cfg["n_train"] > 0 else N_FLOOR
    x_train, y_train = load_cifar10(cfg["data_root"], "train", n, cache, half=0)  # (n, 3, 32, 32), class by class
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))  # every class, in random order
    return real_feature_stats(net, device, x_test, y_test, x_train[order], np.asarray(y_train)[order.numpy()], path)


def judge_scores(images, out_dir, device, target=None):
    """The judge's scores of uint8 samples (N, 32, 32, 3), N >= 2 -> a flat dict of judge_* keys (module
    docstring); target: a CIFAR-10 class name or index, or None."""
    check_samples(images)
    target = None if target in (None, "") else class_index(target)
    device = torch.device(device)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    net, _ = _judge(out_dir, device)
    stats = real_stats(out_dir, device)
    feats, logp = net_outputs(net, x, device)  # (N, D), (N, 10)
    pred = logp.argmax(1)  # (N,) the judge's classes
    n_floor = min(len(x), len(stats["feats_train"]))
    hist = np.bincount(pred, minlength=len(CLASSES)) / len(x)  # (10,)
    m = {"judge_fd": frechet_distance(*gaussian_stats(feats), stats["mu_test"], stats["sigma_test"]),
         "judge_fd_floor": frechet_distance(*gaussian_stats(stats["feats_train"][:n_floor]), stats["mu_test"],
                                            stats["sigma_test"]),
         "judge_diversity": spread(feats) / float(np.trace(stats["sigma_test"])),
         "judge_class_entropy": float(-(hist[hist > 0] * np.log(hist[hist > 0])).sum())}
    if target is not None:
        sel = feats[pred == target]  # (n_target, D): the samples the judge calls the target
        m["judge_target_rate"], m["judge_n_target"] = float(hist[target]), int(len(sel))
        if len(sel) >= 2:
            real = stats["feats_test"][stats["labels_test"] == target]  # the class's real test images
            train_t = stats["feats_train"][stats["labels_train"] == target][:len(sel)]  # already in random order
            m["judge_fd_target"] = _fd(sel, real)
            m["judge_fd_target_floor"] = _fd(train_t, real) if len(train_t) >= 2 else float("nan")
            m["judge_diversity_target"] = spread(sel) / spread(real)
    return m
