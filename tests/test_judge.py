"""The judge (sftlib/judge.py, sftlib/nets.py's AllConv): the shipped one's accuracy on real test images,
its scores against independent computations, its training half, and evaluate_samples adding judge_* keys
exactly when a run folder holds a judge. Real CIFAR-10 from $SHORTFT_CIFAR (conftest's cifar_root)."""
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

from sftlib import config, judge, metrics, pretrained
from sftlib.common import save_atomic
from sftlib.data import load_cifar10
from sftlib.nets import build_net
from train_classifier import NETS, accuracy

N_TEST = 500  # the real test images behind the scores here: the first 50 of every class
SHIP = 8  # CIFAR-10's class index of "ship"


def shipped_net(kind):
    state, meta = pretrained.read(kind)
    net = build_net(meta["arch"])
    net.load_state_dict(state)
    return net.eval(), meta


def test_shipped_judge_is_another_family_and_its_accuracy_is_pinned(cifar_root, tmp_path):
    """On 2,000 real test images (the first 200 of every class) the shipped fp16 judge scores within 0.02
    of the test accuracy its metadata records (measured on all 10k in fp32), and above a floor."""
    net, meta = shipped_net("judge")
    assert meta["kind"] == "judge" and meta["arch"]["name"] == "allconv" and meta["step"] == meta["config"]["judge_steps"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())  # outside BatchNorm's family
    assert any(isinstance(m, nn.GroupNorm) for m in net.modules())
    for other in ("classifier", "evaluator"):
        assert pretrained.read(other)[1]["arch"]["name"] != meta["arch"]["name"]
    x, y = load_cifar10(cifar_root, "test", 2000, str(tmp_path))
    acc = accuracy(net, x, y, "cpu")
    assert abs(acc - meta["test_acc"]) <= 0.02, (acc, meta["test_acc"])
    assert acc >= 0.65, acc


def test_the_judge_trains_on_the_second_half_of_every_class(tmp_path):
    """data.load_cifar10(half=1) keeps files m/2..m-1 of every class folder (half=0 the others), and n
    then counts within that half; the judge's entry in train_classifier.NETS asks for half 1."""
    from PIL import Image

    from sftlib.data import CLASSES

    for c, name in enumerate(CLASSES):
        os.makedirs(tmp_path / "train" / name)
        for i in range(4):  # pixel value = 10 * class + file index: which file each image came from
            Image.fromarray(np.full((32, 32, 3), 10 * c + i, np.uint8)).save(tmp_path / "train" / name / f"{i:04d}.png")
    first = {int(v) for v in load_cifar10(str(tmp_path), "train", 0, half=0)[0][:, 0, 0, 0]}
    second, y = load_cifar10(str(tmp_path), "train", 0, half=1)
    assert first == {10 * c + i for c in range(10) for i in (0, 1)}
    assert {int(v) for v in second[:, 0, 0, 0]} == {10 * c + i for c in range(10) for i in (2, 3)}
    assert sorted(y.tolist()) == sorted(list(range(10)) * 2)
    assert {int(v) for v in load_cifar10(str(tmp_path), "train", 10, half=1)[0][:, 0, 0, 0]} == {10 * c + 2 for c in range(10)}
    assert {int(v) for v in load_cifar10(str(tmp_path), "train", 10)[0][:, 0, 0, 0]} == {10 * c for c in range(10)}
    assert NETS["judge"][-1] == 1 and NETS["classifier"][-1] is None and NETS["evaluator"][-1] is None
    assert len({NETS[k][3] for k in NETS}) == 3  # three seeds


def install(out, kind, cifar_root):
    """The shipped `kind` as a complete <out>/<kind>/ckpt.pt whose run reads N_TEST test and 1000 train images."""
    state, meta = pretrained.read(kind)
    cfg = dict(config.DEFAULTS, out_dir=str(out), data_root=cifar_root, n_test=N_TEST, n_train=1000)
    save_atomic(dict(kind=kind, config=cfg, model=state, arch=meta["arch"], test_acc=meta["test_acc"],
                     step=meta["step"], elapsed=0.0), os.path.join(out, kind, "ckpt.pt"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cifar_root):
    """A run folder with the shipped evaluator and judge (no reward classifier: not needed here)."""
    out = tmp_path_factory.mktemp("judge_run")
    for kind in ("evaluator", "judge"):
        install(out, kind, cifar_root)
    return str(out)


def frechet_scipy(f1, f2):
    """The Fréchet distance of two feature sets by the usual FID code path (scipy's sqrtm)."""
    linalg = pytest.importorskip("scipy.linalg")
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


@torch.no_grad()
def direct(net, images_nhwc):
    """Features and predicted classes of uint8 (N, 32, 32, 3) images, computed here in one batch."""
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 32, 32) in [-1, 1]
    f = net.features(x)  # (N, D)
    return f.numpy().astype(np.float64), net.head(f).argmax(1).numpy()


