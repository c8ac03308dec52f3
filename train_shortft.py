"""Stage `shortft`: fine-tune the base DDPM against a reward through the shortcut chain (shortft.py).

Reads <out_dir>/ddpm/ckpt.pt (the base), <out_dir>/shortcut/ckpt.pt (the frozen shortcut) and the
reward's classifier. With --method=draft|draft_lv|alignprop|drtune|full the same loop runs a baseline's
long chain instead (baselines.py), and --method=shortft_naive the ShortFT chain with the frozen base
model's single DDIM step as the shortcut (the control); each writes under <out_dir>/<method>/:
ckpt.pt (the resume checkpoint), lora.safetensors (the LoRA weights alone, for sharing),
before_after.png (DDIM-50 samples of the base model, then of the fine-tuned one, from the same noise),
reward.png, log.csv and metrics.json (the held-out evaluator's scores before and after).

The loop is the paper's: x_T -> training chain -> x_0 -> reward -> backward -> clip -> step.
The comparison's measurements (a budget in seconds, scores along training, the chain gap, peak memory)
are benchmarks/ft_probe.py's, which runs this same loop.

    python train_shortft.py --method=draft    # this stage alone (= python train_toy.py --stages=shortft)
"""
import json
import math
import os
import time

import numpy as np
import torch

import ddpm
import tlora
from baselines import SHORT_CHAIN, method_chain
from rewards import reward_loss
from shortft import merge_for_sampling, ptrain_phase, set_phase
from sftlib.common import (UserError, adam, bf16_autocast, export_safetensors, file_sha256, load_checkpoint,
                           load_optimizer, plot_lines, save_grid, set_rng_state, write_text)
from sftlib.metrics import ddim50, evaluate_model
from sftlib.models import build_finetuned, load_ddpm, load_naive_shortcut, load_reward, load_shortcut
from sftlib.stage import Stage, run_alone, upstream


def training_chain(cfg, ft, student, sched, x_T, phase):
    """x_0 of the method's training chain (baselines.method_chain) with this run's settings."""
    return method_chain(cfg["method"], ft, student, sched, x_T, ft.groups, ddpm.ddim_timesteps(sched.T, ddpm.N_CHAIN),
                        phase, cfg["draft_k"], cfg["lv_n"], (cfg["alignprop_min"], cfg["alignprop_max"]),
                        cfg["drtune_k"], cfg["full_checkpoint"])


def phase_at(cfg, k, done):
    """P-Training's phase (shortft.ptrain_phase) once the fraction `done` of the budget is used; 0 without it."""
    if not cfg["progressive"] or cfg["method"] not in SHORT_CHAIN:
        return 0
    return ptrain_phase(k, done, cfg["ptrain_t1_phase"])


