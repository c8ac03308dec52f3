"""ShortFT on Stable Diffusion 1.5 (PAPER.md Sec. 3 and 5): the SD pieces that let shortft.py run unchanged
(the rewards on decoded images are in sftlib/sd_rewards.py, the fine-tuning stage in train_sd.py).

shortft.shortft_chain(model, student, sched, x_T, groups, phase) needs three things, built here:
- `sched`: SD 1.5's noise schedule in ddpm.py's interface (SDSchedule: .abar(t), .clip_x0, .T);
- `model`: the base UNet with trainable T-LoRA as an eps-predictor (SDFineTuned, a shortft.FineTuned);
- `student`: the same UNet with the frozen few-step LoRA (Hyper-SD / TCD / LCM-LoRA), SDFineTuned.shortcut.
One UNet carries every LoRA as a peft adapter: "shortcut" (frozen) and "lora1".."lorak" (T-LoRA,
LoRA j stacked on LoRA j-1 by switching on several adapters at once). The chain runs in SD's latent
space, x_T ~ N(0, I) of shape (B, 4, H/8, W/8); the reward sees the VAE-decoded image in [-1, 1].

Only the SD path imports this module; it needs the extras of requirements-sd.txt (diffusers,
transformers, peft), imported lazily where they are used so that importing this module stays light.
"""
import contextlib
import os

import torch
import torch.utils.checkpoint

import ddpm
from sftlib.common import UserError
from shortft import FineTuned, step_of

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the hub id of SD 1.5 (a mirror of runwayml's)
SHORTCUTS = {  # few-step LoRAs for SD 1.5 on the hub: name -> (repo, file)
    "hyper-sd": ("ByteDance/Hyper-SD", "Hyper-SD15-4steps-lora.safetensors"),  # the paper's shortcut
    "tcd": ("h1t/TCD-SD15-LoRA", "pytorch_lora_weights.safetensors"),
    "lcm": ("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors"),
}
LORA_TARGETS = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2"  # attention and feed-forward layers


class SDSchedule(ddpm.Schedule):
    """SD 1.5's "scaled_linear" schedule (T = 1000, beta_t = (sqrt(0.00085) + t / 999 (sqrt(0.012) -
    sqrt(0.00085)))^2) in ddpm.Schedule's interface, read from the diffusers scheduler's alphas_cumprod.
    No x0-clipping: latents are not bounded to [-1, 1] (diffusers' SD config: clip_sample=False). The
    chain's last step lands on x_0 (abar = 1) where diffusers' DDIM stops at abar_0 = 0.99915 (*choice*)."""

    def __init__(self, alphas_cumprod, device="cpu"):
        self.T, self.clip_x0 = len(alphas_cumprod), False
        self.alpha_bar = alphas_cumprod.float().to(device)  # (T,) \bar{alpha}_t
        prev = torch.cat([torch.ones(1, device=device), self.alpha_bar[:-1]])  # (T,) \bar{alpha}_{t-1}
        self.alpha = self.alpha_bar / prev  # (T,) alpha_t
        self.beta = 1 - self.alpha  # (T,) beta_t


# --- loading: the base pipeline and the shortcut LoRA ------------------------------------------------

def quiet():
    """Silence diffusers / transformers / peft chatter: progress bars, and the warnings they print about
    several adapters in one UNet and LoRA files without a text-encoder part, which are expected here."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity(50)  # CRITICAL: failures reach the user as one UserError line instead
        lib.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*(peft_config|kept in float32|LoRA keys|torch_dtype|now deleted).*")


def looks_local(path):
    """A path the user means as a folder or file on disk (not a hub id like org/name)."""
    return os.path.exists(path) or path.startswith(("/", ".", "~")) or path.count("/") > 1


def first_line(e, n=160):
    """An exception as one short line, for a UserError."""
    msg = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {msg[:n]}{'...' if len(msg) > n else ''}"


def check_sd_path(sd_path):
    """Fail fast, before the heavy imports, on a local --sd_path that holds no diffusers pipeline."""
    if looks_local(sd_path) and not os.path.isfile(os.path.join(os.path.expanduser(sd_path), "model_index.json")):
        raise UserError(f"--sd_path={sd_path}: no diffusers Stable Diffusion folder there (model_index.json "
                        f"missing); download SD 1.5 once (hf download {SD15} --local-dir DIR) "
                        f"and pass --sd_path=DIR")


def load_pipeline(sd_path, device, dtype=torch.float32):
    """The SD 1.5 pipeline (UNet, VAE, CLIP text encoder, tokenizer, scheduler), frozen, from a hub id or a
    local diffusers folder. Any failure is one UserError naming --sd_path."""
    check_sd_path(sd_path)
    sd_path = os.path.expanduser(sd_path)
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(sd_path, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except Exception as e:  # hub offline, gated, a torn download, a folder of another model: one clear line
        raise UserError(f"could not load Stable Diffusion from --sd_path={sd_path} ({first_line(e)}); "
                        f"offline? download it once where the hub is reachable and pass --sd_path=DIR") from None
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    return pipe.to(device)


def load_lora(pipe, spec, name, flag="--shortcut", weight_name=""):
    """A LoRA for SD 1.5 as the peft adapter `name` of pipe.unet, via diffusers' load_lora_weights. spec: a
    SHORTCUTS name, a hub id, a local folder or a local .safetensors file. A text-encoder part, if a LoRA
    has one, is not loaded (*choice*): the prompt embeddings stay the base model's."""
    src, weight = SHORTCUTS.get(spec, (spec, weight_name or None))
    if looks_local(src) and not os.path.exists(src):
        raise UserError(f"{flag}={spec}: no such file or folder")
    local = os.path.exists(src)
    if os.path.isfile(src):  # a single file: read it ourselves, whatever its name
        from safetensors.torch import load_file

        src, weight = load_file(src), None
    try:  # load_lora_weights minus its text-encoder half
        state, alphas, meta = pipe.lora_state_dict(src, weight_name=weight, return_lora_metadata=True)
        pipe.load_lora_into_unet(state, alphas, pipe.unet, adapter_name=name, metadata=meta, _pipeline=pipe)
    except Exception as e:
        if "size mismatch" in str(e) or "shape" in str(e):
            hint = "it was made for another base model (its shapes do not match this UNet); it must be a LoRA for SD 1.5"
        elif local:
            hint = "is it a LoRA for SD 1.5 (diffusers, kohya or peft format)?"
        else:
            hint = f"offline? download it and pass a local file: {flag}=PATH.safetensors"
        raise UserError(f"could not load the LoRA {flag}={spec} ({first_line(e)}); {hint}") from None
    if name not in getattr(pipe.unet, "peft_config", {}):
        raise UserError(f"{flag}={spec} holds no LoRA weights for this UNet: a LoRA for another base model? "
                        f"It must be a LoRA for SD 1.5")
    return pipe


def add_tlora(unet, k, rank, alpha, targets=LORA_TARGETS):
    """T-LoRA (PAPER.md Sec. 3): k trainable peft adapters lora1..lorak on the attention and feed-forward
    layers, B = 0 at the start (peft's default), so every stack starts as the base model."""
    from peft import LoraConfig

    names = [f"lora{j + 1}" for j in range(k)]
    for name in names:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets.split(","),
                                    init_lora_weights=True), adapter_name=name)
    return names


