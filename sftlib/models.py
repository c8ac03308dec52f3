"""Loading the models the stages write, for the later stages and for sampling: the base DDPM, the
shortcut (its distilled student), the fine-tuned base model (base + LoRA) and the reward."""
import os

import ddpm
import rewards
import tlora
from baselines import SHORT_CHAIN
from sftlib.common import UserError, file_sha256, load_checkpoint
from sftlib.nets import load_classifier
from shortft import FineTuned, merge_for_sampling, segment_groups
from unet import build_unet

# the config keys that decide the shape of the UNet: a resumed run must not change them
MODEL_KEYS = ("T", "beta_1", "beta_T", "ch", "ch_mult", "num_res_blocks", "attn_res", "dropout", "eps_skip")


def schedule_of(cfg, device):
    """The noise schedule a checkpoint's config describes (x0-clipping as it was trained with)."""
    return ddpm.Schedule(cfg["T"], cfg["beta_1"], cfg["beta_T"], device, cfg.get("clip_x0", True))


def unet_from(ckpt, path, weights):
    """The UNet ckpt["config"] describes, with ckpt[weights] loaded; weights of another shape: one line naming path."""
    model = build_unet(ckpt["config"])
    try:
        model.load_state_dict(ckpt[weights])
    except RuntimeError:
        raise UserError(f"{path}: weights do not match the UNet its config describes") from None
    return model


def load_ddpm(path, device, use_ema=True):
    """(model, schedule, config) from a DDPM checkpoint; the EMA weights unless use_ema=False."""
    ckpt = load_checkpoint(path, "ddpm")
    model = unet_from(ckpt, path, "ema" if use_ema else "model")
    return model.to(device).eval(), schedule_of(ckpt["config"], device), ckpt["config"]


def load_shortcut(path, device, use_ema=True, ckpt=None):
    """(student, schedule, config, edges) from a shortcut checkpoint: frozen and in eval mode, ready to
    be used as the shortcut inside a fine-tuning chain. The EMA weights unless use_ema=False. The
    schedule clips x0_hat (or not) as during distillation: jump with it to stay on that trajectory.
    ckpt: the checkpoint already read from `path` (not read again)."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(path, "shortcut")
    student = unet_from(ckpt, path, "ema" if use_ema else "model")
    return (student.to(device).eval().requires_grad_(False), schedule_of(ckpt["config"], device), ckpt["config"],
            list(ckpt["edges"]))


def load_naive_shortcut(base_path, device):
    """The naive-shortcut control (method shortft_naive): the frozen base DDPM itself (EMA weights, no
    LoRA) stands in for the distilled student, so each jump t -> s_j is one DDIM step of the untuned base
    over the whole segment (consistency.jump). It isolates what distillation buys."""
    return load_ddpm(base_path, device)[0].requires_grad_(False)  # frozen: the gradient passes through its input only


def build_finetuned(cfg, base_path, shortcut_edges, device):
    """The base UNet (EMA weights) with LoRA (or fully trainable), wrapped as a FineTuned eps-predictor."""
    unet, sched, _ = load_ddpm(base_path, device)
    groups = segment_groups(ddpm.ddim_timesteps(sched.T, ddpm.N_CHAIN), list(shortcut_edges))
    use_tlora = cfg["tlora"] and not cfg["full_ft"] and cfg["method"] in SHORT_CHAIN  # the baselines train one plain LoRA
    if cfg["full_ft"]:
        unet.requires_grad_(True)
    else:
        tlora.add_lora(unet, cfg["lora_rank"], cfg["lora_alpha"], len(groups) if use_tlora else 1, cfg["lora_targets"])
        unet.to(device)
    return FineTuned(unet, groups, tlora=use_tlora), sched


def load_finetuned(path, device):
    """(eps-predictor with merged weights, schedule) from a shortft checkpoint, for `sample`."""
    ckpt = load_checkpoint(path, "shortft")
    ft, sched = build_finetuned(ckpt["config"], base_of(path, ckpt), ckpt["edges"], device)
    try:
        ft.unet.load_state_dict(ckpt["unet"])
    except RuntimeError:
        raise UserError(f"{path}: its weights do not match the base model and LoRA its config describes") from None
    return merge_for_sampling(ft), sched


def base_of(path, ckpt):
    """The base DDPM checkpoint a shortft checkpoint was fine-tuned from, found by its SHA-256: the
    ddpm/ckpt.pt beside the checkpoint's run folder (a moved or copied run), else the absolute path it
    recorded; never a path relative to where the command runs. Another base is refused."""
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "ddpm", "ckpt.pt")
    found = [p for p in dict.fromkeys((beside, ckpt["base"])) if os.path.isabs(p) and os.path.isfile(p)]
    for p in found:
        if file_sha256(p) == ckpt["base_sha256"]:
            return p
    if found:
        raise UserError(f"{path} was fine-tuned from another base model than {' or '.join(found)} (SHA-256 differs): "
                        f"put its base at {beside}")
    raise UserError(f"the base model of {path} is missing: expected it at {beside} (or {ckpt['base']})")


def load_reward(spec, out_dir, device):
    """rewards.build_reward with the pipeline's reward classifier (<out_dir>/classifier/ckpt.pt) loaded
    when the spec has a classifier term."""
    net = None
    if rewards.needs_classifier(spec):
        path = os.path.join(out_dir, "classifier", "ckpt.pt")
        if not os.path.isfile(path):
            raise UserError(f"the classifier reward needs {path}: train it first with "
                            f"python train_toy.py --stages=classifier --out_dir={out_dir}")
        net = load_classifier(path, device, "classifier")
    return rewards.build_reward(spec, net)
