"""Validate the Inception FID/KID of sftlib/fid.py on real data: FID and KID between n CIFAR-10
training images and n test images (both evenly over the classes), plus the extractor's cost per image.

    python benchmarks/fid_validate.py --data_root=../shared/data/cifar10 --n=10000 --device=cuda
    python benchmarks/fid_validate.py --data_root=../shared/data/cifar10 --n=500 --time_n=64 --threads=2

Published train-vs-test figures to compare with (TF Inception): FID ~3.1 for 50k train vs 10k test;
FID is biased in 1/n, so smaller n gives larger values (~30 at n = 2000). KID is unbiased: ~0 at any n.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sftlib import fid  # noqa: E402
from sftlib.common import run_main  # noqa: E402


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_root", default=os.environ.get("SHORTFT_CIFAR", "data/cifar10"))
    p.add_argument("--n", type=int, default=10000, help="test images (and training images unless --n_train)")
    p.add_argument("--n_train", type=int, default=0, help="training images; 0: the same as --n")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=0, help="0: 250 on cuda, 50 on cpu")
    p.add_argument("--cache_dir", default="out/fid_cache")
    p.add_argument("--time_n", type=int, default=64, help="images for the per-image timing; 0: no timing")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    p.add_argument("--kid_subsets", type=int, default=100)
    p.add_argument("--kid_subset_size", type=int, default=1000, help="capped at n // 2, so that subsets differ")
    a = p.parse_args()
    if a.n < 2 or a.n_train < 0 or a.time_n < 0 or a.batch < 0 or a.kid_subsets < 1 or a.kid_subset_size < 2:
        sys.exit("error: --n must be at least 2, --kid_subsets at least 1, --kid_subset_size at least 2, and "
                 "--n_train, --time_n, --batch at least 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    batch = a.batch or (250 if torch.device(a.device).type == "cuda" else 50)
    n_train = a.n_train or a.n
    try:
        t = time.time()
        model = fid.load_inception(a.device)
        print(f"weights: {fid.weights_path()} (sha1 ok), loaded in {time.time() - t:.1f}s on {a.device}, "
              f"torch threads {torch.get_num_threads()}")

        if a.time_n:
            x = fid.load_cifar10_uint8(a.data_root, "test", a.time_n)
            fid.inception_features(x[: min(batch, 8)], a.device, batch, model, progress=False)  # warm-up
            sync(a.device)
            t = time.time()
            fid.inception_features(x, a.device, batch, model, progress=False)
            sync(a.device)
            per = (time.time() - t) / len(x)
            print(f"extractor: {per * 1000:.1f} ms/image over {len(x)} images (batch {min(batch, len(x))})")

        t = time.time()
        tr = fid.reference_stats("train", a.data_root, a.cache_dir, n_train, a.device, batch)
        te = fid.reference_stats("test", a.data_root, a.cache_dir, a.n, a.device, batch)
        print(f"statistics of {n_train} train + {a.n} test images: {time.time() - t:.1f}s (cache: {a.cache_dir})")
        t = time.time()
        d = fid.frechet_distance(tr["mu"], tr["sigma"], te["mu"], te["sigma"])
        m = min(a.kid_subset_size, n_train // 2, a.n // 2)
        kid, kid_std = fid.kid_from_features(tr["features"], te["features"], a.kid_subsets, m)
        print(f"FID(train {n_train}, test {a.n}) = {d:.3f}")
        print(f"KID(train {n_train}, test {a.n}) = {kid:.6f} +- {kid_std:.6f} "
              f"(std over {a.kid_subsets} subsets of {m}; metrics {time.time() - t:.1f}s)")
    except fid.FIDError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run_main(lambda argv: main())  # Ctrl-C and unreadable files: one line, no traceback
