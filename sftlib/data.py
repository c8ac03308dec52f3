"""CIFAR-10 as tensors on the device.

Two sources: a local folder in ImageFolder layout (`<root>/train/<class>/*.jpg`, `<root>/test/...`),
or torchvision's download into `<root>` (the default `data`, or any empty or new folder) for users with
internet. Offline, --data_root (or $SHORTFT_CIFAR) names a local copy, and the error says so. The decoded split is cached as a
.npz under the run's out_dir, so the JPEGs are decoded once. The whole split then sits on the
device as uint8 (150 MB for the 50k training images) and batches, flips included, are cut there:
no DataLoader, no worker processes, never the bottleneck.
"""
import hashlib
import os

import numpy as np
import torch

from rewards import CLASSES  # CIFAR-10's class names, defined once beside the class reward
from sftlib.common import UserError, atomic_path
from sftlib.readers import read_image, read_npz



def _part(m, n, half):
    """Positions kept of a class's m images (in file order): the first or second half (half = 0 or 1;
    None: all), then the first n // 10 of those (n > 0)."""
    start, stop = (0, m) if half is None else (0, m // 2) if half == 0 else (m // 2, m)
    return range(start, min(stop, start + n // 10) if n > 0 else stop)


def _from_folder(split_dir, n, half=None):
    """Decode an ImageFolder split; with n > 0, the first n // 10 images of every class (of its half)."""
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if tuple(classes) != CLASSES:
        raise UserError(f"{split_dir} should hold the 10 CIFAR-10 class folders, found {len(classes)}: "
                        f"pass --data_root=PATH to a folder with train/<class>/*.jpg and test/<class>/*.jpg")
    images, labels = [], []
    for y, c in enumerate(classes):
        files = sorted(os.listdir(os.path.join(split_dir, c)))
        files = [files[i] for i in _part(len(files), n, half)]
        for f in files:
            images.append(read_image(os.path.join(split_dir, c, f), 32))  # a bad file or a bomb: one line
        labels += [y] * len(files)
    if not images:
        raise UserError(f"no images under {split_dir}: pass --data_root=PATH to a CIFAR-10 folder")
    return np.stack(images), np.array(labels)


def _from_torchvision(root, train, n, half=None):
    import torchvision

    try:
        ds = torchvision.datasets.CIFAR10(root, train=train, download=True)
    except Exception as e:  # offline, or the download was refused
        raise UserError(f"could not download CIFAR-10 into {root!r} ({type(e).__name__}); offline? pass "
                        f"--data_root=PATH (or set SHORTFT_CIFAR=PATH) to a local copy with train/<class>/*.jpg") from None
    x, y = ds.data, np.array(ds.targets)  # (N, 32, 32, 3) uint8, (N,)
    if n > 0 or half is not None:  # the first n // 10 of each class (of its half), as for a folder
        idx = [np.flatnonzero(y == c) for c in range(10)]
        keep = np.concatenate([i[list(_part(len(i), n, half))] for i in idx])
        x, y = x[keep], y[keep]
    return x, y


def load_cifar10(root, split="train", n=0, cache_dir=None, half=None):
    """Returns (x, y): uint8 (N, 3, 32, 32) images and int64 (N,) labels, on the CPU. half = 0 or 1: only
    the first or the second half of every class (in file order; the judge trains on the second), of
    which n > 0 keeps the first n // 10 per class."""
    if split not in ("train", "test") or half not in (None, 0, 1):
        raise ValueError((split, half))
    cache = None
    if cache_dir:
        part = "" if half is None else f"_half{half}"  # the whole split keeps its old cache name
        tag = hashlib.sha1(f"{os.path.abspath(root)}|{split}|{n}{part}".encode()).hexdigest()[:10]
        cache = os.path.join(cache_dir, f"cifar10_{split}_{n}{part}_{tag}.npz")
        if os.path.isfile(cache):  # torn or wrong: one line, delete it to decode the images again
            f = read_npz(cache, {"x": ("u", (None, 32, 32, 3)), "y": ("iu", (None,))}, "data cache",
                         "delete it to decode the images again")
            if len(f["x"]) != len(f["y"]) or len(f["y"]) == 0 or f["y"].min() < 0 or f["y"].max() >= len(CLASSES):
                raise UserError(f"{cache}: {len(f['x'])} images but {len(f['y'])} labels, or labels outside "
                                f"[0, {len(CLASSES)}): delete it to decode the images again")
            return torch.from_numpy(f["x"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(f["y"]).long()
    split_dir = os.path.join(root, split)
    if os.path.isdir(split_dir):
        x, y = _from_folder(split_dir, n, half)
    elif not os.path.isdir(root) and os.path.isdir(os.path.dirname(os.path.abspath(root))) or \
            os.path.isdir(root) and (not os.listdir(root) or os.path.isdir(os.path.join(root, "cifar-10-batches-py"))):
        x, y = _from_torchvision(root, split == "train", n, half)  # a new or empty folder, or an earlier download
    else:
        raise UserError(f"no CIFAR-10 at --data_root={root!r}: expected {split_dir}/<class>/*.jpg, or a new or "
                        f"empty folder to download it into (leave --data_root unset to download into ./data)")
    if cache:
        with atomic_path(cache) as tmp:  # a per-process name: concurrent first runs must not share it
            np.savez(tmp, x=x, y=y)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y).long()


class DeviceBatches:
    """Random batches with horizontal flips, cut from a uint8 tensor that lives on the device."""

    def __init__(self, x_uint8, y, device, flip=True):
        self.x = x_uint8.to(device)  # (N, 3, 32, 32) uint8
        self.y = y.to(device)  # (N,)
        self.flip = flip

    def __len__(self):
        return self.x.shape[0]

    def sample(self, batch_size):
        """Returns images in [-1, 1] (B, 3, 32, 32) float32 and labels (B,)."""
        idx = torch.randint(0, len(self), (batch_size,), device=self.x.device)  # (B,)
        x = self.x[idx].float() / 127.5 - 1  # (B, 3, 32, 32) in [-1, 1]
        if self.flip:
            mask = torch.rand(batch_size, 1, 1, 1, device=x.device) < 0.5  # (B, 1, 1, 1)
            x = torch.where(mask, x.flip(3), x)
        return x, self.y[idx]
