"""The baselines ShortFT is compared with: the same long DDIM-50 chain of the base model, differing only
in where the gradient is cut (PAPER.md Sec. 1). Each function returns x_0, differentiable into the
model's trainable weights (one plain LoRA in this project's comparison, as in ShortFT's single-LoRA arm).

    draft_chain      DRaFT-K (Clark et al. 2024): only the last K steps keep a graph
    draft_lv_chain   DRaFT-LV (Clark et al. 2024): n re-noised copies of sg(x_0) take the last step
    alignprop_chain  AlignProp (Prabhudesai et al. 2023): a random cut drawn anew at every step
    drtune_chain     DRTune (Wu et al. 2024): the UNet sees sg(x_t); K evenly spaced steps train
    full_chain       full backprop through all 50 steps (optionally checkpointed)

`method_chain` picks one of them, or ShortFT's short chain, by name: the one dispatch the fine-tuning
stage, the gradient study and the benchmarks share.
"""
import torch
import torch.utils.checkpoint

import ddpm
from shortft import shortft_chain

# ShortFT's short chain: with the distilled shortcut, the naive jump (the frozen base's one DDIM step over a
# segment) and the perfect shortcut (the frozen base's real DDIM steps over it): the two controls
SHORT_CHAIN = ("shortft", "shortft_naive", "shortft_perfect")
METHODS = ("shortft", "shortft_naive", "shortft_perfect", "draft", "draft_lv", "alignprop", "drtune", "full")


def _step(model, sched, x, timesteps, i, grad=True, ckpt=False, sg_input=False):
    """Step i of a long chain; grad=False runs the UNet without a graph, ckpt recomputes it in backward,
    sg_input feeds the UNet sg(x_t) while the DDIM update itself keeps x_t (DRTune)."""
    t, s = timesteps[i], (timesteps[i + 1] if i + 1 < len(timesteps) else -1)
    t_vec = ddpm.t_batch(t, x)  # (B,)
    x_in = x.detach() if sg_input else x  # DRTune: no path through the UNet's input, so no product of its Jacobians
    if not grad:
        with torch.no_grad():  # a step the method gives no gradient: same value, no graph kept
            eps = model(x_in, t_vec)
    elif ckpt:  # gradient checkpointing: keep only the inputs, recompute the UNet in backward
        eps = torch.utils.checkpoint.checkpoint(model, x_in, t_vec, use_reentrant=False)
    else:
        eps = model(x_in, t_vec)
    return ddpm.ddim_step(sched, x, eps, t, s)  # x stays in the graph whenever it was in it


def draft_chain(model, sched, x_T, timesteps, K=1):
    """DRaFT-K (Clark et al. 2024, Sec. 4): the chain under no_grad except its last K steps."""
    if not 1 <= K <= len(timesteps):
        raise ValueError(f"DRaFT-K needs 1 <= K <= {len(timesteps)} (the chain), got K = {K}")
    x = x_T
    for i in range(len(timesteps)):
        x = _step(model, sched, x, timesteps, i, grad=i >= len(timesteps) - K)
    return x


def draft_lv_chain(model, sched, x_T, timesteps, n=2):
    """DRaFT-LV (Clark et al. 2024, Sec. 4, "DRaFT-LV"): the whole chain runs without gradient to x_0;
    sg(x_0) is re-noised n times to the last timestep, x^i = q(x_{t_last} | sg(x_0)) (Ho et al. 2020,
    Eq. 4), and each copy takes the last step with gradient. The n copies' rewards are averaged (the
    loss is a mean over the n B samples). Returns the n copies stacked, copy-major: (n B, C, H, W)."""
    if n < 1:
        raise ValueError(f"DRaFT-LV needs n >= 1 copies, got {n}")
    x = x_T
    with torch.no_grad():  # sg(x_0): the copies start from a stop-gradient x_0, no path to theta or x_T
        for i in range(len(timesteps)):
            x = _step(model, sched, x, timesteps, i, grad=False)  # x: (B, C, H, W), at the end sg(x_0)
    t_last = timesteps[-1]
    x_last = torch.cat([ddpm.q_sample(sched, x, t_last, torch.randn_like(x)) for _ in range(n)])  # (n B, C, H, W)
    return _step(model, sched, x_last, timesteps, len(timesteps) - 1)  # (n B, C, H, W): one call for all copies


