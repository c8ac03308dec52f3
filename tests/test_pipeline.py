"""The whole pipeline (ddpm -> shortcut -> classifier -> shortft) end to end at toy size on real data."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, TINY, run_cli
from test_cli import one_line_error

SMALL = ["--n_test=500", "--shortcut_steps=10", "--classifier_steps=10", "--evaluator_steps=10", "--judge_steps=10", "--ft_steps=4",
         "--ft_ckpt_every=2", "--n_eval=16", "--ft_batch=2", "--ddpm_steps=200"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_ddpm, cifar_root):
    out = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(os.path.join(tiny_ddpm, "ddpm"), out / "ddpm")  # reuse the session's tiny DDPM
    p = run_cli(f"--out_dir={out}", f"--data_root={cifar_root}", *TINY, *SMALL)
    return out, p.stdout


def test_pipeline_runs_every_stage_and_prints_results(pipeline):
    out, stdout = pipeline
    for f in ("shortcut/ckpt.pt", "classifier/ckpt.pt", "evaluator/ckpt.pt", "shortft/ckpt.pt", "shortft/lora.safetensors",
              "shortft/before_after.png", "shortft/metrics.json", "shortft/log.csv"):
        assert (out / f).is_file(), f
    m = json.loads((out / "shortft" / "metrics.json").read_text())
    for key in ("evaluator_target_rate", "fd", "reward_mean"):
        assert key in m["before"] and key in m["after"]
    assert m["after"]["n_samples"] == 16 and m["steps"] == 4
    assert "| held-out evaluator: target-class rate |" in stdout and "| shortft |" in stdout
    assert not (out / "shortft" / "eval.csv").exists() and "curve" not in m  # the probe's, not the stage's


def test_probe_scores_the_same_loop_along_training(pipeline, tmp_path, cifar_root):
    """benchmarks/ft_probe.py runs the stage's loop with measurements around it: eval.csv holds the
    held-out scores before, at step 2 (--ft_eval_every=2) and at the end, the same as metrics.json's."""
    out, _ = pipeline
    for stage in ("ddpm", "shortcut", "classifier", "evaluator"):
        os.symlink(out / stage, tmp_path / stage)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ft_probe.py"), f"--out_dir={tmp_path}",
                        f"--data_root={cifar_root}", *TINY, *SMALL, "--ft_eval_every=2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((tmp_path / "shortft" / "metrics.json").read_text())
    rows = np.genfromtxt(tmp_path / "shortft" / "eval.csv", delimiter=",", names=True)
    assert list(rows["step"]) == [0, 2, 4] and m["steps"] == 4 and len(m["curve"]) == 3
    for row, m_ in ((rows[0], m["before"]), (rows[-1], m["after"])):
        assert row["target_rate"] == pytest.approx(m_["evaluator_target_rate"], abs=1e-4)
        assert row["fd"] == pytest.approx(m_["fd"], rel=1e-4) and row["diversity"] == pytest.approx(m_["diversity"], rel=1e-4)
    assert m["peak_memory_mib"] > 0 and np.isfinite(m["after"]["chain_gap"])


def test_sample_from_finetuned_checkpoint(pipeline, tmp_path):
    out, _ = pipeline
    run_cli("sample", f"--ckpt={out}/shortft/ckpt.pt", "--n=3", f"--out={tmp_path}/ft.npz", "--device=cpu")
    images = np.load(tmp_path / "ft.npz")["images"]
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8


def test_nan_loss_stops_and_keeps_last_good_checkpoint(pipeline, tmp_path, cifar_root, monkeypatch):
    import torch

    import train_shortft
    from sftlib import config
    from sftlib.common import UserError

    out, _ = pipeline
    for stage in ("ddpm", "shortcut", "classifier", "evaluator"):
        shutil.copytree(out / stage, tmp_path / stage)
    args = [f"--out_dir={tmp_path}", f"--data_root={cifar_root}", *TINY, *SMALL, "--stages=shortft"]
    assert "--ft_reward_scale" in one_line_error(run_cli(*args, "--ft_reward_scale=nan", check=False))  # refused
    monkeypatch.setattr(train_shortft, "reward_loss", lambda r: r.mean() * float("nan"))  # a NaN loss, injected
    with pytest.raises(UserError, match="loss nan"):
        train_shortft.train(config.resolve(args, False), torch.device("cpu"))
    assert not (tmp_path / "shortft" / "ckpt.pt").exists()  # no checkpoint of a broken model


