"""The entry point: the whole toy pipeline on CIFAR-10, and sampling from saved checkpoints; with
--model=sd15 the same stages' counterparts on Stable Diffusion 1.5 (train_sd.py).

    python train_toy.py                      # run every stage (skips stages whose checkpoint is complete)
    python train_toy.py --model=sd15 --sd_path=DIR   # SD 1.5: load base + few-step LoRA, reward, ShortFT, grids
    python train_toy.py --model=sd15 --help  # the SD model's keys (its own defaults: the paper's GPU run)
    python train_toy.py --ddpm_steps=2000    # any key of sftlib/config.py's DEFAULTS, as --key=value
    python train_toy.py --help               # every key, with its type, default and meaning
    python train_toy.py sample --ckpt=out/ddpm/ckpt.pt --n=64 --sampler=ddim --steps=50 --out=s.npz
    python train_toy.py sample --ckpt=out/shortcut/ckpt.pt --sampler=shortcut   # k jumps + 1 final step
    python train_toy.py sample --ckpt=out/shortft/ckpt.pt   # the fine-tuned base model, DDIM-50
    python train_toy.py sample --ckpt=checkpoints/ddpm.safetensors   # a shipped model (or a stage's model.safetensors)
    python train_toy.py sample --ckpt=checkpoints/shortcut.safetensors --sampler=shortcut
    python train_toy.py eval --samples=s.npz --target=ship   # held-out metrics (sftlib/metrics.py)

Stages, in order (each writes under <out_dir>/<stage>/):
    ddpm        train the base DDPM (train_ddpm.py; maths in ddpm.py, network in unet.py)
    shortcut    distil the DDPM into the few-step shortcut (train_shortcut.py; concept in consistency.py)
    classifier  train the reward classifier, the held-out evaluator and the judge (train_classifier.py; rewards.py)
    shortft     fine-tune the base DDPM against the reward through the shortcut chain (train_shortft.py; shortft.py)
"""
import importlib
import os
import time

import numpy as np
import torch

import ddpm
from sftlib import config
from sftlib.common import UserError, atomic_path, load_checkpoint, pick_device, run_main, save_grid, seed_all, to_uint8
from sftlib.stage import lock_folder

# (stage, module): each module's train(cfg, device) runs the stage, or skips it when its checkpoint
# <out_dir>/<stage>/ckpt.pt is complete. Later stages read the checkpoints of earlier ones.
STAGES = [("ddpm", "train_ddpm"), ("shortcut", "train_shortcut"), ("classifier", "train_classifier"),
          ("shortft", "train_shortft")]


MODELS = ("toy", "sd15")


def chosen_model(args):
    """--model's value, read first: it decides which keys the rest of the command line may hold."""
    for i, arg in enumerate(args):
        if arg.startswith("--model="):
            model = arg.partition("=")[2]
        elif arg == "--model":
            model = args[i + 1] if i + 1 < len(args) else ""
        else:
            continue
        if model not in MODELS:
            raise UserError(f"--model must be one of {', '.join(MODELS)}; got {model!r}")
        return model
    return "toy"


def run_pipeline(args):
    if chosen_model(args) == "sd15":  # SD's keys and stages; diffusers, transformers and peft load only here
        import train_sd

        return train_sd.main(args)
    cfg = config.resolve(args, torch.cuda.is_available(), description=__doc__)
    wanted = [s for s, _ in STAGES] if cfg["stages"] == "all" else cfg["stages"].split(",")
    unknown = [s for s in wanted if s not in dict(STAGES)]
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r}: --stages takes all or a comma list of "
                        f"{', '.join(s for s, _ in STAGES)}")
    device = pick_device(cfg["device"])  # on CUDA with cuDNN autotuning and TF32 (sftlib/common.py, fast_device)
    if cfg["fid_n"] > 0 and "shortft" in wanted:  # the Inception weights, found before any stage trains
        from sftlib import fid

        try:
            fid.weights_path()
        except fid.FIDError as e:
            raise UserError(f"--fid_n={cfg['fid_n']}: {e} (or pass --fid_n=0 to skip the FID)") from None
    lock_folder(cfg["out_dir"])  # one run per output folder for the whole run, not only per stage (sftlib/stage.py)
    if cfg["pretrained"]:  # the shipped base, shortcut and classifiers become this run's complete stages
        from sftlib import pretrained

        pretrained.install(cfg)
    seed_all(cfg["seed"])
    print("config:", " ".join(f"{k}={v}" for k, v in cfg.items()))
    if cfg["pretrained"]:
        print(f"[pretrained] {pretrained.SHIPPED_NOTE}")
    if cfg["preset"] == "quick":
        print(f"[train_toy] quick preset: the shipped checkpoints, then {cfg['ft_steps']} ShortFT steps of batch "
              f"{cfg['ft_batch']} and DDIM-50 scores of {cfg['n_eval']} samples before and after (5 minutes on 2 free "
              f"CPU cores with these sizes; checkpoints/README.md). Override any key with --key=value.")
    if cfg["preset"] == "gpu" and not cfg["pretrained"]:
        print(f"[train_toy] GPU preset: every stage and the {cfg['fid_n']}-sample FID before and after fine-tuning, "
              f"predicted at about 7 minutes on one H100/H200 (the DDPM trains {cfg['ddpm_seconds']:.0f} s, the shortcut "
              f"{cfg['shortcut_seconds']:.0f} s); --preset=gpu_long: Ho et al.'s 35.7M UNet, about an hour.")
    if cfg["preset"] == "cpu" and not cfg["pretrained"]:
        print("[train_toy] CPU preset: a small UNet and short stages, about 20 minutes in all on 2 free cores. "
              "For the real run use a GPU (--preset=gpu); override any key with --key=value.")
    minutes = {}
    for stage, module in STAGES:
        if stage not in wanted:
            continue
        t0 = time.time()
        importlib.import_module(module).train(cfg.copy(), device)  # a copy that knows the typed keys  # writes <out_dir>/<stage>/ckpt.pt
        minutes[stage] = (time.time() - t0) / 60
    print_results(cfg["out_dir"], cfg["method"], minutes)


