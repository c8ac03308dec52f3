"""Stage 4: ShortFT, reward fine-tuning of the base DDPM through the shortcut chain (PAPER.md Sec. 2-3).

The DDIM-50 chain 981, 961, ..., 1 is split into the shortcut's k segments; their last timesteps are
the edges s_j (k = 4: 761, 501, 261, 1). One ShortFT sample, as in the diagram of PAPER.md Sec. 3:

    x_T --(base DDIM steps 981..761, LoRA 1)--> x_741
        --[shortcut 741->501]--> x_501 --(base step at 501, LoRA 1+2)--> x_481
        --[shortcut 481->261]--> x_261 --(base step at 261, LoRA 1+2+3)--> x_241
        --[shortcut 241->1  ]--> x_1   --(base step at 1, LoRA 1+2+3+4)--> x_0 --> r(x_0)

- The shortcut (consistency.py, trained by train_shortcut.py) is frozen; the gradient passes through its input x_t.
- The gradient reaches the base model's trainable LoRA through 2k - 1 network calls instead of 50 (7 for k = 4).
- Timestep-aware LoRA (T-LoRA): k LoRAs, LoRA j stacked on LoRA j-1 (lora.py), used from its
  segment's last timestep on (FineTuned.stack); the same rule holds at inference.
- Progressive training (P-Training): k stages; in stage i (0-based here) LoRAs i..k-1 train,
  segments 0..i run the real base chain, only segment i's last step carries gradient (truncated
  backprop), and shortcuts stand in only after segment i. Stage 0 is the diagram above.
- *Choice*: the trainable LoRA is not inside the shortcut network (PAPER.md leaves this open).
Samples for evaluation always come from the fine-tuned base model's long chain (DDIM-50).
"""
import torch
import torch.utils.checkpoint

import ddpm
from consistency import jump
from sftlib.common import UserError
from sftlib.lora import lora_layers, lora_params, merged, set_active


def segment_groups(timesteps, edges):
    """Split a descending chain of timesteps into segments that each end at an edge:
    981..1 with edges [761, 501, 261, 1] -> [[981..761], [741..501], [481..261], [241..1]]."""
    if edges[-1] != timesteps[-1] or not set(edges) <= set(timesteps):
        raise UserError(f"edges {edges} must lie on the chain and end at its last timestep {timesteps[-1]}")
    groups, cur = [], []
    for t in timesteps:
        cur.append(t)
        if t in edges:
            groups.append(cur)
            cur = []
    return groups


class FineTuned:
    """The base UNet (with LoRA layers) as an eps-predictor whose LoRA stack depends on the timestep
    (T-LoRA): LoRA j (1-based) is used at segment j's last timestep, stacked on LoRAs 1..j-1, and the
    stack stays on below it. So segment 1 runs LoRA 1 throughout, segment j's inner steps run LoRAs
    1..j-1 and its last step LoRAs 1..j (*choice* for the inner steps, which the short chain never
    runs; PAPER.md Sec. 3 only says each LoRA is used at its segment's final timestep). With T-LoRA
    off, one LoRA serves every timestep."""

    def __init__(self, unet, groups, tlora=True):
        self.unet, self.groups, self.tlora = unet, groups, tlora
        self.edges = [g[-1] for g in groups]  # s_j, descending

    def __call__(self, x, t):
        """eps_theta(x_t, t) with the LoRA stack of t; t: (B,) with one value (a sampler's step)."""
        if self.tlora:
            set_active(self.unet, self.stack(int(t[0])))
        return self.unet(x, t)

    def stack(self, t):
        """How many LoRAs are on at timestep t: the edges at or above t, at least one."""
        return max(1, sum(e >= t for e in self.edges))


def set_stage(ft, stage):
    """P-Training: in stage i only LoRAs i..k-1 train. Without this, LoRA j < i would still get
    gradient, since it stays on (stacked) in every later segment."""
    if ft.tlora:
        for j in range(len(ft.groups)):
            for p in lora_params(ft.unet, j):
                p.requires_grad_(j >= stage)


