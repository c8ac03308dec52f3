"""Check for exercise 1 (the DDIM step), against ddpm.py and two closed-form facts."""
import pytest
import torch

import checklib
import ddpm

ex = checklib.load("ex1_ddim", disable=("ddpm.predict_x0", "ddpm.ddim_step"))
PAIRS = [(981, 961), (761, 501), (500, 499), (21, 1), (1, -1), (999, -1)]  # (t, s), s = -1 is x_0


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1  # (3, 3, 8, 8) in [-1, 1]
    eps = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    return x0, eps


def test_predict_x0_inverts_q_sample():
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. Eq. 4): with the true eps, x0_hat is x_0."""
    sched, (x0, eps) = checklib.schedule64(), data()
    for t in (0, 250, 999):
        x_t = ddpm.q_sample(sched, x0, t, eps)
        assert torch.allclose(ex.predict_x0(sched, x_t, t, eps), x0, atol=1e-9), t
        assert torch.allclose(ex.predict_x0(sched, x_t, t, eps), ddpm.predict_x0(sched, x_t, t, eps), atol=1e-9)


def test_sigma_of_eq_16():
    sched = checklib.schedule64()
    assert float(ex.ddim_sigma(sched, 761, 501, 0.0)) == 0.0  # eta = 0: deterministic
    for t in (1, 100, 999):  # eta = 1, s = t - 1: DDPM's posterior variance (Ho et al. Eq. 7)
        beta_tilde = (1 - sched.abar(t - 1)) / (1 - sched.abar(t)) * sched.beta[t]
        assert torch.allclose(ex.ddim_sigma(sched, t, t - 1, 1.0) ** 2, beta_tilde, rtol=1e-9), t


@pytest.mark.parametrize("t, s", PAIRS)
def test_eta0_with_the_true_eps_lands_on_q_sample(t, s):
    """Closed form: from q_sample(x_0, t, eps) with the true eps, DDIM (eta = 0) lands exactly on
    q_sample(x_0, s, eps): the deterministic update keeps the same eps all the way down."""
    sched, (x0, eps) = checklib.schedule64(), data()
    x_s = ex.ddim_step(sched, ddpm.q_sample(sched, x0, t, eps), eps, t, s)
    assert torch.allclose(x_s, ddpm.q_sample(sched, x0, s, eps), atol=1e-9)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_matches_the_project_ddim_step(eta):
    """Any x_t, any eps (a tiny random network's), the same noise z: the same x_s as ddpm.ddim_step."""
    sched, (x_t, z) = checklib.schedule64(), data(1)
    net = checklib.TinyEps(0)
    for t, s in PAIRS:
        eps = net(x_t, torch.full((3,), t))  # (3, 3, 8, 8)
        ours = ex.ddim_step(sched, x_t, eps, t, s, eta, noise=z)
        assert torch.allclose(ours, ddpm.ddim_step(sched, x_t, eps, t, s, eta, noise=z), atol=1e-9), (t, s)


def test_eta1_one_step_is_ddpm_ancestral_step():
    """Song et al. 2021, Sec. 4.1: eta = 1 between neighbours t -> t - 1 is Ho et al.'s Algorithm 2."""
    sched, (x_t, z) = checklib.schedule64(), data(2)
    eps = checklib.TinyEps(1)(x_t, torch.full((3,), 10))
    for t in (10, 500, 999):
        ours = ex.ddim_step(sched, x_t, eps, t, t - 1, 1.0, noise=z)
        assert torch.allclose(ours, ddpm.ddpm_step(sched, x_t, eps, t, noise=z), atol=1e-9), t


def test_noise_only_when_eta_is_positive():
    sched, (x_t, eps) = checklib.schedule64(), data(3)
    a = ex.ddim_step(sched, x_t, eps, 761, 501)
    assert torch.equal(a, ex.ddim_step(sched, x_t, eps, 761, 501, 0.0, noise=torch.randn_like(x_t)))  # z unused
    torch.manual_seed(0)
    b = ex.ddim_step(sched, x_t, eps, 761, 501, 1.0)  # fresh z each call
    c = ex.ddim_step(sched, x_t, eps, 761, 501, 1.0)
    assert not torch.allclose(b, c) and not torch.allclose(a, b)


def test_differentiable():
    """The fine-tuning stages backpropagate through this step: gradients reach x_t and eps."""
    sched, (x_t, eps) = checklib.schedule64(), data(4)
    x_t.requires_grad_(True)
    eps.requires_grad_(True)
    ex.ddim_step(sched, x_t, eps, 761, 501).sum().backward()
    abar_t, abar_s = sched.abar(761), sched.abar(501)
    # dx_s/dx_t = sqrt(abar_s / abar_t) elementwise (Eq. 12 is linear in x_t)
    assert torch.allclose(x_t.grad, (abar_s / abar_t).sqrt().expand_as(x_t), atol=1e-9)
    assert eps.grad is not None and eps.grad.abs().sum() > 0
