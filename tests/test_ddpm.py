"""Oracle tests of the diffusion maths in ddpm.py, each against an independent computation."""
import numpy as np
import torch

import ddpm


def test_schedule_matches_numpy_products():
    sched = ddpm.Schedule()
    beta = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - beta)
    assert np.allclose(sched.beta.numpy(), beta, atol=1e-9)
    assert np.allclose(sched.alpha_bar.numpy(), abar, rtol=1e-5)
    assert sched.abar(-1).item() == 1.0  # t = -1 is the clean image


def test_closed_form_q_equals_iterated_forward_chain():
    """q(x_t | x_0) in closed form (Eq. 4) vs running x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z."""
    torch.manual_seed(0)
    sched = ddpm.Schedule()
    beta = np.linspace(1e-4, 0.02, 1000)
    x0 = torch.tensor([-0.9, 0.0, 0.7], dtype=torch.float64)  # three pixel values
    n = 40_000
    x = x0.float().expand(n, 3).clone()  # (n, 3), the forward chain run one step at a time
    for t in range(1000):
        x = float(np.sqrt(1 - beta[t])) * x + float(np.sqrt(beta[t])) * torch.randn_like(x)
        if t not in (99, 499, 999):
            continue
        closed = ddpm.q_sample(sched, x0.float().expand(n, 3).reshape(n, 3, 1, 1),
                               torch.full((n,), t), torch.randn(n, 3, 1, 1)).reshape(n, 3).double()
        abar = np.prod(1 - beta[: t + 1])
        for a in (x.double(), closed):  # both agree with N(sqrt(abar) x0, 1 - abar), within ~4 std errors
            assert torch.allclose(a.mean(0), np.sqrt(abar) * x0, atol=0.02)
            assert torch.allclose(a.var(0), torch.full((3,), 1 - abar, dtype=torch.float64), atol=0.028)


def test_predict_x0_inverts_q_sample():
    sched = ddpm.Schedule()
    x0, eps = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    x_t = ddpm.q_sample(sched, x0, t, eps)
    assert torch.allclose(ddpm.predict_x0(sched, x_t, t, eps), x0, atol=2e-3)