def adapter_state(unet, names):
    """{parameter name: parameter} of the peft adapters `names` (names like ...to_q.lora_A.<name>.weight)."""
    return {n: p for n, p in unet.named_parameters() if (".lora_A." in n or ".lora_B." in n) and n.split(".")[-2] in names}


def adapter_params(unet, name):
    """The parameters of one peft adapter."""
    return list(adapter_state(unet, [name]).values())


def activate(unet, names, trainable):
    """Run the UNet with the peft adapters `names` on (stacked: their LoRA updates add up). peft's
    set_adapters also makes every active adapter trainable; restore the trainable set right after.
    No names: a UNet without any adapter (sampling the base model), nothing to switch."""
    if not names:
        return
    unet.set_adapters(names)
    for n, p in unet.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            p.requires_grad_(n.split(".")[-2] in trainable)


# --- the eps-predictors for shortft.py ----------------------------------------------------------------

class SDFineTuned(FineTuned):
    """The SD UNet as shortft.py's eps-predictors, for one batch of prompts: called as model(x, t) it is
    the base model with the T-LoRA stack of t (FineTuned.stack: LoRAs 1..j from segment j's last timestep
    on); .shortcut(x, t) is the frozen few-step model. Both apply classifier-free guidance (Ho & Salimans
    2022, Eq. 6): eps = eps(x, t, "") + w (eps(x, t, c) - eps(x, t, "")); w = 1 is one conditional call.
    `trainable` is which adapters get gradient (set_phase); `grad_checkpoint` recomputes each UNet call
    in backward."""

    def __init__(self, unet, groups, names, tlora=True, guidance=7.5, shortcut_guidance=1.0,
                 grad_checkpoint=False, autocast=None):
        super().__init__(unet, groups, tlora)
        self.names, self.trainable = names, set(names)
        self.guidance, self.shortcut_guidance = guidance, shortcut_guidance
        self.grad_checkpoint, self.autocast = grad_checkpoint, autocast or contextlib.nullcontext  # bf16 on GPU
        self.cond = self.uncond = None  # (B, L, D) text embeddings, set per batch (set_prompts)

    def set_prompts(self, cond, uncond):
        self.cond, self.uncond = cond, uncond

    def __call__(self, x, t):
        """eps_theta(x_t, t) of the fine-tuned base model; t: (B,) with one value (a sampler's step)."""
        n = self.stack(step_of(t)) if self.tlora else len(self.names)
        return self.eps(x, t, self.names[:n], self.guidance)

    def shortcut(self, x, t):
        """eps of the frozen few-step model, for consistency.jump(S, sched, x_t, t, s)."""
        return self.eps(x, t, ["shortcut"], self.shortcut_guidance)

    def eps(self, x, t, adapters, w):
        if self.grad_checkpoint and torch.is_grad_enabled():
            # Checkpoint the whole call, adapter switch included: diffusers' own block checkpointing would
            # recompute in backward with whatever adapters are on *then* (the last ones switched on).
            return torch.utils.checkpoint.checkpoint(self._eps, x, t, adapters, w, use_reentrant=False)
        return self._eps(x, t, adapters, w)

    def _eps(self, x, t, adapters, w):
        activate(self.unet, adapters, self.trainable)
        x = x.to(self.unet.dtype)  # bf16 on GPU; the chain's own arithmetic (ddpm.ddim_step) stays fp32
        with self.autocast():
            if w == 1.0:
                return self.unet(x, t, encoder_hidden_states=self.cond).sample.float()  # (B, 4, h, w)
            both = self.unet(torch.cat([x, x]), torch.cat([t, t]),
                             encoder_hidden_states=torch.cat([self.uncond, self.cond])).sample.float()  # (2B, 4, h, w)
        eps_u, eps_c = both.chunk(2)  # (B, 4, h, w) each
        return eps_u + w * (eps_c - eps_u)  # (B, 4, h, w)


