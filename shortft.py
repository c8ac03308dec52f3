"""ShortFT: reward fine-tuning of the base DDPM through the shortcut chain (PAPER.md Sec. 2-3).

The DDIM-50 chain 981, 961, ..., 1 is split into the shortcut's k segments; their last timesteps are
the edges s_j (k = 4: 761, 501, 261, 1). One ShortFT sample, as in the diagram of PAPER.md Sec. 3:

    x_T --(base DDIM steps 981..761, LoRA 1)--> x_741
        --[shortcut 741->501]--> x_501 --(base step at 501, LoRA 1+2)--> x_481
        --[shortcut 481->261]--> x_261 --(base step at 261, LoRA 1+2+3)--> x_241
        --[shortcut 241->1  ]--> x_1   --(base step at 1, LoRA 1+2+3+4)--> x_0 --> r(x_0)

- The shortcut (consistency.py, trained by train_shortcut.py) is frozen; the gradient passes through its input x_t.
- The gradient reaches the base model's trainable LoRA through 2k - 1 network calls instead of 50 (7 for k = 4).
- Timestep-aware LoRA (T-LoRA): k LoRAs, LoRA j stacked on LoRA j-1 (tlora.py), used from its
  segment's last timestep on (FineTuned.stack); the same rule holds at inference.
- Progressive training (P-Training): k phases; in phase i (0-based here) LoRAs i..k-1 train,
  segments 0..i run the real base chain, only segment i's last step carries gradient (truncated
  backprop), and shortcuts stand in only after segment i. Phase 0 is the diagram above.
- *Choice*: the trainable LoRA is not inside the shortcut network (PAPER.md leaves this open).
Samples for evaluation always come from the fine-tuned base model's long chain (DDIM-50). The
baselines (DRaFT-K, DRaFT-LV, AlignProp, DRTune, full backprop) are in baselines.py.
"""
import torch
import torch.utils.checkpoint

import ddpm
from consistency import jump
from tlora import lora_layers, lora_params, merged, set_active


def segment_groups(timesteps, edges):
    """Split a descending chain of timesteps into segments that each end at an edge:
    981..1 with edges [761, 501, 261, 1] -> [[981..761], [741..501], [481..261], [241..1]]."""
    if edges[-1] != timesteps[-1] or not set(edges) <= set(timesteps):
        raise ValueError(f"edges {edges} must lie on the chain and end at its last timestep {timesteps[-1]}")
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
            set_active(self.unet, self.stack(step_of(t)))
        return self.unet(x, t)

    def stack(self, t):
        """How many LoRAs are on at timestep t: the edges at or above t, at least one."""
        return max(1, sum(e >= t for e in self.edges))


def step_of(t):
    """The int timestep of a sampler's (B,) input: the one ddpm.t_batch attached, else read from the tensor."""
    return t.step if hasattr(t, "step") else int(t[0])


def set_phase(ft, phase):
    """P-Training: in phase i only LoRAs i..k-1 train. Without this, LoRA j < i would still get
    gradient, since it stays on (stacked) in every later segment."""
    if ft.tlora:
        for j in range(len(ft.groups)):
            for p in lora_params(ft.unet, j):
                p.requires_grad_(j >= phase)


def ptrain_phase(k, done, t1_phase=False):
    """P-Training's phase (0-based) once the fraction `done` of the fine-tuning budget is used.

    *Choices*: the budget is split into equal parts (equal optimizer steps; with a budget in seconds,
    equal seconds, so the later phases, whose steps run more real steps, get fewer steps).
    The last phase (k - 1) is skipped unless t1_phase: there only LoRA k trains, and only its call at
    t = 1 carries gradient, where x_0 = (x_1 - sqrt(1 - abar_1) eps) / sqrt(abar_1) moves by about
    0.015 of eps's change (sqrt(1 - abar_1) / sqrt(abar_1) ~ 0.0148 for the linear schedule): a phase
    that cannot change the image. LoRA k still trains in every other phase, since it is on at t = 1 in every chain."""
    n = k if t1_phase or k == 1 else k - 1
    return min(n - 1, int(done * n))


def base_step(model, sched, x, t, s):
    """One DDIM step of the (fine-tuned) base model from t to s (Song et al. 2021, Eq. 12, eta = 0)."""
    return ddpm.ddim_step(sched, x, model(x, ddpm.t_batch(t, x)), t, s)


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
    with torch.no_grad():  # a segment before the phase's own: no gradient at all
        return base_step(model, sched, x, g[-1], next_t(groups, j, len(g) - 1))


def perfect_jump(base, sched, x, segment):
    """What a perfect shortcut would give (the control `shortft_perfect`): in place of the jump
    segment[0] -> segment[-1], the frozen base model's own DDIM steps over the segment, gradient through
    their inputs x_t only. Each call is checkpointed (recomputed in backward), so memory stays that of
    the short chain while the compute is that of full backprop over these steps."""
    for t, s in zip(segment[:-1], segment[1:]):
        x = torch.utils.checkpoint.checkpoint(base_step, base, sched, x, t, s, use_reentrant=False)
    return x


def shortft_chain(model, student, sched, x_T, groups, phase=0, perfect=False):
    """x_0 of one ShortFT sample (PAPER.md Sec. 3): real segments up to `phase` (P-Training), then per
    segment a shortcut jump to its edge and one base step at the edge. Differentiable into model's LoRA.
    perfect: `student` is the frozen base model and each jump is its real DDIM steps (perfect_jump)."""
    if not 0 <= phase < len(groups):
        raise ValueError(f"P-Training phase must be in [0, {len(groups)}), got {phase}")
    x = x_T  # (B, C, H, W), at the chain's first timestep
    for j in range(phase):
        x = real_segment(model, sched, x, groups, j, grad_last=False)  # earlier segments: no gradient
    x = real_segment(model, sched, x, groups, phase, grad_last=True)  # x at the first t of segment phase+1
    for j in range(phase + 1, len(groups)):
        g = groups[j]
        if perfect:
            x = perfect_jump(student, sched, x, g)  # the base's real steps g[0] -> s_j: frozen, gradient through x
        else:
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
    return lambda x, t: unets[ft.stack(step_of(t)) - 1](x, t)
