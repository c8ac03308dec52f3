"""The Fréchet distance against independent computations, and the classifier stage + `eval` end to end
on a small real CIFAR-10 subset."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from sftlib.common import load_checkpoint, save_atomic
from conftest import run_cli
from sftlib.data import load_cifar10
from sftlib.metrics import frechet_distance, gaussian_stats, net_outputs

TINY_CLS = ["--stages=classifier", "--n_train=1000", "--n_test=500", "--classifier_width=8",
            "--evaluator_width=8", "--judge_width=4", "--classifier_steps=30", "--evaluator_steps=30",
            "--judge_steps=30", "--cls_batch=64",
            "--log_every=10", "--preset=cpu", "--device=cpu"]


def random_spd(rng, d):
    A = rng.normal(size=(d, d))
    return A @ A.T / d + 0.1 * np.eye(d)  # (d, d) symmetric positive definite


def test_fd_of_identical_sets_is_zero():
    f = np.random.default_rng(0).normal(size=(400, 32))
    mu, sigma = gaussian_stats(f)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fd_matches_closed_form_for_diagonal_covariances():
    """For diagonal covariances (sigma1 sigma2)^{1/2} is diagonal: d^2 = |mu1-mu2|^2 + sum (sqrt a - sqrt b)^2."""
    rng = np.random.default_rng(1)
    mu1, mu2, a, b = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fd_matches_scipy_on_random_gaussians():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    for d in (2, 10, 40):
        mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), random_spd(rng, d), random_spd(rng, d)
        covmean = linalg.sqrtm(s1 @ s2).real  # the usual FID code path
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    # rank-deficient covariances (fewer samples than dimensions) stay finite and non-negative
    f1, f2 = rng.normal(size=(20, 40)), rng.normal(size=(20, 40)) + 0.5
    d = frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    assert np.isfinite(d) and d > 0


@pytest.fixture(scope="module")
def tiny_cls(tmp_path_factory, cifar_root):
    """The classifier stage, tiny: width-8 nets (the judge width 4), 30 steps each on 1000 real training
    images, tested on 500 real test images. Returns its out_dir."""
    out = tmp_path_factory.mktemp("tiny_cls")
    p = run_cli(f"--out_dir={out}", f"--data_root={cifar_root}", *TINY_CLS, timeout=300)
    assert "real floor" in p.stdout
    return str(out)


def test_stage_writes_the_three_checkpoints_and_skips_when_complete(tiny_cls, cifar_root):
    c = load_checkpoint(os.path.join(tiny_cls, "classifier", "ckpt.pt"), "classifier")
    e = load_checkpoint(os.path.join(tiny_cls, "evaluator", "ckpt.pt"), "evaluator")
    j = load_checkpoint(os.path.join(tiny_cls, "judge", "ckpt.pt"), "judge")
    assert c["arch"] == {"name": "resnet9", "width": 8} and e["arch"] == {"name": "vgg", "width": 8}
    assert j["arch"] == {"name": "allconv", "width": 4}
    for ck in (c, e, j):
        assert ck["step"] == 30 and 0.0 <= ck["test_acc"] <= 1.0 and {"model", "opt", "rng", "config"} <= set(ck)
    for kind in ("evaluator", "judge"):
        assert os.path.isfile(os.path.join(tiny_cls, kind, "real_stats.npz"))
    p = run_cli(f"--out_dir={tiny_cls}", f"--data_root={cifar_root}", *TINY_CLS, timeout=300)
    assert p.stdout.count("skipping") == 3


def test_unfinished_checkpoint_needs_resume(tiny_cls, cifar_root, tmp_path):
    """A run killed mid-way (faked: a checkpoint at step 20 with no test accuracy) is refused
    without --resume, and finished with it."""
    out = tmp_path / "run"
    os.makedirs(out)
    for kind in ("classifier", "evaluator"):
        ck = load_checkpoint(os.path.join(tiny_cls, kind, "ckpt.pt"), kind)
        if kind == "classifier":
            ck.update(step=20, test_acc=None)
        save_atomic(ck, os.path.join(out, kind, "ckpt.pt"))
    shutil.copy(os.path.join(tiny_cls, "evaluator", "real_stats.npz"), out / "evaluator")  # not under test here
    args = [f"--out_dir={out}", f"--data_root={cifar_root}", *TINY_CLS]
    p = run_cli(*args, check=False, timeout=300)
    assert p.returncode == 2 and "--resume" in p.stderr and "Traceback" not in p.stderr
    p = run_cli(*args, "--resume", timeout=300)
    assert "resuming" in p.stdout and load_checkpoint(str(out / "classifier" / "ckpt.pt"), "classifier")["step"] == 30


def test_fd_grows_as_real_images_are_noised_and_blurred(tiny_cls, cifar_root, tmp_path):
    """Real test images against real training images in the tiny evaluator's features, with more and
    more corruption. The evaluator is barely trained, so this shows that the metric responds
    monotonically to a growing distribution shift, not that its features are good ones."""
    from torchvision.transforms.functional import gaussian_blur

    from sftlib.nets import load_classifier

    net = load_classifier(os.path.join(tiny_cls, "evaluator", "ckpt.pt"), "cpu", "evaluator")
    x_train, _ = load_cifar10(cifar_root, "train", 1000, str(tmp_path))  # (1000, 3, 32, 32)
    x_test, _ = load_cifar10(cifar_root, "test", 500, str(tmp_path))
    ref = gaussian_stats(net_outputs(net, x_train, "cpu")[0])
    g = torch.Generator().manual_seed(0)
    x = x_test.float() / 127.5 - 1  # (500, 3, 32, 32) in [-1, 1]

    def fd(images):  # images in [-1, 1] -> Fréchet distance to the training features
        u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return frechet_distance(*gaussian_stats(net_outputs(net, u8, "cpu")[0]), *ref)

    noised = [fd(x + s * torch.randn(x.shape, generator=g)) for s in (0.0, 0.1, 0.2, 0.4, 0.8)]
    blurred = [fd(x)] + [fd(gaussian_blur(x, 9, s)) for s in (0.6, 1.0, 1.6, 3.0)]
    assert all(a < b for a, b in zip(noised, noised[1:])), noised
    assert all(a < b for a, b in zip(blurred, blurred[1:])), blurred


def test_eval_command_prints_json(tiny_cls, cifar_root, tmp_path):
    x_test, _ = load_cifar10(cifar_root, "test", 500, str(tmp_path))
    real = x_test.permute(0, 2, 3, 1).numpy()[::2]  # (250, 32, 32, 3) uint8, real test images
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    collapsed = np.repeat(real[:1], len(real), axis=0)  # total mode collapse: one image, 250 copies
    results = {}
    for name, images in (("real", real), ("noise", noise), ("collapsed", collapsed)):
        np.savez(tmp_path / f"{name}.npz", images=images)
        p = run_cli("eval", f"--samples={tmp_path / name}.npz", f"--out_dir={tiny_cls}", "--target=ship",
                    "--reward=0.5*classifier:ship+brightness", "--device=cpu", timeout=120)
        assert "Fréchet" in p.stdout and "class histogram" in p.stdout
        results[name] = m = json.loads(p.stdout.strip().splitlines()[-1])
        assert m["n_samples"] == 250 and m["target"] == "ship" and m["fd_floor_n"] == 250
        assert sum(m["evaluator_class_hist"].values()) == pytest.approx(1.0)
        assert m["evaluator_mean_logp_target"] <= 0 and "classifier_mean_reward" in m and "reward_mean" in m
    assert results["real"]["fd"] < results["noise"]["fd"]
    # diversity = tr(Sigma) / tr(Sigma_test): half of the test split against the whole split's spread is
    # near 1; 250 copies of one image have no spread at all
    assert 0.7 < results["real"]["diversity"] < 1.3, results["real"]["diversity"]
    assert results["collapsed"]["diversity"] < 1e-6


def test_eval_fid_end_to_end(tiny_cls, cifar_root, tmp_path):
    """`eval --fid` on 16 real test images against a statistics file in the shipped format (a temporary
    copy of checkpoints/fid_cifar10_test.npz when there is one, else one made here): FID and KID come
    first in the table and the JSON, and the FID is fid.frechet_distance of features computed here and
    of the file's sigma rebuilt here from its upper triangle."""
    from sftlib import fid

    try:
        model = fid.load_inception("cpu")
    except fid.FIDError as e:
        (pytest.fail if os.environ.get("CI", "").lower() == "true" else pytest.skip)(str(e))
    images = fid.load_cifar10_uint8(cifar_root, "test", 16)  # (16, 32, 32, 3) uint8, every class
    feats = fid.inception_features(images, "cpu", 16, model, progress=False)  # (16, 2048)
    stats = tmp_path / "fid_cifar10_test.npz"
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", stats.name)
    if os.path.isfile(shipped):
        shutil.copy(shipped, stats)
    else:  # the same format: a Gaussian near the samples' own, their features as the KID reference
        mu, sigma = fid.gaussian_stats(feats)
        fid.save_compact_stats(stats, mu + 0.05, sigma + 0.01 * np.eye(len(mu)), 10000, feats)
    np.savez(tmp_path / "s.npz", images=images)
    p = run_cli("eval", f"--samples={tmp_path}/s.npz", f"--out_dir={tiny_cls}", "--fid", f"--fid_stats={stats}",
                "--device=cpu", timeout=600)
    m = json.loads(p.stdout.strip().splitlines()[-1])
    assert list(m)[:3] == ["fid", "kid", "kid_std"] and p.stdout.startswith("Inception FID")
    assert m["fid_n"] == 16 and m["fid_ref"] == str(stats) and "fd" in m and m["n_samples"] == 16
    with np.load(stats) as z:
        d = len(z["mu"])
        sigma = np.zeros((d, d))
        rows, cols = np.triu_indices(d)
        sigma[rows, cols] = sigma[cols, rows] = z["sigma_triu"]
        mu, kid_ref, n = z["mu"], z["kid_features"].astype(np.float64), int(z["n"])
    expected = fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu, sigma)
    assert m["fid"] == pytest.approx(expected, rel=1e-4) and m["fid"] > 0
    assert m["fid_ref_n"] == n and m["kid_ref_n"] == len(kid_ref)
    assert (m["kid"], m["kid_std"]) == pytest.approx(fid.kid_from_features(feats, kid_ref), rel=1e-3, abs=1e-6)