def ptrain_stage(k, done, t1_stage=False):
    """P-Training's stage (0-based) once the fraction `done` of the fine-tuning budget is used.

    *Choices*: the budget is split into equal parts (equal optimizer steps with --ft_steps; with
    --ft_seconds equal seconds, so the later stages, whose steps run more real steps, get fewer steps).
    The last stage (k - 1) is skipped unless t1_stage: there only LoRA k trains, and only its call at
    t = 1 carries gradient, where x_0 = (x_1 - sqrt(1 - abar_1) eps) / sqrt(abar_1) moves by about
    0.015 of eps's change (sqrt(1 - abar_1) / sqrt(abar_1) ~ 0.0148 for the linear schedule): a stage
    that cannot change the image. LoRA k still trains in every other stage, since it is on at t = 1 in every chain."""
    n = k if t1_stage or k == 1 else k - 1
    return min(n - 1, int(done * n))


def base_step(model, sched, x, t, s):
    """One DDIM step of the (fine-tuned) base model from t to s (Song et al. 2021, Eq. 12, eta = 0)."""
    t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)
    return ddpm.ddim_step(sched, x, model(x, t_vec), t, s)


def next_t(groups, j, i):
    """The timestep after step i of segment j in the chain (-1 = x_0 after the last)."""
    if i + 1 < len(groups[j]):
        return groups[j][i + 1]
    return groups[j + 1][0] if j + 1 < len(groups) else -1


def real_segment(model, sched, x, groups, j, grad_last):
    """Segment j with real base-model DDIM steps; only the last step may carry gradient."""
    g = groups[j]
    with torch.no_grad():  # truncated backprop: the gradient is cut before the segment's last step
        for i, t in enumerate(g[:-1]):
            x = base_step(model, sched, x, t, next_t(groups, j, i))
    if grad_last:
        return base_step(model, sched, x, g[-1], next_t(groups, j, len(g) - 1))
    with torch.no_grad():  # a segment before the stage's own: no gradient at all
        return base_step(model, sched, x, g[-1], next_t(groups, j, len(g) - 1))


def shortft_chain(model, student, sched, x_T, groups, stage=0):
    """x_0 of one ShortFT sample (PAPER.md Sec. 3): real segments up to `stage`, then per segment a
    shortcut jump to its edge and one base step at the edge. Differentiable into model's LoRA."""
    if not 0 <= stage < len(groups):
        raise UserError(f"progressive stage must be in [0, {len(groups)}), got {stage}")
    x = x_T  # (B, C, H, W), at the chain's first timestep
    for j in range(stage):
        x = real_segment(model, sched, x, groups, j, grad_last=False)  # earlier segments: no gradient
    x = real_segment(model, sched, x, groups, stage, grad_last=True)  # x at the first t of segment stage+1
    for j in range(stage + 1, len(groups)):
        g = groups[j]
        x = jump(student, sched, x, g[0], g[-1])  # the shortcut g[0] -> s_j: frozen, gradient through x
        x = base_step(model, sched, x, g[-1], next_t(groups, j, len(g) - 1))  # the base step at s_j
    return x  # (B, C, H, W) x_0


def merge_for_sampling(ft):
    """The same eps-predictor with each segment's LoRA stack merged into plain UNet weights: one UNet
    per segment (T-LoRA) or a single one, so inference costs what the base model costs."""
    if not lora_layers(ft.unet):  # full fine-tuning: nothing to merge
        return ft.unet
    if not ft.tlora:
        return merged(ft.unet, 1)
    unets = [merged(ft.unet, j + 1) for j in range(len(ft.groups))]
    return lambda x, t: unets[ft.stack(int(t[0])) - 1](x, t)


# --- the baselines: the same long DDIM-50 chain, differing only in where the gradient is cut ---------

def _step(model, sched, x, timesteps, i, grad=True, ckpt=False, sg_input=False):
    """Step i of a long chain; grad=False runs the UNet without a graph, ckpt recomputes it in backward,
    sg_input feeds the UNet sg(x_t) while the DDIM update itself keeps x_t (DRTune)."""
    t, s = timesteps[i], (timesteps[i + 1] if i + 1 < len(timesteps) else -1)
    t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)
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
        raise UserError(f"DRaFT-K needs 1 <= K <= {len(timesteps)} (the chain), got K = {K}")
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
        raise UserError(f"DRaFT-LV needs n >= 1 copies, got {n}")
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
        raise UserError(f"AlignProp's window needs 0 <= min <= max <= {len(timesteps)} (the chain), got {window}")
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
        raise UserError(f"DRTune needs 1 <= K <= {n} (the chain), got K = {K}")
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