def test_missing_shortcut_is_a_clear_error(tmp_path, tiny_ddpm, cifar_root):
    shutil.copytree(os.path.join(tiny_ddpm, "ddpm"), tmp_path / "ddpm")
    p = run_cli(f"--out_dir={tmp_path}", f"--data_root={cifar_root}", *TINY, "--ddpm_steps=200", "--stages=shortft",
                check=False)
    assert "--stages=shortcut" in one_line_error(p)


def test_untuned_shortcut_chain_lands_near_the_real_ddim50_x0(pipeline):
    """With the LoRA still zero, ShortFT's short chain (~7 calls) must land close to the base model's own
    DDIM-50 x_0 from the same x_T, closer than DDIM-50 samples of other noise are to each other: else the
    gradient would be that of another sampler. With the naive jump (the base's own DDIM step over each
    segment) this tests the chain's wiring alone: far closer (0.11 of the other-noise distance on this
    tiny model). The fixture distils for 10 steps only, and the first steps of distillation move the
    student off the teacher before they bring it back (README, "What the target network does"): its
    chain measured 0.26 here, with either target network. The bound for it is that of any sampler of
    the same model: under half the other-noise distance. (The CPU preset's own shortcut, 300 steps:
    bench_shortcut.py, README.)"""
    import torch

    from sftlib import config
    import ddpm
    from sftlib.models import build_finetuned, load_naive_shortcut, load_shortcut
    from shortft import shortft_chain

    out, _ = pipeline
    student, _, _, edges = load_shortcut(str(out / "shortcut" / "ckpt.pt"), "cpu")
    naive = load_naive_shortcut(str(out / "ddpm" / "ckpt.pt"), "cpu")
    cfg = config.resolve(["--preset=cpu"], False)
    ft, sched = build_finetuned(cfg, str(out / "ddpm" / "ckpt.pt"), edges, torch.device("cpu"))
    x_T = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (32, 3, 32, 32)
    with torch.no_grad():  # forward chains only
        real = ddpm.ddim_sample(ft, sched, x_T, ddpm.ddim_timesteps(sched.T, 50))  # (32, 3, 32, 32)
        short = shortft_chain(ft, student, sched, x_T, ft.groups)
        short_naive = shortft_chain(ft, naive, sched, x_T, ft.groups)
    mse = (short - real).pow(2).mean().item()
    mse_naive = (short_naive - real).pow(2).mean().item()
    scale = (real.roll(1, 0) - real).pow(2).mean().item()  # two DDIM-50 samples of different noise
    print(f"short chain vs DDIM-50: MSE {mse:.4f} (naive jump {mse_naive:.4f}); other-noise samples: {scale:.4f}")
    assert mse_naive < 0.2 * scale, (mse_naive, scale)
    assert mse < 0.5 * scale, (mse, scale)