def _posterior(sched, x_t, x0, t):
    """q(x_{t-1} | x_t, x_0) of Ho et al. 2020 Eq. 6-7, written out from beta alone."""
    beta = sched.beta.double()
    abar = torch.cumprod(1 - beta, 0)
    abar_prev = abar[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
    mean = (abar_prev.sqrt() * beta[t] / (1 - abar[t])) * x0 + ((1 - beta[t]).sqrt() * (1 - abar_prev) / (1 - abar[t])) * x_t
    var = (1 - abar_prev) / (1 - abar[t]) * beta[t]
    return mean, var


def test_ddim_eta1_single_steps_reproduce_ddpm_posterior():
    """Song et al. 2021, Sec. 4.1: with eta = 1 and all T steps, DDIM's update is DDPM's posterior."""
    torch.manual_seed(0)
    sched = ddpm.Schedule()
    assert ddpm.ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    x_t, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t in (999, 700, 300, 50, 1):
        x0_hat = ddpm.predict_x0(sched, x_t, t, eps).double()
        mean, var = _posterior(sched, x_t.double(), x0_hat, t)
        ddim_mean = ddpm.ddim_step(sched, x_t, eps, t, t - 1, eta=1.0, noise=torch.zeros_like(x_t))
        ddim_unit = ddpm.ddim_step(sched, x_t, eps, t, t - 1, eta=1.0, noise=torch.ones_like(x_t))
        assert torch.allclose(ddim_mean.double(), mean, atol=1e-4, rtol=1e-4)
        assert torch.allclose((ddim_unit - ddim_mean).double() ** 2, var.expand_as(mean), rtol=1e-3)
        # Ho et al.'s Algorithm 2 step has the same mean and variance
        ddpm_mean = ddpm.ddpm_step(sched, x_t, eps, t, noise=torch.zeros_like(x_t))
        ddpm_unit = ddpm.ddpm_step(sched, x_t, eps, t, noise=torch.ones_like(x_t))
        assert torch.allclose(ddpm_mean.double(), mean, atol=1e-4, rtol=1e-4)
        assert torch.allclose((ddpm_unit - ddpm_mean).double() ** 2, var.expand_as(mean), rtol=1e-3)


def test_ddim_eta0_is_deterministic_and_ddpm_is_not():
    sched = ddpm.Schedule()
    model = lambda x, t: 0.5 * x  # any fixed eps-predictor
    x_T = torch.randn(2, 3, 4, 4)
    steps = ddpm.ddim_timesteps(1000, 20)
    torch.manual_seed(1)
    a = ddpm.ddim_sample(model, sched, x_T, steps)
    torch.manual_seed(2)
    b = ddpm.ddim_sample(model, sched, x_T, steps)
    assert torch.equal(a, b)
    torch.manual_seed(1)
    c = ddpm.ddim_sample(model, sched, x_T, steps, eta=1.0)
    assert not torch.allclose(a, c)


def test_ddim_timesteps_are_the_papers():
    ts = ddpm.ddim_timesteps(1000, 50)
    assert ts[0] == 981 and ts[-1] == 1 and len(ts) == 50
    assert all(a - b == 20 for a, b in zip(ts, ts[1:]))
    assert 761 in ts and 741 in ts and 501 in ts and 261 in ts  # PAPER.md Sec. 3's segment edges


def test_eps_loss_zero_for_model_returning_true_noise():
    sched = ddpm.Schedule()
    x0 = torch.rand(8, 3, 8, 8) * 2 - 1

    def oracle(x_t, t):  # knows x_0, so recovers eps exactly from x_t (Eq. 4 solved for eps)
        abar = sched.alpha_bar[t].view(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    assert ddpm.eps_loss(oracle, sched, x0).item() < 1e-8
    assert ddpm.eps_loss(lambda x, t: torch.zeros_like(x), sched, x0).item() > 0.5  # E||eps||^2 = 1


def test_min_snr_weighting_against_explicit_per_sample_weights():
    """Min-SNR-gamma (Hang et al. 2023): each sample's mean squared error times min(SNR_t, gamma) / SNR_t,
    recomputed here from the same draws of t and eps (the same RNG seed)."""
    sched = ddpm.Schedule()
    x0 = torch.rand(64, 3, 4, 4) * 2 - 1
    model = lambda x, t: 0.5 * x  # any eps-predictor
    for gamma in (0.0, 5.0):
        torch.manual_seed(3)
        got = ddpm.eps_loss(model, sched, x0, gamma).item()
        torch.manual_seed(3)
        t = torch.randint(0, sched.T, (64,))
        eps = torch.randn_like(x0)
        abar = sched.alpha_bar[t].double()
        x_t = abar.sqrt().view(-1, 1, 1, 1) * x0.double() + (1 - abar).sqrt().view(-1, 1, 1, 1) * eps.double()
        err = ((eps.double() - 0.5 * x_t) ** 2).mean(dim=(1, 2, 3))
        snr = abar / (1 - abar)
        w = torch.minimum(snr, torch.tensor(gamma)) / snr if gamma > 0 else torch.ones(64, dtype=torch.float64)
        assert abs(got - (w * err).mean().item()) < 1e-5 * (w * err).mean().item()
        if gamma > 0:  # it does down-weight: the low-noise samples (SNR > gamma) count less
            assert (w < 1).any() and (w[snr <= gamma] == 1).all()


def test_ddpm_lr_schedule_warmup_then_constant_or_cosine_to_zero():
    from train_ddpm import lr_at

    cfg = dict(ddpm_lr=1e-3, ddpm_warmup=10, ddpm_steps=110, ddpm_lr_schedule="constant")
    assert lr_at(cfg, 0) == 1e-4 and lr_at(cfg, 9) == 1e-3 and lr_at(cfg, 109) == 1e-3
    cfg["ddpm_lr_schedule"] = "cosine"
    assert lr_at(cfg, 4) == 5e-4  # the warmup is the same
    assert abs(lr_at(cfg, 10) - 1e-3) < 1e-12 and abs(lr_at(cfg, 60) - 5e-4) < 1e-12  # halfway: half
    assert lr_at(cfg, 109) < 1e-6  # the last step: nearly zero


def test_ddim_sampler_gradient_matches_finite_differences():
    """The samplers are differentiable: d x_0 / d theta through 10 DDIM steps vs central differences."""
    sched = ddpm.Schedule()
    x_T = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    steps = ddpm.ddim_timesteps(1000, 10)
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    model = lambda x, t: theta * torch.tanh(x) + 0.01 * t.view(-1, 1, 1, 1)  # a toy eps-predictor

    def f(th):
        m = lambda x, t: th * torch.tanh(x) + 0.01 * t.view(-1, 1, 1, 1)
        s = ddpm.Schedule()
        s.alpha_bar = s.alpha_bar.double()
        return ddpm.ddim_sample(m, s, x_T, steps).pow(2).sum()

    sched.alpha_bar = sched.alpha_bar.double()
    ddpm.ddim_sample(model, sched, x_T, steps).pow(2).sum().backward()
    h = 1e-6
    fd = (f(torch.tensor(0.3 + h, dtype=torch.float64)) - f(torch.tensor(0.3 - h, dtype=torch.float64))) / (2 * h)
    assert abs(theta.grad.item() - fd.item()) < 1e-5 * max(1.0, abs(fd.item()))


def test_x0_clipping_keeps_the_prediction_in_range():
    """With Schedule(clip_x0=True) the last DDIM step returns the clipped x0_hat, and the DDPM step's
    mean is the posterior mean (Ho et al. Eq. 7) of the clipped x0_hat."""
    sched, clipped = ddpm.Schedule(), ddpm.Schedule(clip_x0=True)
    x_t, eps = 3 * torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x0_hat = ddpm.predict_x0(sched, x_t, 300, eps)
    assert (x0_hat.abs() > 1).any()  # the unclipped prediction leaves the data range ...
    assert torch.allclose(ddpm.ddim_step(clipped, x_t, eps, 300, -1), x0_hat.clamp(-1, 1), atol=1e-5)  # ... clipped
    assert torch.allclose(ddpm.ddim_step(sched, x_t, eps, 300, -1), x0_hat, atol=1e-5)
    mean, _ = _posterior(sched, x_t.double(), x0_hat.clamp(-1, 1).double(), 300)
    assert torch.allclose(ddpm.ddpm_step(clipped, x_t, eps, 300, noise=torch.zeros_like(x_t)).double(), mean, atol=1e-4)
