"""Stage `shortft`: fine-tune the base DDPM against a reward through the shortcut chain (shortft.py).

Reads <out_dir>/ddpm/ckpt.pt (the base), <out_dir>/shortcut/ckpt.pt (the frozen shortcut) and the
reward's classifier. With --method=draft|draft_lv|alignprop|drtune|full the same loop runs a baseline's
long chain instead (shortft.py), and --method=shortft_naive the ShortFT chain with the frozen base model's
single DDIM step as the shortcut (the control); each writes under <out_dir>/<method>/. Writes <out_dir>/shortft/:
ckpt.pt (kind "shortft": {unet, opt, step, config, rng, before, history, ...}, the resume checkpoint),
lora.safetensors (the LoRA weights alone, with the config, base and edges in the metadata: for
sharing), before_after.png (DDIM-50 samples of
the base model, then of the fine-tuned one, from the same noise), reward.png (reward vs step),
log.csv, eval.csv (held-out scores at the start, every --ft_eval_every steps or --ft_eval_every_s training
seconds, and at the end) and
metrics.json (held-out evaluator, Fréchet distance and diversity before/after).

    python train_shortft.py --method=draft    # this stage alone (= python train_toy.py --stages=shortft)
"""
import hashlib
import json
import math
import os
import re
import resource
import time

import numpy as np
import torch

import ddpm
from ddpm import N_CHAIN  # fine-tune through DDIM-50; evaluate on DDIM-50 of the fine-tuned base model
from rewards import build_reward, parse_reward_spec, reward_loss
from shortft import ptrain_stage as shortft_ptrain_stage
from shortft import (alignprop_chain, draft_chain, draft_lv_chain, drtune_chain, full_chain, merge_for_sampling,
                     set_stage, shortft_chain)
from sftlib import lora
from sftlib.common import (UserError, export_safetensors, file_sha256, plot_lines, save_grid, set_rng_state, to_uint8,
                           write_text)
from sftlib.metrics import evaluate_samples, inception_metrics
from sftlib.models import build_finetuned, load_ddpm, load_naive_shortcut, load_shortcut
from sftlib.stage import Stage, run_alone


@torch.no_grad()  # evaluation samples: no graph
def ddim50(model, sched, x_T, batch=256):
    return torch.cat([ddpm.ddim_sample(model, sched, x_T[i:i + batch], ddpm.ddim_timesteps(sched.T, N_CHAIN))
                      for i in range(0, len(x_T), batch)])  # (N, 3, 32, 32)


def evaluate(model, sched, x_T, cfg, device, fid_n=0):
    """Held-out metrics of the DDIM-50 samples of `model` from the fixed noise x_T (sftlib/metrics.py);
    fid_n > 0: Inception FID and KID first, of fid_n samples (x_T's, then more fixed noise)."""
    x0 = ddim50(model, sched, x_T, cfg["sample_batch"])
    target = re.search(r"classifier:(\w+)", cfg["reward"])
    m = evaluate_samples(to_uint8(x0), cfg["out_dir"], device, target=target.group(1) if target else None,
                         reward=cfg["reward"])
    if fid_n > 0:
        x_fid = x0[:fid_n]
        if fid_n > len(x0):  # more DDIM-50 samples, of fixed noise too
            g = torch.Generator().manual_seed(8765)
            x_fid = torch.cat([x0, ddim50(model, sched, torch.randn(fid_n - len(x0), 3, 32, 32, generator=g).to(device),
                                            cfg["sample_batch"])])
        m = {**inception_metrics(to_uint8(x_fid), cfg["out_dir"], device, ref_n=cfg["fid_ref_n"]), **m}
    return m, x0


METHODS = ("shortft", "shortft_naive", "draft", "draft_lv", "alignprop", "drtune", "full")


def method_chain(cfg, ft, student, sched, x_T, stage):
    """x_0 of the method's training chain: ShortFT's short chain, or a baseline's long DDIM-50 chain."""
    method, steps = cfg["method"], ddpm.ddim_timesteps(sched.T, N_CHAIN)
    if method in ("shortft", "shortft_naive"):  # shortft_naive: `student` is the frozen base (load_naive_shortcut)
        return shortft_chain(ft, student, sched, x_T, ft.groups, stage)
    if method == "draft":
        return draft_chain(ft, sched, x_T, steps, cfg["draft_k"])
    if method == "draft_lv":
        return draft_lv_chain(ft, sched, x_T, steps, cfg["lv_n"])
    if method == "alignprop":  # AlignProp's random truncation: the cut drawn anew at every step
        return alignprop_chain(ft, sched, x_T, steps, (cfg["alignprop_min"], cfg["alignprop_max"]))
    if method == "drtune":
        return drtune_chain(ft, sched, x_T, steps, cfg["drtune_k"])
    return full_chain(ft, sched, x_T, steps, cfg["full_checkpoint"])


