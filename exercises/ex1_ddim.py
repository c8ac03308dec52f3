"""Exercise 1: the DDIM step (Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12 and 16).

Fill in the three gaps marked TODO(student), then check:  python -m pytest exercises/check_ex1_ddim.py
Conventions as in ddpm.py: t an integer in [0, T), s < t, s = -1 means x_0 (sched.abar(-1) = 1, and
sched.abar(t) is the schedule's \bar{alpha}_t); images (B, C, H, W). Ignore x0-clipping (the checks use
clip_x0=False). Do not call ddpm.ddim_step or ddpm.predict_x0: they are what your answer is compared
with. Stuck? exercises/README.md, exercise 1, has hints to open one at a time.
"""
import torch


def predict_x0(sched, x_t, t, eps):
    """Song et al. 2021, Eq. 12, the "predicted x_0" term: the clean image that, noised to timestep t with
    exactly the noise eps by the forward process (Ho et al. 2020, Eq. 4), gives x_t. (B, C, H, W)."""
    # TODO(student): the predicted x_0, shape (B, C, H, W), from the forward process solved for x_0
    raise NotImplementedError("exercise 1: predict_x0")


def ddim_sigma(sched, t, s, eta):
    """Song et al. 2021, Eq. 16: the standard deviation of the fresh noise of one step from t down to s,
    scaled by eta. A 0-dim tensor."""
    # TODO(student): sigma of Eq. 16, a 0-dim tensor: exactly zero for the deterministic sampler (eta 0),
    # and for eta 1 between neighbours t, t - 1 the square root of DDPM's posterior variance (Ho et al. Eq. 7)
    raise NotImplementedError("exercise 1: ddim_sigma")


def ddim_step(sched, x_t, eps, t, s, eta=0.0, noise=None):
    """Song et al. 2021, Eq. 12: x_s from x_t and the network's eps. eta 0: deterministic DDIM; eta 1 between
    neighbours t, t - 1: DDPM's ancestral step. noise: the z of Eq. 12, or None for a fresh draw."""
    # TODO(student): x_s of Eq. 12, shape (B, C, H, W), built from the two functions above. Its random term
    # exists only when eta is positive (the deterministic sampler draws nothing and ignores `noise`); it uses
    # `noise` when one is given, so that a check can repeat a stochastic step exactly
    raise NotImplementedError("exercise 1: ddim_step")
