"""Stage `shortcut`: distil the DDPM into the few-step shortcut S(x_t, t -> s_j) by segment-wise
consistency distillation (Song et al. 2023, Algorithm 2, with the segment edge as the boundary; the
concept, loss and sampler are in consistency.py).

Reads <out_dir>/ddpm/ckpt.pt (the teacher). Writes <out_dir>/shortcut/ckpt.pt = {kind: "shortcut",
model, ema, target, opt, step, config, rng, edges, teacher, elapsed} (the resume checkpoint),
<out_dir>/shortcut/model.safetensors (the EMA student, the shortcut ShortFT uses, with the config and
edges in the metadata), <out_dir>/shortcut/samples_{step}.png (top half: teacher DDIM-50; bottom half:
the (k+1)-call shortcut sampler, same noise) and <out_dir>/shortcut/log.csv (step, loss, img/s).

    python train_shortcut.py --shortcut_steps=1000   # this stage alone (= python train_toy.py --stages=shortcut)
"""
import copy
import os
import time

import torch

import ddpm
from consistency import TeacherChains, cd_loss, segment_edges, shortcut_sample
from sftlib.common import (UserError, adam, bf16_autocast, ema_update, export_safetensors, file_sha256, load_checkpoint,
                           load_optimizer, memory_format, save_grid, set_rng_state)
from sftlib.data import DeviceBatches, load_cifar10
from sftlib.models import MODEL_KEYS, load_ddpm
from sftlib.stage import LEGACY, Stage, budget_spent, budget_text, run_alone, upstream


@torch.no_grad()  # sampling grids for a look: no gradients needed
def sample_grid(teacher, student, sched, x_T, edges, path):
    """Top half: the teacher's DDIM-50 samples; bottom half: the shortcut sampler on the same noise."""
    x_teacher = ddpm.ddim_sample(teacher, sched, x_T, ddpm.ddim_timesteps(sched.T, ddpm.N_CHAIN))  # (B, 3, 32, 32)
    save_grid(torch.cat([x_teacher, shortcut_sample(student, sched, x_T, edges)]), path)