# what the closing table reads from <out_dir>/<method>/metrics.json (train_shortft.report writes it)
METRICS_SCHEMA = {"reward": str, "ms_per_step_median": (int, float), "before": dict, "after": {"n_samples": int}}


def print_results(out_dir, method, minutes):
    """The closing table: minutes per stage, then the fine-tuning's before/after metrics."""
    print("\n| stage | minutes |\n|---|---|")
    for stage, m in minutes.items():
        print(f"| {stage} | {m:.1f} |")
    path = os.path.join(out_dir, method, "metrics.json")
    if not os.path.isfile(path):
        if "shortft" in minutes:  # the stage ran, or found itself complete: its report must be there
            raise UserError(f"{path} is missing, though the {method} stage is complete: its outputs were damaged; "
                            f"move {os.path.dirname(path)} aside and run the stage again")
        return
    from sftlib.readers import check_schema, read_json  # a torn or wrong metrics.json: one line

    m = read_json(path, METRICS_SCHEMA, "metrics")
    rows = [("Inception FID (" + str(m["after"].get("fid_n")) + " samples)", "fid"), ("Inception KID", "kid"),
            ("training reward (" + m["reward"] + ")", "reward_mean"),
            ("held-out evaluator: target-class rate", "evaluator_target_rate"),
            ("held-out evaluator: mean log p(target)", "evaluator_mean_logp_target"),
            ("reward classifier: target-class rate", "classifier_target_rate"),
            ("evaluator-feature Fréchet distance", "fd"),
            ("diversity, tr(Σ)/tr(Σ_test) (collapse → 0)", "diversity"),
            ("judge (sftlib/judge.py): target-class rate", "judge_target_rate"),
            ("judge-feature Fréchet distance", "judge_fd")]
    print(f"\n{method}, DDIM-50 samples of the base model before and after ({m['after']['n_samples']} fixed noises):")
    print("| metric | before | after |\n|---|---|---|")
    for name, key in rows:
        if key in m["after"] and key in m["before"]:
            check_schema(m, {"before": {key: (int, float)}, "after": {key: (int, float)}}, path)
            print(f"| {name} | {m['before'][key]:.3f} | {m['after'][key]:.3f} |")
    print(f"| ms per fine-tuning step (median) | | {m['ms_per_step_median']:.0f} |")