def test_bench_compare_quick_traces_frontiers_at_equal_seconds(pipeline, tmp_path):
    """bench_compare.py --quick on the pipeline's tiny models: ShortFT (one LoRA) and DRaFT-1 at two lrs on two
    seeds, each for the same training seconds, scored along training; the matched-cost cell recomputed from the
    runs' own metrics.json (oracle: frontier.value_at_cost by hand over the files); a rerun reuses the runs,
    and --report_only runs nothing."""
    import subprocess
    import sys

    from conftest import ROOT

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import frontier

    out, _ = pipeline
    for stage in ("ddpm", "shortcut", "classifier", "evaluator", "judge", "cache"):
        if (out / stage).exists():
            os.symlink(out / stage, tmp_path / stage)
    args = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_compare.py"), f"--out_dir={tmp_path}", "--quick",
            "--seconds=2", "--eval_every_s=1", "--n_eval=8", "--device=cpu", "--n_boot=200"]
    p = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    comp = tmp_path / "compare"
    report, res = (comp / "results.md").read_text(), json.loads((comp / "results.json").read_text())
    assert "| shortft |" in report and "| draft |" in report and "Equal lr" in report
    reward, level = "classifier:ship", res["cost_levels"][0]
    cell = res["summary"][reward]["matched"][f"{level:g}"]
    for name, method in (("shortft", "shortft"), ("draft", "draft")):
        per_seed = {}
        for seed in (0, 1):
            curves = []
            for lr in (1e-3, 4e-3):
                run = comp / "classifier-ship" / f"seed{seed}" / f"{name}_lr{lr:g}" / method
                m = json.loads((run / "metrics.json").read_text())
                train_s = sum(np.loadtxt(run / "log.csv", delimiter=",", skiprows=1, ndmin=2)[:, 4]) / 1000
                assert train_s >= 2 and m["after"]["n_samples"] == 8 and len(m["curve"]) >= 3  # spent, then scored
                p0 = m["curve"][0]
                assert np.isfinite(p0["judge_fd"]) and np.isfinite(p0["judge_target_rate"])
                curves.append([(q["judge_fd"] - p0["judge_fd"], q["judge_target_rate"] - p0["judge_target_rate"])
                               for q in m["curve"]])
            per_seed[seed] = frontier.frontier_at(curves, cell["cost"])[0]
        got = cell["arms"][name]["per_seed"]
        assert {int(k): v for k, v in got.items()} == pytest.approx(per_seed, nan_ok=True), (name, got, per_seed)
    ship = cell["arms"]["shortft"]
    assert ("unbracketed" in report) == any(not cell["arms"][n]["bracketed"] for n in ("shortft", "draft"))
    assert ship["ci"][0] <= ship["mean"] <= ship["ci"][1] or not np.isfinite(ship["mean"])
    assert (comp / "frontier_classifier-ship.png").stat().st_size > 1000 and (comp / "grid_classifier-ship.png").is_file()
    # --report_only reads the same runs back, and runs nothing new
    p = subprocess.run(args + ["--report_only"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0 and ", seed " not in p.stdout and "| shortft |" in p.stdout, p.stderr[-2000:]


def torch_load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("args,needle", [(["--methods=shortft,sgd"], "unknown method 'sgd'"),
                                         (["--jobs=-1"], "--jobs"), (["--seconds"], "--seconds needs a value"),
                                         (["--seeds=0,x"], "--seeds must be a comma list"),
                                         (["--seeds=-1,0"], "--seeds must be non-negative"),
                                         (["--lrs=1e-4,abc"], "--lrs must be a comma list"),
                                         (["--lrs=0,1e-3"], "--lrs must be positive"),
                                         (["--lrs=1e-3,5e-4"], "strictly increasing"),
                                         (["--seeds=0"], "at least 2 seeds"),
                                         (["--cost_levels=0.5,-1"], "--cost_levels must be positive"),
                                         (["--rewards=classifier:shipp"], "ship"),
                                         (["--seconds=inf"], "--seconds must be in")])
def test_bench_compare_bad_input(args, needle, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_compare.py"), f"--out_dir={tmp_path}", *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_figures_command_redraws_every_figure(tmp_path):
    """benchmarks/figures.py, the one command behind the README's figures: from the results files (no
    computation) and from the classroom checkpoints (a tiny --n), every PNG written; a bad --only is one line."""
    from sftlib import config as cfgmod, pretrained

    out = tmp_path / "docs"
    pretrained.install(dict(cfgmod.DEFAULTS, out_dir=str(tmp_path / "models"), data_root=""))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "figures.py"), f"--docs={out}", "--n=1",
                        "--n_grad=1", f"--models={tmp_path / 'models'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("chain_short_vs_real", "grad_per_step_methods", "grad_cosine_classroom", "grad_per_call_classroom",
                 "grad_adjoint_classroom", "grad_cosine", "grad_per_call", "grad_adjoint", "compare_pareto_cpu",
                 "ptrain_curves_cpu"):
        png = out / f"{name}.png"
        assert png.is_file() and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n", name
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "figures.py"), "--only=pareto"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown figure 'pareto'" in bad.stderr and "Traceback" not in bad.stderr
