"""The GPU path, exercised on the CPU: the whole `--preset=gpu` pipeline (the 35.7M UNet, bf16 and the
preset's keys) with tiny step counts, batches and evaluation sizes, so that its stage transitions,
evaluation sizes and checkpoint keys run on every change. The GPU's own numbers come from
benchmarks/gpu.py (README "One GPU"); here only the code path is checked."""
import json
import os
import subprocess
import sys

import torch

from conftest import ROOT, run_cli
from sftlib import config

TINY_GPU = ["--preset=gpu", "--device=cpu", "--n_train=100", "--n_test=100", "--ddpm_steps=2", "--ddpm_batch=2",
            "--shortcut_steps=2", "--shortcut_batch=2", "--classifier_steps=2", "--evaluator_steps=2", "--cls_batch=8",
            "--ft_steps=2", "--ft_batch=1", "--n_eval=2", "--grid_ddpm=1", "--grid_shortcut=1", "--grid_ft=1",
            "--sample_every=2", "--log_every=1", "--sample_batch=2"]


def test_gpu_preset_runs_every_stage_on_cpu(tmp_path, cifar_root):
    out = tmp_path / "gpu"
    p = run_cli(f"--out_dir={out}", f"--data_root={cifar_root}", *TINY_GPU, timeout=900)
    gpu = config.PRESETS["gpu"]
    for stage, kind in (("ddpm", "ddpm"), ("shortcut", "shortcut"), ("classifier", "classifier"),
                        ("evaluator", "evaluator"), ("shortft", "shortft")):
        ckpt = torch.load(out / stage / "ckpt.pt", map_location="cpu", weights_only=True)
        assert ckpt["kind"] == kind
        assert ckpt["config"]["preset"] == "gpu"
        for key in ("ch", "ch_mult", "num_res_blocks", "attn_res", "lora_rank", "bf16"):
            assert ckpt["config"][key] == gpu[key], (stage, key)  # the preset's model, not the CPU default
    base = torch.load(out / "ddpm" / "ckpt.pt", map_location="cpu", weights_only=True)
    n_params = sum(v.numel() for k, v in base["ema"].items() if v.dtype.is_floating_point)
    assert 35e6 < n_params < 37e6  # the 35.7M UNet of Ho et al. 2020
    m = json.loads((out / "shortft" / "metrics.json").read_text())
    assert m["after"]["n_samples"] == 2 and m["steps"] == 2
    for f in ("ddpm/model.safetensors", "shortcut/model.safetensors", "shortft/lora.safetensors",
              "shortft/before_after.png", "ddpm/samples_2.png"):
        assert (out / f).is_file(), f
    assert "| shortft |" in p.stdout  # the closing table


def test_gpu_benchmark_refuses_cpu_without_dry(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--device=cpu", f"--out={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--dry" in p.stderr


def test_gpu_benchmark_predicts_the_preset_from_measured_rates(tmp_path):
    """--predict: steps / (steps/s) per stage plus the DDIM-50 images at the sampling rate, checked by hand."""
    rows = [dict(stage=s, mode="bf16", steps_per_s=r, img_per_s=r * b) for s, r, b in
            (("ddpm", 20.0, 128), ("shortcut", 10.0, 128), ("classifier", 100.0, 512), ("evaluator", 200.0, 512),
             ("shortft", 1.25, 32))]
    rows.append(dict(stage="ddim50_sampling", mode="fp32", steps_per_s=0.32, img_per_s=160.0))
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"stages": rows}))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), f"--predict={path}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    pred = json.loads(p.stdout)["bf16"]
    cfg = dict(config.DEFAULTS, **config.PRESETS["gpu"])
    assert abs(pred["ddpm"] - cfg["ddpm_steps"] / 20.0) < 0.1
    assert abs(pred["shortft"] - cfg["ft_steps"] / 1.25) < 0.1
    grids = -(-cfg["ddpm_steps"] // cfg["sample_every"]) * cfg["grid_ddpm"] + \
        (-(-cfg["shortcut_steps"] // cfg["sample_every"]) + 1) * cfg["grid_shortcut"]
    images = grids + 2 * cfg["n_eval"] + cfg["grid_ft"]
    assert abs(pred["sampling"] - images / 160.0) < 0.1
    total = (cfg["ddpm_steps"] / 20 + cfg["shortcut_steps"] / 10 + cfg["classifier_steps"] / 100
             + cfg["evaluator_steps"] / 200 + cfg["ft_steps"] / 1.25 + images / 160) / 60
    assert abs(pred["total_min"] - total) < 0.01
