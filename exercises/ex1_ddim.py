"""Exercise 1: the DDIM step (Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12 and 16).

Fill in the three gaps marked TODO(student), then check:  python -m pytest exercises/check_ex1_ddim.py
Conventions as in ddpm.py: t an integer in [0, T), s < t, s = -1 means x_0 (sched.abar(-1) = 1);
images (B, C, H, W). Ignore x0-clipping (the checks use clip_x0=False). Do not call ddpm.ddim_step
or ddpm.predict_x0: they are what your answer is compared with.
"""
import torch


def predict_x0(sched, x_t, eps, t):
    """Song et al. 2021, Eq. 12, the "predicted x_0" term: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar_t = sched.abar(t)  # () \bar{alpha}_t
    # TODO(student): return x0_hat, shape (B, C, H, W)
    raise NotImplementedError("exercise 1: predict_x0")


def ddim_sigma(sched, t, s, eta):
    """Song et al. 2021, Eq. 16: sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)."""
    abar_t, abar_s = sched.abar(t), sched.abar(s)  # (), ()
    # TODO(student): return sigma, a 0-dim tensor (0 when eta = 0)
    raise NotImplementedError("exercise 1: ddim_sigma")


def ddim_step(sched, x_t, eps, t, s, eta=0.0, noise=None):
    """Song et al. 2021, Eq. 12: x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps + sigma z.
    eta = 0: deterministic DDIM; eta = 1 and s = t - 1: DDPM's ancestral step. z = noise, or fresh N(0, I)."""
    abar_s = sched.abar(s)  # ()
    # TODO(student): x0_hat and sigma from the two functions above, then Eq. 12; add sigma * z only
    # when eta > 0, with z = noise if it is given, else torch.randn_like(x_t)
    raise NotImplementedError("exercise 1: ddim_step")
