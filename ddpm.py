"""The diffusion maths: DDPM (Ho et al. 2020) and DDIM (Song et al. 2021), as pure functions.

Conventions, stated once here and pinned by tests/test_ddpm.py:
- images x_0 live in [-1, 1], shape (B, C, H, W);
- a timestep t is an integer in [0, T); index t is the paper's step t+1 (the papers count 1..T),
  so alpha_bar[t] is \\bar{\\alpha}_{t+1} and x_t means "x after t+1 noising steps";
- the network predicts the noise: eps_theta(x_t, t) -> (B, C, H, W);
- nothing here calls no_grad: every function is differentiable, because the fine-tuning stages
  backpropagate through the samplers;
- x0-clipping (*choice*, on by default in the project's config, `--clip_x0`): with
  Schedule(clip_x0=True) the DDIM and DDPM steps clip the predicted x_0 to [-1, 1] and re-derive eps
  from it, as Ho et al.'s reference sampler (clip_denoised) and diffusers (clip_sample) do. A small,
  briefly trained model's eps error at large t is amplified by 1/sqrt(abar_t) (~140 at t = 981) in
  x0_hat; without the clip its deterministic DDIM samples drift far outside [-1, 1].
  The clip shapes the gradient too: a clipped pixel of x0_hat passes no gradient to eps (so none to
  the LoRA), and early in the chain most pixels are clipped (benchmarks/bench_gradients.py measures
  how many). clip_x0="straight_through" (*choice* for the fine-tuning chains, `--ft_clip_grad`) keeps
  the clipped values but passes the gradient as if unclipped (the straight-through estimator of
  Bengio et al. 2013): its samples are the hard clip's. Stable Diffusion's sampler has no clip.
"""
import torch



class Schedule:
    """Linear beta schedule (Ho et al. 2020, Sec. 4: T = 1000, beta from 1e-4 to 0.02)."""

    def __init__(self, T=1000, beta_1=1e-4, beta_T=0.02, device="cpu", clip_x0=False):
        self.T, self.clip_x0 = T, clip_x0
        beta = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)  # (T,) beta_t
        alpha = 1.0 - beta  # (T,) alpha_t = 1 - beta_t
        alpha_bar = torch.cumprod(alpha, 0)  # (T,) \bar{alpha}_t = prod_{s<=t} alpha_s
        # computed in float64, stored in float32 on the device the model runs on
        self.beta = beta.float().to(device)
        self.alpha = alpha.float().to(device)
        self.alpha_bar = alpha_bar.float().to(device)

    def abar(self, t):
        """\\bar{alpha}_t for t (int or (B,) long tensor); t = -1 means "clean image": abar = 1.
        An int t picks an element on the device (no host-to-device copy, which would make a GPU wait)."""
        if not torch.is_tensor(t):
            return self.alpha_bar[t] if t >= 0 else self.alpha_bar.new_ones(())
        a = self.alpha_bar[t.clamp(min=0)]
        return torch.where(t < 0, torch.ones_like(a), a)


def _bcast(v, x):
    """Broadcast a per-sample scalar (B,) or () to x's shape (B, 1, 1, 1)."""
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() > 0 else v


