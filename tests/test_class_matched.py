"""Class-matched quality metrics (sftlib/metrics.class_matched) on real CIFAR-10 images and the shipped
held-out evaluator: a set of *real* images shifted to one class scores near its own floor, while the
plain Fréchet distance counts the shift as damage; damaged images of that class do not."""
import numpy as np
import pytest
import torch

from sftlib import pretrained
from sftlib.data import CLASSES, load_cifar10
from sftlib.metrics import bootstrap_ci, class_matched, net_outputs
from sftlib.nets import build_net

SHIP = CLASSES.index("ship")


@pytest.fixture(scope="module")
def real(cifar_root, tmp_path_factory):
    """Evaluator features of 2000 test and 3000 training images (evenly over classes) and their labels."""
    torch.set_num_threads(2)
    state, meta = pretrained.read("evaluator")
    net = build_net(meta["arch"]).eval()
    net.load_state_dict(state)
    cache = str(tmp_path_factory.mktemp("cache"))
    x_test, y_test = load_cifar10(cifar_root, "test", 2000, cache)
    x_train, y_train = load_cifar10(cifar_root, "train", 3000, cache)
    f_test, _ = net_outputs(net, x_test, "cpu")
    perm = torch.randperm(3000, generator=torch.Generator().manual_seed(0))  # the loader's order is by class
    x_train, y_train = x_train[perm], y_train[perm].numpy()
    f_train, logp_train = net_outputs(net, x_train, "cpu")
    stats = dict(feats_test=f_test, labels_test=y_test.numpy(), feats_train=f_train[:1500], labels_train=y_train[:1500])
    # the "samples": the other 1500 training images, never in the floor set
    return stats, f_train[1500:], logp_train[1500:].argmax(1), y_train[1500:], x_train[1500:], net


def plain_fd(feats, stats):
    from sftlib.fid import frechet_distance, gaussian_stats
    return frechet_distance(*gaussian_stats(feats), *gaussian_stats(stats["feats_test"]))


def test_real_images_shifted_to_ships_score_near_their_floor(real):
    stats, feats, pred, labels, _, _ = real
    ships = labels == SHIP
    # 80 % ships: an intended shift, made of real images only
    keep = np.concatenate([np.flatnonzero(ships), np.flatnonzero(~ships)[:37]])
    m = class_matched(feats[keep], pred[keep], stats, target=SHIP)
    shifted_plain = plain_fd(feats[keep], stats)
    assert m["fd_matched"] < 1.6 * m["fd_matched_floor"] + 0.5, m  # near its floor
    assert shifted_plain > 2.5 * m["fd_matched"], (shifted_plain, m)  # the plain distance calls it damage
    assert m["fd_target"] < 1.6 * m["fd_target_floor"] + 0.5, m
    assert 0.7 < m["diversity_target"] < 1.3, m  # real ships are as varied as real ships
    # the unshifted real set: matched and plain agree, both near the floor
    m_all = class_matched(feats, pred, stats)
    assert abs(m_all["fd_matched"] - plain_fd(feats, stats)) < 0.5 * plain_fd(feats, stats) + 0.5


def test_damaged_ships_are_not_excused(real):
    stats, _, _, labels, x, net = real
    ships = torch.from_numpy(labels == SHIP)
    xs = x[ships].float()
    blurred = torch.nn.functional.avg_pool2d(xs, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)  # x4 blur
    f_ok, logp_ok = net_outputs(net, xs.round().to(torch.uint8), "cpu")
    f_bad, logp_bad = net_outputs(net, blurred.round().to(torch.uint8), "cpu")
    ok = class_matched(f_ok, logp_ok.argmax(1), stats, target=SHIP)
    bad = class_matched(f_bad, logp_bad.argmax(1), stats, target=SHIP)
    assert bad["fd_matched"] > 2 * ok["fd_matched"], (ok, bad)
    # a collapsed set: one ship repeated (with a little noise) has no spread within the class
    one = f_ok[:1].repeat(len(f_ok), 0) + 1e-3 * np.random.default_rng(0).standard_normal(f_ok.shape).astype(np.float32)
    col = class_matched(one, np.full(len(one), SHIP), stats, target=SHIP)
    assert col["diversity_target"] < 0.01 and col["fd_target"] > 2 * ok["fd_target"]


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    narrow, wide = [], []
    for n, out in ((2000, narrow), (100, wide)):
        x = rng.normal(0.3, 1.0, n)
        ci = bootstrap_ci(lambda idx: {"mean": x[idx].mean()}, n, n_boot=300)["mean"]
        assert ci[0] < x.mean() < ci[1]
        out.append(ci[1] - ci[0])
    # the 95 % interval of a mean is ~ 2 * 1.96 / sqrt(n) wide
    assert abs(narrow[0] - 3.92 / np.sqrt(2000)) < 0.25 * 3.92 / np.sqrt(2000)
    assert abs(wide[0] - 3.92 / np.sqrt(100)) < 0.25 * 3.92 / np.sqrt(100)