def train(cfg, device, probe=None):
    """The stage. probe (benchmarks/ft_probe.py): measurements around the loop, None in the pipeline."""
    out_name = cfg["method"]  # out/shortft, or out/draft, ... for a baseline
    # the complete upstream stages (never fine-tune from, or through, an unfinished one), or one line
    base_path, shortcut_path, _ = (upstream(cfg["out_dir"], name, "ShortFT") for name in ("ddpm", "shortcut", "evaluator"))
    stage = Stage(cfg, out_name, kind="shortft", steps="ft_steps")
    ckpt = stage.resume_or_skip(complete=lambda c: c["done"])  # done: saved after every output exists
    if stage.skipped:
        return stage.ckpt_path
    # the base and shortcut, named by their bytes: a resumed run must go on from the same ones
    base_sha, shortcut_sha = file_sha256(base_path), file_sha256(shortcut_path)
    shortcut_ckpt = load_checkpoint(shortcut_path, "shortcut")
    distilled_from = shortcut_ckpt.get("teacher_sha256")  # None: not recorded (older checkpoints)
    if distilled_from not in (None, file_sha256(os.path.join(cfg["out_dir"], "ddpm", "model.safetensors"))):
        raise UserError(f"the shortcut in {os.path.dirname(shortcut_path)} was distilled from another base model than "
                        f"{base_path}: distil it again from this one (move the shortcut folder aside, --stages=shortcut)")
    for key, sha, path in (("base_sha256", base_sha, base_path), ("shortcut_sha256", shortcut_sha, shortcut_path)):
        if ckpt is not None and ckpt.get(key) != sha:
            raise UserError(f"cannot resume {stage.ckpt_path}: {path} is not the model it was fine-tuned from "
                            f"(its SHA-256 differs)")

    student, _, _, edges = load_shortcut(shortcut_path, device, ckpt=shortcut_ckpt)
    if cfg["method"] in ("shortft_naive", "shortft_perfect"):  # the controls: the frozen base makes the jump
        student = load_naive_shortcut(base_path, device)
    reward = load_reward(cfg["reward"], cfg["out_dir"], device)
    ft, sched = build_finetuned(cfg, base_path, edges, device)
    if sched.clip_x0 and cfg["ft_clip_grad"] == "straight_through":
        sched.clip_x0 = "straight_through"  # the same chain values; clipped pixels pass gradient (ddpm.clip)
    k = len(ft.groups)
    params = [p for p in ft.unet.parameters() if p.requires_grad]
    opt = adam(params, cfg["ft_lr"])
    g = torch.Generator().manual_seed(4321)  # the fixed evaluation noise: same before and after
    x_eval = torch.randn(cfg["n_eval"], 3, 32, 32, generator=g).to(device)  # (n_eval, 3, 32, 32)
    step, history, train_s = 0, [], 0.0
    if ckpt is not None:
        ft.unet.load_state_dict(ckpt["unet"])
        load_optimizer(opt, ckpt["opt"])  # this device's implementation and memory layout
        set_rng_state(ckpt["rng"])
        step, before, train_s = ckpt["step"], ckpt["before"], ckpt["train_s"]
        history = [{("phase" if k == "stage" else k): v for k, v in h.items()} for h in ckpt["history"]]  # older: "stage"
    elif probe is not None:
        before = probe.before(ft, student, sched, x_eval, base_path)
    else:
        print(f"[shortft] scoring the base model: DDIM-50 samples of {cfg['n_eval']} fixed noises")
        before = evaluate_model(ft, sched, x_eval, cfg, device, cfg["fid_n"])[0]
    if probe is not None and ckpt is not None:
        probe.load(ckpt.get("probe") or dict(curve=ckpt.get("curve", [])))  # older checkpoints: the curve alone
    ft.unet.eval()  # no dropout while fine-tuning: the chain must be a deterministic function of x_T
    what = "full fine-tuning" if cfg["full_ft"] else f"LoRA rank {cfg['lora_rank']}"
    print(f"[shortft] {cfg['reward']}: {k} segments {[gr[-1] for gr in ft.groups]}, {what} "
          f"({sum(p.numel() for p in params) / 1e6:.3f}M trainable), T-LoRA {ft.tlora}, P-Training {cfg['progressive']}")

    autocast = bf16_autocast(cfg, device)  # the chain's network calls; the reward and the loss stay float32
    window = []  # the steps since the last read: (step, phase, seconds, [mean reward, grad norm, loss] on the device)
    log_every = cfg["log_every"]

    def flush():
        """Read the window's numbers back from the device at once (one sync per log_every steps and checkpoint,
        not five per step) into `history`; a NaN or infinite loss or gradient stops the run with one line. A step's
        ms: its own clock on the CPU; on a GPU, whose queue makes one step's clock meaningless, the window's mean,
        from the window's first step to the end of its work (synchronised here)."""
        nonlocal window_t0
        if not window:
            return
        if device.type == "cuda":
            torch.cuda.synchronize()
        mean_ms = 1000 * (time.time() - window_t0) / len(window)
        values = torch.stack([torch.stack(w[3]) for w in window]).tolist()  # (n, 3): reward, grad norm, loss
        for (s, phase, secs, _), (r, gn, loss) in zip(window, values):
            ms = secs * 1000 if device.type == "cpu" else mean_ms
            if not (math.isfinite(loss) and math.isfinite(gn)):
                raise UserError(f"[shortft] loss {loss} / grad norm {gn} at step {s}: stopped; the last good checkpoint "
                                f"is kept at {stage.ckpt_path}")
            history.append(dict(step=s, phase=phase, reward=r, grad_norm=gn, ms=ms))
        window.clear()
        window_t0 = None
        h = history[-1]
        if stage.bar is not None:
            stage.bar.set_postfix(reward=f"{h['reward']:.3f}", grad=f"{h['grad_norm']:.2f}", ms=f"{h['ms']:.0f}",
                                  phase=h["phase"])

    def save(done):
        flush()
        stage.save(unet=ft.unet.state_dict(), opt=opt.state_dict(), step=step, done=done, train_s=train_s,
                   before=before, history=history, base=os.path.abspath(base_path), base_sha256=base_sha,
                   shortcut=os.path.abspath(shortcut_path), shortcut_sha256=shortcut_sha, edges=list(edges),
                   probe=probe.state() if probe is not None else None)

    # the budget: ft_steps optimizer steps (a probe may set another, e.g. training seconds for equal compute)
    budget = probe.budget if probe is not None else (lambda step, train_s: step / cfg["ft_steps"])
    stage.start(step, total=cfg["ft_steps"] if probe is None else probe.total_steps())
    window_t0 = None  # when the window's first step began
    while (done := budget(step, train_s)) < 1:
        t0 = time.time()
        window_t0 = t0 if window_t0 is None else window_t0
        phase = phase_at(cfg, k, done)
        set_phase(ft, phase)  # P-Training: in phase i only LoRAs i..k-1 train
        x_T = torch.randn(cfg["ft_batch"], 3, 32, 32, device=device)  # (B, 3, 32, 32)
        with autocast:
            x0 = training_chain(cfg, ft, student, sched, x_T, phase)  # (B, 3, 32, 32); DRaFT-LV: (n B, ...)
        r = reward(x0.float())  # (B,) higher is better
        loss = cfg["ft_reward_scale"] * reward_loss(r)  # = -scale * mean reward
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["ft_grad_clip"])  # on the device, read in flush()
        opt.step()
        step += 1
        flush_due = probe is not None or step % log_every == 0
        if flush_due and device.type == "cuda":
            torch.cuda.synchronize()  # train_s counts the GPU's work, not only its queueing
        secs = time.time() - t0
        train_s += secs
        window.append((step, phase, secs, [r.detach().mean(), grad_norm.detach(), loss.detach()]))
        stage.tick(step, cfg["ft_batch"], "ft_lr", None)  # the bar; log.csv is written at the end
        if flush_due:
            flush()
        if probe is not None:
            probe.during(step, train_s, ft, student, sched, x_eval, phase, stage.say)
        if step % cfg["ft_ckpt_every"] == 0:
            save(done=False)
    stage.close()
    save(done=False)  # the final weights (flushed history); `done` only once every output below exists
    report(cfg, ft, sched, x_eval, before, history, stage.out, base_path, edges, device, probe, student)
    save(done=True)
    return stage.ckpt_path