def check_method(cfg):
    if cfg["method"] not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}; got {cfg['method']!r}")
    if not 1 <= cfg["draft_k"] <= N_CHAIN:
        raise UserError(f"--draft_k must be in [1, {N_CHAIN}] (the DDIM-{N_CHAIN} chain), got {cfg['draft_k']}")
    if cfg["lv_n"] < 1:
        raise UserError(f"--lv_n must be at least 1, got {cfg['lv_n']}")
    if not 0 <= cfg["alignprop_min"] <= cfg["alignprop_max"] <= N_CHAIN:
        raise UserError(f"AlignProp's window needs 0 <= --alignprop_min <= --alignprop_max <= {N_CHAIN}, "
                        f"got ({cfg['alignprop_min']}, {cfg['alignprop_max']})")
    if not 1 <= cfg["drtune_k"] <= N_CHAIN:
        raise UserError(f"--drtune_k must be in [1, {N_CHAIN}] (the DDIM-{N_CHAIN} chain), got {cfg['drtune_k']}")
    parse_reward_spec(cfg["reward"])  # a typo in --reward fails here, before any checkpoint is read


def ptrain_stage(cfg, k, done):
    """P-Training's stage (shortft.ptrain_stage) at `done`, the fraction of the budget used; 0 without it."""
    if not cfg["progressive"] or cfg["method"] not in ("shortft", "shortft_naive"):
        return 0
    return shortft_ptrain_stage(k, done, cfg["ptrain_t1_stage"])


@torch.no_grad()  # a measurement, no training
def chain_gap(cfg, ft, student, sched, x_T, x0_real, stage):
    """What P-Training exists to shrink: the mean squared distance between the training chain's x_0
    (ShortFT's short chain at `stage`, the fine-tuned base inside it) and the fine-tuned base model's
    real DDIM-50 x_0 from the same noise x_T. NaN for the long-chain baselines (their chain is the real one)."""
    if cfg["method"] not in ("shortft", "shortft_naive"):
        return float("nan")
    return float((shortft_chain(ft, student, sched, x_T, ft.groups, stage) - x0_real).pow(2).mean())


N_GAP = 16  # samples behind chain_gap


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (Linux: KiB)


def base_scores(ft, sched, x_eval, cfg, base_path, device):
    """The base model's held-out scores (the LoRA starts at zero, so ft is the base): the same for every
    method and seed, so they are cached beside the base checkpoint, valid while its inputs stay the same."""
    stamp = [cfg["reward"], cfg["n_eval"], os.path.getmtime(base_path),
             os.path.getmtime(os.path.join(cfg["out_dir"], "evaluator", "ckpt.pt"))]
    if cfg["fid_n"] > 0:  # scores with Inception FID: a cache of their own
        stamp += [cfg["fid_n"], cfg["fid_ref_n"]]
    cache = os.path.join(os.path.dirname(base_path), "before_" + hashlib.sha1(str(stamp).encode()).hexdigest()[:10] + ".json")
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    print(f"[shortft] evaluating the base model: DDIM-50 samples of {cfg['n_eval']} fixed noises")
    before, _ = evaluate(ft, sched, x_eval, cfg, device, cfg["fid_n"])
    write_text(cache, json.dumps(before))
    return before


