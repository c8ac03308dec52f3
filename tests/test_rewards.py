"""Rewards against independent computations: analytic gradients, a NumPy log-softmax, the weighted sum;
and the sign convention (higher is better, loss = -reward)."""
import os

import numpy as np
import pytest
import torch

from sftlib.nets import ResNet9
from train_classifier import random_crop
from sftlib.common import UserError, save_atomic
from conftest import run_cli
from rewards import brightness, parse_reward_spec, reward_loss
from sftlib.models import load_reward


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    """An out_dir with a random-init (not trained) reward classifier checkpoint: the tests below check
    the wiring of the reward, which does not need a good classifier. BatchNorm running statistics
    are moved away from their init so eval mode is not a no-op."""
    out = tmp_path_factory.mktemp("clf")
    torch.manual_seed(0)
    net = ResNet9(width=4)
    with torch.no_grad():  # only to update the BatchNorm running statistics
        for _ in range(3):
            net(torch.rand(16, 3, 32, 32) * 2 - 1)
    save_atomic(dict(kind="classifier", model=net.state_dict(), opt=None, step=1, config={}, rng=None,
                     arch={"name": "resnet9", "width": 4}, test_acc=0.1, elapsed=0.0),
                os.path.join(out, "classifier", "ckpt.pt"))
    return str(out), net.eval()


def test_brightness_value_and_gradient():
    x = (torch.rand(3, 3, 4, 5, dtype=torch.float64) * 2 - 1).requires_grad_()
    r = brightness(x)
    assert r.shape == (3,)
    expected = ((x.detach().numpy() + 1) / 2).reshape(3, -1).mean(1)
    assert np.allclose(r.detach().numpy(), expected)
    r.sum().backward()
    # d/dx_i mean((x + 1) / 2) = 1 / (2 * numel): every pixel equally, positive
    assert torch.allclose(x.grad, torch.full_like(x, 1 / (2 * 3 * 4 * 5)))


def test_brightness_target_gradient():
    x = (torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1).requires_grad_()
    tau = 0.8
    r = brightness(x, tau)
    b = ((x.detach() + 1) / 2).mean(dim=(1, 2, 3))  # (2,)
    assert torch.allclose(r, -(b - tau) ** 2)
    r.sum().backward()
    # d/dx_i -(b - tau)^2 = -2 (b - tau) / (2 * numel): darker than tau -> positive gradient
    g = (-(b - tau) / (3 * 4 * 4)).view(2, 1, 1, 1).expand_as(x)
    assert torch.allclose(x.grad, g)
    assert (x.grad > 0).all()  # random images in [-1, 1] have b ~ 0.5 < 0.8


def test_sign_convention_loss_is_minus_reward():
    """Higher is better: one gradient-descent step on reward_loss raises the reward."""
    r = torch.tensor([0.5, -1.0, 2.0])
    assert reward_loss(r).item() == pytest.approx(-r.mean().item())
    x = (torch.rand(4, 3, 8, 8) * 2 - 1).requires_grad_()
    before = brightness(x).mean().item()
    reward_loss(brightness(x)).backward()
    with torch.no_grad():  # a manual SGD step
        x -= 10.0 * x.grad
    assert brightness(x).mean().item() > before


def test_classifier_reward_is_log_softmax_at_target(clf_dir):
    out_dir, ref = clf_dir
    reward = load_reward("classifier:ship", out_dir, "cpu")
    assert reward.name == "classifier:ship"
    x = (torch.rand(5, 3, 32, 32) * 2 - 1).requires_grad_()
    r = reward(x)
    assert r.shape == (5,)
    with torch.no_grad():  # the reference: a separate copy of the same net, log-softmax in NumPy
        logits = ref(x).double().numpy()  # (5, 10)
    m = logits.max(1, keepdims=True)
    log_p = logits - (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))
    assert np.allclose(r.detach().numpy(), log_p[:, 8], atol=1e-5)  # ship is class 8
    assert (r.detach().numpy() <= 0).all()


def test_classifier_reward_is_frozen_but_passes_gradient(clf_dir):
    out_dir, _ = clf_dir
    reward = load_reward("classifier:cat", out_dir, "cpu")
    net = reward.fn.net
    assert not net.training
    assert all(not p.requires_grad for p in net.parameters())
    stats = [b.clone() for b in net.buffers()]
    x = (torch.rand(4, 3, 32, 32) * 2 - 1).requires_grad_()
    reward_loss(reward(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(stats, net.buffers()))  # BatchNorm statistics untouched


def test_combination_is_the_weighted_sum(clf_dir):
    out_dir, _ = clf_dir
    combo = load_reward("0.7*classifier:ship+0.3*brightness:0.8", out_dir, "cpu")
    assert combo.name == "0.7*classifier:ship+0.3*brightness:0.8"
    clf, bright = load_reward("classifier:ship", out_dir, "cpu"), load_reward("brightness:0.8", out_dir, "cpu")
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    assert torch.allclose(combo(x), 0.7 * clf(x) + 0.3 * bright(x), atol=1e-6)


def test_spec_parser():
    assert parse_reward_spec("brightness") == [(1.0, "brightness", None)]
    assert parse_reward_spec("0.7*classifier:ship + 0.3*brightness:0.5") == [
        (0.7, "classifier", 8), (0.3, "brightness", 0.5)]
    for bad in ("", "loudness", "classifier:spaceship", "classifier", "abc*brightness", "brightness:2",
                "brightness:dark", "0.5*brightness+", "inf*brightness", "nan*brightness"):
        with pytest.raises(ValueError):
            parse_reward_spec(bad)


def test_classifier_reward_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--stages=classifier"):
        load_reward("classifier:ship", str(tmp_path), "cpu")


def test_random_crop_is_a_translation():
    x = torch.rand(6, 3, 32, 32)
    y = random_crop(x, pad=4)
    assert y.shape == x.shape
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(len(x)):  # brute force: some window of the padded image is the crop
        assert any(torch.equal(y[i], xp[i, :, dy:dy + 32, dx:dx + 32]) for dy in range(9) for dx in range(9))


@pytest.mark.parametrize("args, message", [
    (["--reward=loudness"], "unknown reward 'loudness'"),
    (["--reward=classifier:spaceship"], "unknown class 'spaceship'"),
    (["--reward=abc*brightness"], "reward weight 'abc'"),
    (["--target=spaceship"], "unknown class 'spaceship'"),
    (["--samples=/nonexistent/s.npz"], "samples file not found"),
])
def test_bad_input_is_one_line_error(args, message):
    p = run_cli("eval", "--samples=x.npz", *args, check=False, timeout=120)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_wrong_shape_samples_are_one_line_errors(tmp_path):
    for name, arr in [("chw", np.zeros((4, 3, 32, 32), np.uint8)), ("float", np.zeros((4, 32, 32, 3), np.float32))]:
        path = tmp_path / f"{name}.npz"
        np.savez(path, images=arr)
        p = run_cli("eval", f"--samples={path}", check=False, timeout=120)
        assert p.returncode == 2 and str(path) in p.stderr and "images" in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