def report(cfg, ft, sched, x_eval, before, history, out, base_path, edges, device, probe=None, student=None):
    """After training: the LoRA export, held-out scores after, the before/after grid, log.csv, metrics.json
    and the reward plot (and the probe's own outputs)."""
    if not cfg["full_ft"]:
        export_safetensors(tlora.lora_state(ft.unet), cfg, os.path.join(out, "lora.safetensors"), kind="lora",
                           base=base_path, edges=list(edges))
    after, x_after = evaluate_model(merge_for_sampling(ft), sched, x_eval, cfg, device, cfg["fid_n"])
    x_before = ddim50(load_ddpm(base_path, device)[0], sched, x_eval[:cfg["grid_ft"]], cfg["sample_batch"], cfg["bf16"])
    save_grid(torch.cat([x_before, x_after[:cfg["grid_ft"]]]), os.path.join(out, "before_after.png"))
    write_text(os.path.join(out, "log.csv"), "step,phase,reward,grad_norm,ms\n" + "".join(
        f"{h['step']},{h['phase']},{h['reward']:.5f},{h['grad_norm']:.4f},{h['ms']:.1f}\n" for h in history))
    ms = float(np.median([h["ms"] for h in history])) if history else float("nan")
    metrics = dict(method=cfg["method"], reward=cfg["reward"], steps=len(history), ms_per_step_median=ms,
                   device=str(device), before=before, after=after)
    if probe is not None:
        metrics.update(probe.finish(ft, student, sched, x_eval, x_after, before, after, history, out))
    write_text(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1))
    plot_lines({"batch reward": ([h["step"] for h in history], [h["reward"] for h in history])},
               os.path.join(out, "reward.png"), "step", "reward")
    print(f"[shortft] done: {len(history)} steps, median {ms:.0f} ms/step; metrics in {out}/metrics.json")


if __name__ == "__main__":
    run_alone(train, __doc__)
