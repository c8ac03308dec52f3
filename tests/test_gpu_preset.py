"""The GPU path, exercised on the CPU: the whole `--preset=gpu` pipeline (its 8.95M UNet, bf16 and the
preset's keys) with tiny step counts, batches and evaluation sizes, so that its stage transitions,
evaluation sizes and checkpoint keys run on every change; the device script's dry run; the prediction of the
preset's time from the measured rates. The GPU's own numbers come from benchmarks/gpu.py (README "One GPU")."""
import json
import os
import subprocess
import sys

import torch

from conftest import ROOT, run_cli
from sftlib import config

TINY_GPU = ["--preset=gpu", "--device=cpu", "--n_train=100", "--n_test=100", "--ddpm_steps=2", "--ddpm_batch=2", "--fid_n=0",
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
        for key in ("ch", "ch_mult", "num_res_blocks", "attn_res", "lora_rank", "bf16", "channels_last", "ddpm_seconds"):
            assert ckpt["config"][key] == gpu[key], (stage, key)  # the preset's model, not the CPU default
    base = torch.load(out / "ddpm" / "ckpt.pt", map_location="cpu", weights_only=True)
    n_params = sum(v.numel() for k, v in base["ema"].items() if v.dtype.is_floating_point)
    assert 8.9e6 < n_params < 9.0e6  # Ho et al.'s layout at half the width
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


def test_unet_gflop_is_the_count_by_layer_shapes():
    """gpu.gflop (torch's FlopCounterMode) against a count from each layer's shapes: 2 k_h k_w C_in C_out H_out W_out
    per image for a convolution, 2 in out per token for a linear layer, 2 (HW)^2 C for each of attention's two
    products; GroupNorm, activations and the upsampling are not counted by either."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu
    from unet import Attention, build_unet

    for name in ("gpu", "gpu_long", "cpu"):
        cfg = dict(config.DEFAULTS, **config.PRESETS[name])
        net, flops = build_unet(cfg), []

        def conv(m, inp, out):
            flops.append(2 * m.kernel_size[0] * m.kernel_size[1] * m.in_channels * m.out_channels * out[0].numel()
                         // m.out_channels // m.groups)

        def linear(m, inp, out):
            flops.append(2 * m.in_features * m.out_features * out.numel() // m.out_features)

        def attention(m, inp, out):
            _, C, H, W = inp[0].shape
            flops.append(2 * 2 * (H * W) ** 2 * C)

        for m in net.modules():
            hook = conv if isinstance(m, torch.nn.Conv2d) else linear if isinstance(m, torch.nn.Linear) else \
                attention if isinstance(m, Attention) else None
            if hook:
                m.register_forward_hook(hook)
        with torch.no_grad():
            net(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
        assert abs(gpu.gflop(cfg) - sum(flops) / 1e9) < 1e-3 * sum(flops) / 1e9, name


def test_gpu_benchmark_predicts_the_preset_from_measured_rates(tmp_path):
    """--predict: each stage's time from a made-up results file, recomputed here from the documented rule: UNet
    stages at the measured img/s times the FLOP ratio discounted by the classroom UNet's measured efficiency
    (interpolated in log FLOPs), capped by the stage's seconds; ShortFT and the classifiers at their measured rates;
    sampling = grids + 2 max(n_eval, fid_n) + grid_ft images; Inception = 2 fid_n images at the measured s/image."""
    import math

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu

    rows = [dict(stage=s, mode="bf16", steps_per_s=r, img_per_s=r * b) for s, r, b in
            (("ddpm", 20.0, 128), ("shortcut", 10.0, 128), ("classifier", 100.0, 512), ("evaluator", 200.0, 512),
             ("shortft", 1.25, 32), ("ddim50_sampling", 0.4, 500))]
    rows.append(dict(stage="ddpm", mode="fp32", steps_per_s=16.0, img_per_s=16.0 * 128))
    results = dict(stages=rows, classroom_rates=[dict(stage="ddpm", mode="fp32", steps_per_s=20.0, batch=256)],
                   data_s=5.0)
    (tmp_path / "a.json").write_text(json.dumps(results))
    (tmp_path / "b.json").write_text(json.dumps(dict(fid=dict(s_per_image=0.001), data_s=99.0)))  # data_s: a.json's
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"),
                        f"--predict={tmp_path / 'a.json'},{tmp_path / 'b.json'}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    pred = json.loads(p.stdout)["gpu"]
    cfg = dict(config.DEFAULTS, **config.PRESETS["gpu"])
    g_new, g_ref, g_small = (gpu.gflop(dict(config.DEFAULTS, **c)) for c in
                             (config.PRESETS["gpu"], config.PRESETS["gpu_long"], gpu.CLASSROOM))
    eff = 20.0 * 256 / (16.0 * 128 * g_ref / g_small)  # the classroom's measured img/s over its FLOP-scaled rate
    x = g_ref / g_new * eff ** (math.log(g_ref / g_new) / math.log(g_ref / g_small))
    assert abs(pred["speedup_vs_measured"] - x) < 0.01
    ddpm_s = min(cfg["ddpm_seconds"], cfg["ddpm_steps"] * cfg["ddpm_batch"] / (20.0 * 128 * x))
    assert abs(pred["ddpm"] - ddpm_s) < 0.1 and ddpm_s == cfg["ddpm_seconds"]  # the preset trains for its seconds
    assert abs(pred["shortft"] - cfg["ft_steps"] / 1.25) < 0.1
    assert abs(pred["classifier"] - (cfg["classifier_steps"] / 100 + (cfg["evaluator_steps"] + cfg["judge_steps"]) / 200)) < 0.1
    assert abs(pred["inception"] - 2 * cfg["fid_n"] * 0.001) < 0.1 and pred["data"] == 5.0
    images = 2 * max(cfg["n_eval"], cfg["fid_n"]) + cfg["grid_ft"]
    assert images / (0.4 * 500 * x) < pred["sampling"] < (images + 200) / (0.4 * 500 * x)  # + the few grids
    parts = ("data", "ddpm", "shortcut", "classifier", "shortft", "sampling", "inception")
    assert abs(pred["total_min"] - sum(pred[k] for k in parts) / 60) < 0.051  # each figure rounded to 0.1


def test_gpu_preset_is_predicted_within_eight_minutes_on_the_h200():
    """The committed H200 measurements (gpu_h200*.json) predict the 8-minute preset with a minute to spare."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--predict=benchmarks/results/"
                        "gpu_h200.json,benchmarks/results/gpu_h200_fid.json"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    pred = json.loads(p.stdout)
    assert pred["gpu"]["total_min"] <= 7.0 and pred["gpu_long"]["total_min"] > 15


def test_gpu_script_dry_runs_the_preset_end_to_end(tmp_path, cifar_root):
    """benchmarks/gpu.py's default section on the CPU (--dry): every stage of the preset with a tiny UNet, one
    results.json with each stage's wall time and rate, the base's and fine-tuned model's scores, and the grids;
    with --work elsewhere, --out holds those four files and nothing else (the device returns at most 8 files)."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--dry", "--device=cpu",
                        f"--out={out}", f"--work={tmp_path / 'work'}", f"--data_root={cifar_root}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    shipped = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert shipped == ["before_after.png", "ddpm_samples.png", "results.json", "shortcut_samples.png"], shipped
    assert (tmp_path / "work" / "shortft" / "metrics.json").is_file()  # the run itself stayed in --work
    r = json.loads((out / "results.json").read_text())["pipeline"]
    assert [s["stage"] for s in r["stages"]] == ["ddpm", "shortcut", "classifier", "shortft"]
    assert all(s["wall_s"] > 0 for s in r["stages"]) and r["stages"][0]["img_per_s"] > 0
    assert r["stages"][0]["steps"] >= 2  # trained for its (dry) seconds, not a fixed step count
    assert r["stages"][3]["steps"] == 2 and r["after"]["judge_target_rate"] is not None
    assert "--preset=gpu" in r["command"]


def test_adam_state_saved_in_channels_last_resumes_the_same_in_nchw():
    """A run saved with channels_last weights (the gpu preset on CUDA) and resumed where its UNet is NCHW (on a CPU,
    or with --channels_last=false): load_optimizer lays Adam's moments out like their weights, so, given the same
    gradient, the resumed step is the uninterrupted channels_last run's. Plain load_state_dict keeps the old
    layout, which the fused kernel reads as flat memory: the oracle's other side."""
    import copy

    from sftlib.common import adam, load_optimizer
    from unet import build_unet

    torch.manual_seed(0)
    cfg = dict(config.DEFAULTS)
    x, t = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.tensor([5, 500])
    a = build_unet(cfg).to(memory_format=torch.channels_last)
    opt_a = adam(a.parameters(), 1e-3)
    for i in range(3):
        opt_a.zero_grad()
        a(x, t).pow(2).mean().backward()
        if i == 2:  # the step after the save: the state before it is what a checkpoint holds
            state, weights = copy.deepcopy(opt_a.state_dict()), copy.deepcopy(a.state_dict())
            grads = [p.grad.clone() for p in a.parameters()]
        opt_a.step()
    results = {}
    for name, load in (("load_optimizer", load_optimizer), ("plain", lambda o, s: o.load_state_dict(s))):
        b = build_unet(cfg)  # NCHW
        b.load_state_dict(weights)
        opt_b = adam(b.parameters(), 1e-3)
        load(opt_b, copy.deepcopy(state))
        for p, g in zip(b.parameters(), grads):
            p.grad = g.contiguous()  # the same gradient, in the resumed run's layout
        opt_b.step()
        results[name] = max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
    assert results["load_optimizer"] < 1e-7 and results["plain"] > 1e-5, results