def run_sample(args):
    """Sample N images from a checkpoint and write them as uint8 (N, 32, 32, 3) under 'images' in a
    .npz, plus a PNG grid of the first 64 next to it."""
    opts = dict(config.SAMPLE_DEFAULTS)
    given = config.parse_overrides(args, config.SAMPLE_DEFAULTS, prog="train_toy.py sample",
                                   description=run_sample.__doc__, source=config.__file__)
    opts.update(given)
    config.check_sample(opts)  # counts >= 1, and --n within the free memory
    if opts["sampler"] not in ("ddpm", "ddim", "shortcut"):
        raise UserError(f"--sampler must be ddpm, ddim or shortcut, got {opts['sampler']!r}")
    if not opts["out"].endswith(".npz"):
        raise UserError(f"--out must name a .npz file, got {opts['out']!r}")
    if "eta" in given and opts["sampler"] != "ddim":  # an option the sampler does not use is an error, not ignored
        raise UserError(f"--eta applies to --sampler=ddim only (DDIM's stochasticity), not to --sampler={opts['sampler']}")
    device = pick_device(opts["device"])
    from consistency import shortcut_sample
    from sftlib.models import load_ddpm, load_finetuned, load_shortcut

    if opts["ckpt"].endswith(".safetensors"):  # a shipped model (checkpoints/) or a stage's model.safetensors
        from sftlib import pretrained

        model, sched, meta = pretrained.load_unet(opts["ckpt"], ("ddpm", "shortcut"), device)
        if (meta["kind"] == "shortcut") != (opts["sampler"] == "shortcut"):
            raise UserError(f"{opts['ckpt']} holds a {meta['kind']}: sample it with "
                            + ("--sampler=shortcut" if meta["kind"] == "shortcut" else "--sampler=ddim or ddpm"))
        edges = meta.get("edges")
        if meta["kind"] == "shortcut" and not edges:
            raise UserError(f"{opts['ckpt']} names no shortcut edges in its metadata")
    elif opts["sampler"] == "shortcut":  # a distilled few-step model: its steps are fixed by its k segments
        model, sched, _, edges = load_shortcut(opts["ckpt"], device)
    elif load_checkpoint(opts["ckpt"], ("ddpm", "shortft"))["kind"] == "shortft":  # fine-tuned: base + LoRA
        model, sched = load_finetuned(opts["ckpt"], device)
    else:
        model, sched, _ = load_ddpm(opts["ckpt"], device)
    if opts["sampler"] == "shortcut":
        if "steps" in given and opts["steps"] != len(edges):
            raise UserError(f"this shortcut checkpoint has k = {len(edges)} segments: leave --steps out or "
                            f"pass --steps={len(edges)}, got --steps={opts['steps']}")
    if opts["sampler"] == "ddpm" and "steps" in given and opts["steps"] != sched.T:
        raise UserError(f"--sampler=ddpm takes all T = {sched.T} steps of its model: leave --steps out or pass "
                        f"--steps={sched.T}, got --steps={opts['steps']} (fewer steps: --sampler=ddim)")
    timesteps = ddpm.ddim_timesteps(sched.T, opts["steps"]) if opts["sampler"] == "ddim" else None  # checks --steps
    sched.clip_x0 = opts["clip_x0"]  # x0-clipping in the sampler (ddpm.py); --clip_x0=false to see without
    seed_all(opts["seed"])
    images = []
    with torch.no_grad():  # sampling only: no graph to keep
        for i in range(0, opts["n"], opts["batch"]):
            x_T = torch.randn(min(opts["batch"], opts["n"] - i), 3, 32, 32, device=device)
            if opts["sampler"] == "ddpm":
                x0 = ddpm.ddpm_sample(model, sched, x_T)
            elif opts["sampler"] == "shortcut":
                x0 = shortcut_sample(model, sched, x_T, edges)
            else:
                x0 = ddpm.ddim_sample(model, sched, x_T, timesteps, opts["eta"])
            images.append(x0)
            print(f"[sample] {min(i + opts['batch'], opts['n'])}/{opts['n']}")
    x0 = torch.cat(images)  # (N, 3, 32, 32)
    os.makedirs(os.path.dirname(opts["out"]) or ".", exist_ok=True)
    remove_dead_temps(opts["out"])  # a killed earlier `sample` to the same file left its temporary files
    remove_dead_temps(opts["out"][:-4] + ".png")
    with atomic_path(opts["out"]) as tmp:
        np.savez(tmp, images=to_uint8(x0))
    save_grid(x0[:64], opts["out"][:-4] + ".png")
    print(f"[sample] wrote {opts['out']} ({len(x0)} images) and {opts['out'][:-4]}.png")


def remove_dead_temps(path):
    """The temporary files atomic_path wrote for `path` (<root>.tmp<pid><ext>) whose process has ended:
    left by a run killed mid-write. A live process's (another sample to the same file) is kept."""
    import glob
    import re

    root, ext = os.path.splitext(path)
    for tmp in glob.glob(glob.escape(root) + ".tmp[0-9]*" + glob.escape(ext)):
        m = re.fullmatch(re.escape(root) + r"\.tmp(\d+)" + re.escape(ext), tmp)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            os.remove(tmp)
        except (PermissionError, OverflowError):  # alive under another user / not a pid: leave it
            pass


def run_eval(args):
    """Score a .npz of samples with the held-out evaluator: a table, then one line of JSON."""
    from sftlib import metrics

    metrics.run_eval(args)


COMMANDS = {"train": run_pipeline, "sample": run_sample, "eval": run_eval}


def main(argv):
    cmd, args = ("train", argv) if not argv or argv[0].startswith("-") else (argv[0], argv[1:])
    if cmd not in COMMANDS:
        raise UserError(f"unknown command {cmd!r}: use one of {', '.join(COMMANDS)} (or none, to train)")
    COMMANDS[cmd](args)


if __name__ == "__main__":
    run_main(main)