def q_sample(sched, x0, t, eps):
    """Sample q(x_t | x_0) in closed form (Ho et al. 2020, Eq. 4):
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    abar_t = _bcast(sched.abar(t), x0)  # (B, 1, 1, 1)
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * eps  # (B, C, H, W)


def eps_loss(model, sched, x0, min_snr=0.0):
    """The simplified training objective (Ho et al. 2020, Algorithm 1 / Eq. 14):
    E_{t, eps} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2.

    min_snr > 0 (*choice*, `--ddpm_min_snr`): Min-SNR-gamma weighting (Hang et al. 2023, Eq. 8 for the
    eps-prediction loss): each sample's squared error is weighted by min(SNR_t, gamma) / SNR_t with
    SNR_t = abar_t / (1 - abar_t), which down-weights the nearly clean, low-noise steps whose eps is
    hard to predict and matters little for the image. 0: every t weighted 1 (Ho et al.)."""
    B = x0.shape[0]
    t = torch.randint(0, sched.T, (B,), device=x0.device)  # (B,) t ~ Uniform({0..T-1})
    eps = torch.randn_like(x0)  # (B, C, H, W)
    x_t = q_sample(sched, x0, t, eps)
    err = (eps - model(x_t, t)).pow(2).mean(dim=(1, 2, 3))  # (B,) per-sample squared error
    if min_snr > 0:
        abar_t = sched.abar(t)  # (B,)
        snr = abar_t / (1 - abar_t)  # (B,) signal-to-noise ratio of x_t
        err = err * snr.clamp(max=min_snr) / snr  # min(SNR, gamma) / SNR
    return err.mean()


def predict_x0(sched, x_t, t, eps):
    """x_0 predicted from eps (Song et al. 2021, Eq. 12, the "predicted x_0" term):
    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar_t = _bcast(sched.abar(t), x_t)
    return (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def clip(x0_hat, mode=True):
    """x0_hat clipped to [-1, 1]. mode "straight_through": the same values, but the backward pass is the
    identity (x + sg(clamp(x) - x)), so clipped pixels still pass gradient; True (hard): the clamp's own
    gradient, zero where clipped."""
    clipped = x0_hat.clamp(-1, 1)
    return x0_hat + (clipped - x0_hat).detach() if mode == "straight_through" else clipped


def ddim_step(sched, x_t, eps, t, s, eta=0.0, noise=None):
    """One generalised DDIM update from t to an earlier s (Song et al. 2021, Eq. 12):
    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)  (Eq. 16).
    eta = 0 is the deterministic DDIM (probability-flow ODE, Euler in the right variables);
    eta = 1 with s = t - 1 is DDPM's ancestral step. s = -1 lands on x_0. t, s: int or (B,)."""
    abar_t, abar_s = _bcast(sched.abar(t), x_t), _bcast(sched.abar(s), x_t)  # (B, 1, 1, 1)
    x0_hat = predict_x0(sched, x_t, t, eps)  # (B, C, H, W)
    if sched.clip_x0:  # see the module docstring: x0_hat into [-1, 1], eps consistent with it
        x0_hat = clip(x0_hat, sched.clip_x0)
        eps = (x_t - abar_t.sqrt() * x0_hat) / (1 - abar_t).sqrt()
    sigma = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).clamp(min=0).sqrt()
    x_s = abar_s.sqrt() * x0_hat + (1 - abar_s - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        x_s = x_s + sigma * (torch.randn_like(x_t) if noise is None else noise)
    return x_s


def ddpm_step(sched, x_t, eps, t, noise=None):
    """One ancestral step x_t -> x_{t-1} (Ho et al. 2020, Algorithm 2, line 4):
    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) + sigma_t z,
    with sigma_t^2 = \\tilde{beta}_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (Eq. 7), no noise at t = 0."""
    alpha_t, beta_t = sched.alpha[t], sched.beta[t]
    abar_t, abar_prev = sched.abar(t), sched.abar(t - 1)
    if sched.clip_x0:  # the same x0-clipping as in ddim_step: the posterior mean of the clipped x0_hat
        x0_hat = clip(predict_x0(sched, x_t, t, eps), sched.clip_x0)
        eps = (x_t - abar_t.sqrt() * x0_hat) / (1 - abar_t).sqrt()
    mean = (x_t - beta_t / (1 - abar_t).sqrt() * eps) / alpha_t.sqrt()
    if t == 0:
        return mean
    sigma = ((1 - abar_prev) / (1 - abar_t) * beta_t).sqrt()
    return mean + sigma * (torch.randn_like(x_t) if noise is None else noise)


N_CHAIN = 50  # the chain ShortFT fine-tunes through, distils on and samples with: DDIM-50 (PAPER.md Sec. 3)


def ddim_timesteps(T, steps, offset=1):
    """The DDIM sub-sequence, "leading" spacing as in Stable Diffusion: for T = 1000 and 50 steps,
    981, 961, ..., 21, 1 (the timesteps PAPER.md Sec. 3 names). Returns a descending list."""
    if not 1 <= steps <= T:
        raise ValueError(f"--steps must be in [1, {T}] for a DDIM chain of T = {T}, got {steps}")
    stride = T // steps
    return [i * stride + min(offset, stride - 1) for i in reversed(range(steps))]


def t_batch(t, x):
    """The network's timestep input for a sampler's step: the int t repeated over x's batch, (B,) long.
    The int rides along as `.step`, so a model whose weights depend on the step (shortft.FineTuned's T-LoRA)
    reads it from there, not back from the device (which would make a GPU wait)."""
    t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)
    t_vec.step = t
    return t_vec


def ddim_sample(model, sched, x_T, timesteps, eta=0.0):
    """DDIM sampling (Song et al. 2021, Eq. 12) over a descending list of timesteps; the last
    step lands on x_0. Differentiable: wrap it in no_grad yourself when you only want samples."""
    x = x_T  # (B, C, H, W)
    for i, t in enumerate(timesteps):
        s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x = ddim_step(sched, x, model(x, t_batch(t, x)), t, s, eta)
    return x


def ddpm_sample(model, sched, x_T):
    """DDPM ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2)."""
    x = x_T
    for t in reversed(range(sched.T)):
        x = ddpm_step(sched, x, model(x, t_batch(t, x)), t)
    return x