def train(cfg, device):
    stage = Stage(cfg, "shortcut", kind="shortcut", steps="shortcut_steps", columns=("loss",))
    export = os.path.join(stage.out, "model.safetensors")  # written last: the stage is complete once it exists
    teacher_path = upstream(cfg["out_dir"], "ddpm", "the shortcut stage")  # a complete ddpm stage, or one line
    # provenance: the shortcut names the teacher it was distilled from by its export's bytes (a torch.save archive's
    # bytes also depend on the temporary file name it was written under)
    teacher_sha = file_sha256(os.path.join(os.path.dirname(teacher_path), "model.safetensors"))
    ckpt = stage.resume_or_skip(complete=lambda c: budget_spent(c["step"], c.get("elapsed", 0.0), cfg["shortcut_steps"],
                                                                cfg["shortcut_seconds"]) and os.path.isfile(export),
                                export=export)
    if ckpt is not None and ckpt.get("teacher_sha256", teacher_sha) != teacher_sha:  # older checkpoints: not recorded
        raise UserError(f"{stage.ckpt_path} was distilled from another teacher than {teacher_path} (its SHA-256 "
                        f"differs): move {stage.out} aside to distil the shortcut again from this one")
    if stage.skipped:
        return stage.ckpt_path
    steps, seconds = cfg["shortcut_steps"], cfg["shortcut_seconds"]  # on --resume, cfg is the checkpoint's config
    teacher, sched, teacher_cfg = load_ddpm(teacher_path, device)  # the DDPM's EMA weights
    teacher.requires_grad_(False)
    edges = segment_edges(sched.T, ddpm.N_CHAIN, cfg["k_segments"])
    # the student is the teacher's UNet (a teacher saved before a key existed ran with its LEGACY value)
    cfg.update({k: teacher_cfg.get(k, LEGACY.get(k)) for k in MODEL_KEYS})

    teacher.to(memory_format=memory_format(cfg, device))
    student = copy.deepcopy(teacher).requires_grad_(True)  # initialised from the teacher (Song et al. 2023)
    if cfg["shortcut_init"]:  # *choice* for ablations: re-segment a distilled shortcut (e.g. k = 4 -> 8) briefly
        init = load_checkpoint(cfg["shortcut_init"], "shortcut")
        try:
            student.load_state_dict(init["ema"])
        except RuntimeError:
            raise UserError(f"--shortcut_init={cfg['shortcut_init']} is a shortcut of another UNet than the teacher") from None
    opt = adam(student.parameters(), cfg["shortcut_lr"])
    step, elapsed = 0, 0.0
    if ckpt is not None:
        if list(ckpt["edges"]) != edges:
            raise UserError(f"cannot resume {stage.ckpt_path}: it was distilled with edges {ckpt['edges']}, not {edges}")
        student.load_state_dict(ckpt["model"])
        load_optimizer(opt, ckpt["opt"])  # this device's implementation and memory layout
        step, elapsed = ckpt["step"], ckpt["elapsed"]
    sched.clip_x0 = cfg["clip_x0"]  # teacher steps and jumps clip x0_hat as this run says (ddpm.py)
    target = copy.deepcopy(student).eval().requires_grad_(False)  # the target network phi^- of CD
    ema = copy.deepcopy(student).eval().requires_grad_(False)  # a slower average, the weights we sample
    if ckpt is not None:
        target.load_state_dict(ckpt["target"])
        ema.load_state_dict(ckpt["ema"])

    x, y = load_cifar10(cfg["data_root"], "train", cfg["n_train"], os.path.join(cfg["out_dir"], "cache"))
    data = DeviceBatches(x, y, device)
    print(f"[shortcut] k={cfg['k_segments']} segments, edges {edges}; {budget_text(steps, seconds)} of batch "
          f"{cfg['shortcut_batch']}, {cfg['cd_loss']} loss, {cfg['teacher_solver']} teacher, on {device}")
    g = torch.Generator().manual_seed(1234)  # fixed noise for the grids, the same after a resume
    x_T = torch.randn(cfg["grid_shortcut"], 3, 32, 32, generator=g).to(device)  # (grid_shortcut, 3, 32, 32)

    m = round(cfg["teacher_chain_frac"] * cfg["shortcut_batch"])  # batch rows on the teacher's own chains
    chains = TeacherChains(teacher, sched, m, device) if m > 0 else None
    if ckpt is not None:  # exact resume: the chains where they were, then the RNG as it was (after the
        if chains is not None and ckpt.get("chains") is not None:  # constructor's draws, which it replaces)
            chains.load_state_dict(ckpt["chains"])
        set_rng_state(ckpt["rng"])
    net = torch.compile(student) if cfg["compile"] and device.type == "cuda" else student
    autocast = bf16_autocast(cfg, device)
    if stage.start(step, total=steps if seconds <= 0 else None):
        # step 0: the student is still the teacher, so this grid shows the naive k-jump DDIM sampler
        sample_grid(teacher, ema, sched, x_T, edges, os.path.join(stage.out, "samples_0.png"))
    student.train()
    while not budget_spent(step, elapsed, steps, seconds):
        t0 = time.time()
        x0, _ = data.sample(cfg["shortcut_batch"] - m)  # (B - m, 3, 32, 32) in [-1, 1]
        with autocast:
            loss = cd_loss(net, target, teacher, sched, x0, edges, cfg["cd_loss"], cfg["teacher_solver"], chains)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg["shortcut_grad_clip"])
        opt.step()
        step += 1
        ema_update(target, student, cfg["cd_target_ema"])  # phi^- <- mu phi^- + (1 - mu) phi (Alg. 2)
        ema_update(ema, student, min(cfg["shortcut_ema"], (1 + step) / (10 + step)))  # with warmup, as the DDPM's
        if stage.due(step, cfg["log_every"]) and device.type == "cuda":
            torch.cuda.synchronize()  # the clock below counts the GPU's work, not only its queueing
        elapsed += time.time() - t0
        last = budget_spent(step, elapsed, steps, seconds)
        stage.tick(step, cfg["shortcut_batch"], "shortcut_lr", cfg["log_every"], last, loss=loss)  # read once per row
        if stage.due(step, cfg["shortcut_ckpt_every"], last):
            stage.save(model=student.state_dict(), ema=ema.state_dict(), target=target.state_dict(),
                       opt=opt.state_dict(), step=step, edges=edges, teacher=teacher_path, teacher_sha256=teacher_sha,
                       elapsed=elapsed,
                       chains=chains.state_dict() if chains is not None else None)
        if stage.due(step, cfg["sample_every"], last):
            sample_grid(teacher, ema, sched, x_T, edges, os.path.join(stage.out, f"samples_{step}.png"))
    stage.close()
    export_safetensors(ema.state_dict(), cfg, export, kind="shortcut",
                       edges=edges)
    print(f"[shortcut] done: {step} steps in {elapsed / 60:.1f} min of training; checkpoint {stage.ckpt_path}")
    return stage.ckpt_path


if __name__ == "__main__":
    run_alone(train, __doc__)