def train(cfg, device):
    out_name = cfg["method"]  # out/shortft, or out/draft, ... for a baseline
    base_path = os.path.join(cfg["out_dir"], "ddpm", "ckpt.pt")
    shortcut_path = os.path.join(cfg["out_dir"], "shortcut", "ckpt.pt")
    check_method(cfg)
    evaluator_path = os.path.join(cfg["out_dir"], "evaluator", "ckpt.pt")  # the held-out judge of before/after
    for path, name in ((base_path, "ddpm"), (shortcut_path, "shortcut"), (evaluator_path, "classifier")):
        if not os.path.isfile(path):
            raise UserError(f"ShortFT needs {path}: run the {name} stage first (--stages={name})")
    stage = Stage(cfg, out_name, kind="shortft", steps="ft_steps")
    ckpt = stage.resume_or_skip(complete=lambda c: c["done"])  # done: saved after every output exists
    if stage.skipped:
        return stage.ckpt_path
    # the base and shortcut, named by their bytes: a resumed run must go on from the same ones
    base_sha, shortcut_sha = file_sha256(base_path), file_sha256(shortcut_path)
    for key, sha, path in (("base_sha256", base_sha, base_path), ("shortcut_sha256", shortcut_sha, shortcut_path)):
        if ckpt is not None and ckpt.get(key) != sha:
            raise UserError(f"cannot resume {stage.ckpt_path}: {path} is not the model it was fine-tuned from "
                            f"(its SHA-256 differs)")

    student, _, _, edges = load_shortcut(shortcut_path, device)
    if cfg["method"] == "shortft_naive":  # the control: the same segments, the base's one DDIM step as the jump
        student = load_naive_shortcut(base_path, device)
    reward = build_reward(cfg["reward"], cfg["out_dir"], device)
    ft, sched = build_finetuned(cfg, base_path, edges, device)
    if sched.clip_x0 and cfg["ft_clip_grad"] == "straight_through":
        sched.clip_x0 = "straight_through"  # the same chain values; clipped pixels pass gradient (ddpm.clip)
    k = len(ft.groups)
    params = [p for p in ft.unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg["ft_lr"])
    g = torch.Generator().manual_seed(4321)  # the fixed evaluation noise: same before and after
    x_eval = torch.randn(cfg["n_eval"], 3, 32, 32, generator=g).to(device)  # (n_eval, 3, 32, 32)
    step, history, curve, train_s = 0, [], [], 0.0
    if ckpt is not None:
        ft.unet.load_state_dict(ckpt["unet"])
        opt.load_state_dict(ckpt["opt"])
        set_rng_state(ckpt["rng"])
        step, history, before, train_s, curve = ckpt["step"], ckpt["history"], ckpt["before"], ckpt["train_s"], ckpt["curve"]
    else:
        before = base_scores(ft, sched, x_eval, cfg, base_path, device)
        before["chain_gap"] = chain_gap(cfg, ft, student, sched, x_eval[:N_GAP],
                                        ddim50(ft, sched, x_eval[:N_GAP], cfg["sample_batch"]), 0)
    ft.unet.eval()  # no dropout while fine-tuning: the chain must be a deterministic function of x_T
    what = "full fine-tuning" if cfg["full_ft"] else f"LoRA rank {cfg['lora_rank']}"
    print(f"[shortft] {cfg['reward']}: {k} segments {[gr[-1] for gr in ft.groups]}, {what} "
          f"({sum(p.numel() for p in params) / 1e6:.3f}M trainable), T-LoRA {ft.tlora}, progressive {cfg['progressive']}")

    def save(done):
        stage.save(unet=ft.unet.state_dict(), opt=opt.state_dict(), step=step, done=done, train_s=train_s,
                   before=before, history=history, curve=curve, base=os.path.abspath(base_path), base_sha256=base_sha,
                   shortcut=os.path.abspath(shortcut_path), shortcut_sha256=shortcut_sha, edges=list(edges))

    # the budget: ft_steps steps, or ft_seconds of training time when that is set (equal compute)
    budget = (lambda: train_s / cfg["ft_seconds"]) if cfg["ft_seconds"] > 0 else (lambda: step / cfg["ft_steps"])
    stage.start(step, total=cfg["ft_steps"] if cfg["ft_seconds"] <= 0 else None)
    while budget() < 1:
        t0 = time.time()
        p_stage = ptrain_stage(cfg, k, budget())
        set_stage(ft, p_stage)  # in stage i only LoRAs i..k-1 train
        x_T = torch.randn(cfg["ft_batch"], 3, 32, 32, device=device)  # (B, 3, 32, 32)
        x0 = method_chain(cfg, ft, student, sched, x_T, p_stage)  # (B, 3, 32, 32), DRaFT-LV: (n B, ...)
        r = reward(x0)  # (B,) higher is better
        loss = cfg["ft_reward_scale"] * reward_loss(r)  # = -scale * mean reward
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg["ft_grad_clip"]))
        if not (math.isfinite(loss.item()) and math.isfinite(grad_norm)):
            raise UserError(f"[shortft] loss {loss.item()} / grad norm {grad_norm} at step {step + 1}: "
                            f"stopped; the last good checkpoint is kept at {stage.ckpt_path}")
        opt.step()
        step += 1
        ms = (time.time() - t0) * 1000
        train_s += ms / 1000
        history.append(dict(step=step, stage=p_stage, reward=r.mean().item(), grad_norm=grad_norm, ms=ms))
        stage.tick(step, cfg["ft_batch"], "ft_lr", None, loss=loss.item())  # log.csv is written at the end
        stage.bar.set_postfix(reward=f"{r.mean().item():.3f}", grad=f"{grad_norm:.2f}", ms=f"{ms:.0f}", stage=p_stage)
        due = (cfg["ft_eval_every"] > 0 and step % cfg["ft_eval_every"] == 0) or \
            (cfg["ft_eval_every_s"] > 0 and train_s >= (len(curve) + 1) * cfg["ft_eval_every_s"])
        if due and budget() < 1:
            m, x0_eval = evaluate(merge_for_sampling(ft), sched, x_eval, cfg, device)
            m["chain_gap"] = chain_gap(cfg, ft, student, sched, x_eval[:N_GAP], x0_eval[:N_GAP], p_stage)
            curve.append(point(step, train_s, m))
            stage.say(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in curve[-1].items()
                                                    if k not in ("step", "train_s")))
        if step % cfg["ft_ckpt_every"] == 0:
            save(done=False)
    stage.close()
    save(done=False)  # the final weights; `done` only once every output below exists
    report(cfg, ft, student, sched, x_eval, before, history, curve, train_s, stage.out, base_path, edges, device)
    save(done=True)
    return stage.ckpt_path


