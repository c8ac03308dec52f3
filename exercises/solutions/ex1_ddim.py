"""Exercise 1: the DDIM step (Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12 and 16).

Reference solution. Conventions as in ddpm.py: t an integer in [0, T), s < t, s = -1 means x_0
(sched.abar(-1) = 1); images (B, C, H, W). No x0-clipping here (the checks use clip_x0=False).
"""
import torch


def predict_x0(sched, x_t, t, eps):
    """Song et al. 2021, Eq. 12, the "predicted x_0" term: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar_t = sched.abar(t)  # () \bar{alpha}_t
    return (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()  # (B, C, H, W)


def ddim_sigma(sched, t, s, eta):
    """Song et al. 2021, Eq. 16: sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)."""
    abar_t, abar_s = sched.abar(t), sched.abar(s)  # (), ()
    return eta * ((1 - abar_s) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_s).sqrt()  # ()


def ddim_step(sched, x_t, eps, t, s, eta=0.0, noise=None):
    """Song et al. 2021, Eq. 12: x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps + sigma z.
    eta = 0: deterministic DDIM; eta = 1 and s = t - 1: DDPM's ancestral step. z = noise, or fresh N(0, I)."""
    abar_s = sched.abar(s)  # ()
    x0_hat = predict_x0(sched, x_t, t, eps)  # (B, C, H, W)
    sigma = ddim_sigma(sched, t, s, eta)  # ()
    x_s = abar_s.sqrt() * x0_hat + (1 - abar_s - sigma**2).sqrt() * eps  # (B, C, H, W) mean + "direction to x_t"
    if eta > 0:
        z = torch.randn_like(x_t) if noise is None else noise  # (B, C, H, W)
        x_s = x_s + sigma * z
    return x_s