def test_judge_scores_match_independent_computations(run_dir, cifar_root, tmp_path):
    net, _ = shipped_net("judge")
    x_test, y_test = load_cifar10(cifar_root, "test", N_TEST, str(tmp_path))
    test = x_test.permute(0, 2, 3, 1).numpy()  # (500, 32, 32, 3): the reference set itself
    f_test, _ = direct(net, test)
    # the reference set against itself: a distance of 0 up to round-off, below its own floor
    m = judge.judge_scores(test, run_dir, "cpu", target="ship")
    assert abs(m["judge_fd"]) < 1e-6 and m["judge_fd_floor"] > 1e-3
    assert m["judge_diversity"] == pytest.approx(1.0, abs=1e-6)
    # 300 other real test images (files 50..79 of every class): scored as computed here
    more, _ = load_cifar10(cifar_root, "test", 2 * N_TEST, str(tmp_path))  # (1000, ...): 100 per class, by class
    other = more.permute(0, 2, 3, 1).numpy()[(np.arange(10)[:, None] * 100 + np.arange(50, 80)).ravel()]
    m = judge.judge_scores(other, run_dir, "cpu", target=SHIP)
    f, pred = direct(net, other)
    assert m["judge_fd"] == pytest.approx(frechet_scipy(f, f_test), rel=1e-4)
    assert m["judge_target_rate"] == pytest.approx(float((pred == SHIP).mean()), abs=1e-12)
    assert m["judge_n_target"] == int((pred == SHIP).sum()) >= 2
    assert m["judge_diversity"] == pytest.approx(np.trace(np.cov(f, rowvar=False)) / np.trace(np.cov(f_test, rowvar=False)),
                                                 rel=1e-4)
    hist = np.bincount(pred, minlength=10) / len(pred)
    assert m["judge_class_entropy"] == pytest.approx(-(hist[hist > 0] * np.log(hist[hist > 0])).sum(), rel=1e-9)
    ships = f[pred == SHIP]
    real_ships = f_test[y_test.numpy() == SHIP]
    assert m["judge_fd_target"] == pytest.approx(frechet_scipy(ships, real_ships), rel=1e-4)
    assert m["judge_diversity_target"] == pytest.approx(
        np.trace(np.cov(ships, rowvar=False)) / np.trace(np.cov(real_ships, rowvar=False)), rel=1e-4)
    # real images score near the floor of their sample count; noise far above it
    assert m["judge_fd"] < 3 * m["judge_fd_floor"], m
    noise = np.random.default_rng(0).integers(0, 256, other.shape, dtype=np.uint8)
    assert judge.judge_scores(noise, run_dir, "cpu")["judge_fd"] > 10 * m["judge_fd_floor"]
    # every key is the judge's; without a target there is no target key
    assert all(k.startswith("judge_") for k in m)
    assert set(judge.judge_scores(other, run_dir, "cpu")) == {"judge_fd", "judge_fd_floor", "judge_diversity",
                                                             "judge_class_entropy"}


def test_evaluate_samples_adds_judge_keys_iff_the_judge_is_there(run_dir, cifar_root, tmp_path):
    images = load_cifar10(cifar_root, "test", 20, str(tmp_path))[0].permute(0, 2, 3, 1).numpy()  # (20, 32, 32, 3)
    with_judge = metrics.evaluate_samples(images, run_dir, "cpu", target="ship")
    assert {"judge_fd", "judge_fd_floor", "judge_diversity", "judge_class_entropy", "judge_target_rate"} <= set(with_judge)
    assert with_judge["judge_fd"] == judge.judge_scores(images, run_dir, "cpu", "ship")["judge_fd"]
    assert "judge (a third network" in metrics.format_table(with_judge)
    older = tmp_path / "older"  # a run folder from before the judge: the same scores, no judge_* keys
    shutil.copytree(os.path.join(run_dir, "evaluator"), older / "evaluator")
    without = metrics.evaluate_samples(images, str(older), "cpu", target="ship")
    assert not any(k.startswith("judge_") for k in without)
    assert {k: v for k, v in with_judge.items() if not k.startswith("judge_")} == without
    assert "judge (a third network" not in metrics.format_table(without)