def report(cfg, ft, student, sched, x_eval, before, history, curve, train_s, out, base_path, edges, device):
    """After training: the LoRA export, held-out scores after, eval.csv, the before/after grid, log.csv,
    metrics.json and the reward plot."""
    if not cfg["full_ft"]:
        export_safetensors(lora.lora_state(ft.unet), cfg, os.path.join(out, "lora.safetensors"), kind="lora",
                           base=base_path, edges=list(edges))
    step = len(history)
    after, x_after = evaluate(merge_for_sampling(ft), sched, x_eval, cfg, device, cfg["fid_n"])
    after["chain_gap"] = chain_gap(cfg, ft, student, sched, x_eval[:N_GAP], x_after[:N_GAP],
                                   history[-1]["stage"] if history else 0)
    curve = [point(0, 0.0, before)] + curve + [point(step, train_s, after)]
    write_text(os.path.join(out, "eval.csv"),  # held-out scores along the run (--ft_eval_every)
               ",".join(curve[0]) + "\n" + "".join(",".join(f"{v:.5g}" for v in c.values()) + "\n" for c in curve))
    x_before = ddim50(load_ddpm(base_path, device)[0], sched, x_eval[:cfg["grid_ft"]], cfg["sample_batch"])
    save_grid(torch.cat([x_before, x_after[:cfg["grid_ft"]]]), os.path.join(out, "before_after.png"))
    write_text(os.path.join(out, "log.csv"), "step,stage,reward,grad_norm,ms\n" + "".join(
        f"{h['step']},{h['stage']},{h['reward']:.5f},{h['grad_norm']:.4f},{h['ms']:.1f}\n" for h in history))
    ms = np.median([h["ms"] for h in history])
    metrics = dict(method=cfg["method"], reward=cfg["reward"], steps=step, ms_per_step_median=float(ms),
                   peak_memory_mib=peak_memory_mib(device), device=str(device), before=before, after=after,
                   curve=curve)
    write_text(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1))
    plot_rewards(history, os.path.join(out, "reward.png"))
    print(f"[shortft] done: {step} steps, median {ms:.0f} ms/step; metrics in {out}/metrics.json")


def point(step, train_s, m):
    """One row of eval.csv: where the run is, and the held-out scores of its DDIM-50 samples there."""
    return dict(step=step, train_s=train_s, reward=m.get("reward_mean", float("nan")),
                target_rate=m.get("evaluator_target_rate", float("nan")), fd=m["fd"], diversity=m.get("diversity", float("nan")),
                fd_matched=m.get("fd_matched", float("nan")), fd_target=m.get("fd_target", float("nan")),
                diversity_target=m.get("diversity_target", float("nan")), chain_gap=m.get("chain_gap", float("nan")))


def plot_rewards(history, path):
    """Training reward (and its running mean) against the step, as a PNG."""
    plot_lines({"batch reward": ([h["step"] for h in history], [h["reward"] for h in history])}, path, "step", "reward")


if __name__ == "__main__":
    run_alone(train, __doc__)