def alignprop_chain(model, sched, x_T, timesteps, window=(0, 50), generator=None):
    """AlignProp (Prabhudesai et al. 2023), randomised truncated backprop as in its code (main.py, the
    `truncated_backprop_rand` branch): at *every* step i a cut c_i = randint(min, max) is drawn anew
    (both ends included, like Python's random.randint) and eps is detached when i < c_i; x_t is never
    detached. Window (0, 50) is that of its aesthetic and HPS configs. Every UNet call that keeps a
    graph is checkpointed (its grad_checkpoint = True); a call whose eps is detached runs under no_grad,
    which gives the same values and gradients as computing and then detaching it. A window (c, c) is its
    fixed cut (`trunc_backprop_timestep` = c). generator: the RNG of the draws (None: torch's global)."""
    lo, hi = window
    if not 0 <= lo <= hi <= len(timesteps):
        raise ValueError(f"AlignProp's window needs 0 <= min <= max <= {len(timesteps)} (the chain), got {window}")
    x = x_T
    for i in range(len(timesteps)):
        cut = int(torch.randint(lo, hi + 1, (), generator=generator))  # c_i, drawn anew at every step
        x = _step(model, sched, x, timesteps, i, grad=i >= cut, ckpt=True)
    return x


def drtune_train_steps(n, K, generator=None):
    """The K steps (0-based indices into an n-step chain) DRTune trains in one iteration: evenly spaced
    with stride floor(n / K) from a random offset o ~ U{0, ..., stride - 1}: o, o + stride, ... (so all
    n steps are trained equally often over iterations)."""
    if not 1 <= K <= n:
        raise ValueError(f"DRTune needs 1 <= K <= {n} (the chain), got K = {K}")
    stride = n // K
    o = int(torch.randint(0, stride, (), generator=generator))
    return [o + j * stride for j in range(K)]


def drtune_chain(model, sched, x_T, timesteps, K=5, generator=None):
    """DRTune (Wu et al. 2024, arXiv 2405.00760, Sec. 3): at every step the UNet sees sg(x_t), while the
    DDIM update x_{t-1} = a_t x_t + b_t eps_theta(sg(x_t), t) keeps x_t in the graph: the gradient
    reaches every trained step through the a_t-chain, without the product of UNet Jacobians. Only K
    evenly spaced steps (drtune_train_steps) run the UNet with gradient; the others under no_grad.
    Exactly DRTune: the stop-gradient on the denoiser's input and a sparse evenly spaced subset of
    trained steps. *Choices*: the subset's formula (stride floor(n / K), offset uniform below the stride),
    no gradient checkpointing, and the chain always runs to x_0 (no early stop of the sampling)."""
    train = set(drtune_train_steps(len(timesteps), K, generator))
    x = x_T
    for i in range(len(timesteps)):
        x = _step(model, sched, x, timesteps, i, grad=i in train, sg_input=True)
    return x


def full_chain(model, sched, x_T, timesteps, checkpoint=False):
    """Full backprop through every step (DRaFT with K = all, AlignProp without truncation)."""
    x = x_T
    for i in range(len(timesteps)):
        x = _step(model, sched, x, timesteps, i, ckpt=checkpoint)
    return x


def method_chain(method, model, student, sched, x_T, groups, timesteps, phase=0, draft_k=1, lv_n=2, window=(0, 50),
                 drtune_k=5, full_checkpoint=False, generator=None):
    """x_0 of `method`'s training chain from x_T: ShortFT's short chain (shortft_naive: the same chain,
    `student` being the frozen base model, the naive-jump control; shortft_perfect: its real DDIM steps
    in place of each jump, the perfect-shortcut control) at P-Training phase `phase`, or a
    baseline's long chain over `timesteps` (DRaFT-LV: its n copies, (n B, C, H, W))."""
    if method in SHORT_CHAIN:
        return shortft_chain(model, student, sched, x_T, groups, phase, perfect=method == "shortft_perfect")
    if method == "draft":
        return draft_chain(model, sched, x_T, timesteps, draft_k)
    if method == "draft_lv":
        return draft_lv_chain(model, sched, x_T, timesteps, lv_n)
    if method == "alignprop":  # AlignProp's random truncation: the cut drawn anew at every step
        return alignprop_chain(model, sched, x_T, timesteps, window, generator)
    if method == "drtune":
        return drtune_chain(model, sched, x_T, timesteps, drtune_k, generator)
    if method == "full":
        return full_chain(model, sched, x_T, timesteps, full_checkpoint)
    raise ValueError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