def set_phase(ft, phase):
    """P-Training, as shortft.set_phase: in phase i only LoRAs i..k-1 train (all of them without T-LoRA)."""
    ft.trainable = set(ft.names[phase:] if ft.tlora else ft.names)
    for name in ft.names:
        for p in adapter_params(ft.unet, name):
            p.requires_grad_(name in ft.trainable)


@torch.no_grad()  # the text encoder is frozen and nothing upstream of the prompts is trained
def encode(pipe, prompts):
    """CLIP text embeddings of the prompts and of the empty prompt: (B, 77, 768) each on SD 1.5."""
    cond, uncond = pipe.encode_prompt(list(prompts), pipe.unet.device, 1, True)
    return cond, uncond


def decode(vae, z, grad_checkpoint=False):
    """Latents (B, 4, H/8, W/8) -> images (B, 3, H, W) in [-1, 1], inside the graph: the reward's gradient
    reaches the chain through the VAE decoder. The clamp is the one diffusers applies when saving images."""
    def run(z):
        return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample.float().clamp(-1, 1)

    if grad_checkpoint and torch.is_grad_enabled():  # the decoder's activations at 512x512 are large
        return torch.utils.checkpoint.checkpoint(run, z, use_reentrant=False)
    return run(z)


# --- saving the trained LoRA in the diffusers format ------------------------------------------------

def save_lora(unet, names, out_dir):
    """Each adapter in its own folder out_dir/<name>/pytorch_lora_weights.safetensors, in diffusers' LoRA
    format (with its rank and alpha), so a stock pipeline loads it: pipe.load_lora_weights(out_dir/<name>)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    for name in names:
        state = {k: v.detach().float().cpu().contiguous()
                 for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}
        StableDiffusionPipeline.save_lora_weights(os.path.join(out_dir, name), unet_lora_layers=state,
                                                  unet_lora_adapter_metadata=unet.peft_config[name].to_dict())
