"""The command line on real CIFAR-10: training lowers the loss, checkpoints, sampling, resume, bad input."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, run_cli


def one_line_error(p):
    """Bad input: exit code 2, one line on stderr, no traceback."""
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def test_training_lowers_loss_and_writes_checkpoint(tiny_ddpm):
    rows = np.loadtxt(os.path.join(tiny_ddpm, "ddpm", "log.csv"), delimiter=",", skiprows=1)  # step, loss, img/s
    assert rows[-1, 0] == 200
    assert rows[-3:, 1].mean() < 0.6 * rows[0, 1], rows[:, 1]  # the eps-loss falls well below its start
    ckpt = torch.load(os.path.join(tiny_ddpm, "ddpm", "ckpt.pt"), weights_only=True)
    assert ckpt["kind"] == "ddpm" and ckpt["step"] == 200
    assert {"model", "ema", "opt", "config", "rng"} <= set(ckpt)
    assert ckpt["config"]["ch"] == 16 and ckpt["config"]["ddpm_steps"] == 200
    assert os.path.isfile(os.path.join(tiny_ddpm, "ddpm", "samples_200.png"))


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddpm", 1000)])
def test_sample_writes_uint8_npz_and_grid(tiny_ddpm, tmp_path, sampler, steps):
    out = tmp_path / f"{sampler}.npz"
    run_cli("sample", f"--ckpt={tiny_ddpm}/ddpm/ckpt.pt", "--n=5", f"--sampler={sampler}", f"--steps={steps}",
            f"--out={out}", "--device=cpu")
    images = np.load(out)["images"]
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert images.std() > 5  # not a constant image
    assert (tmp_path / f"{sampler}.png").is_file()


def test_completed_stage_is_skipped(tiny_ddpm, cifar_root):
    p = run_cli(f"--out_dir={tiny_ddpm}", f"--data_root={cifar_root}", "--ddpm_steps=200", "--stages=ddpm", *TINY)
    assert "skipping" in p.stdout


def test_killed_run_resumes_from_saved_step(tmp_path, cifar_root):
    args = [f"--out_dir={tmp_path}", f"--data_root={cifar_root}", "--ddpm_steps=120", "--ddpm_ckpt_every=10", "--stages=ddpm",
            "--ddpm_batch=16", *[a for a in TINY if not a.startswith("--ddpm_batch")]]
    ckpt_path = tmp_path / "ddpm" / "ckpt.pt"
    proc = subprocess.Popen([sys.executable, "train_toy.py", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt_path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # killed without warning, mid-training
    proc.wait()
    killed = torch.load(ckpt_path, weights_only=True)
    assert 10 <= killed["step"] < 120
    one_line_error(run_cli(*args, check=False))  # an unfinished run is not silently overwritten
    p = run_cli(*args, "--resume")
    assert f"resuming {ckpt_path} from step {killed['step']}" in p.stdout
    done = torch.load(ckpt_path, weights_only=True)
    assert done["step"] == 120
    same = lambda c: {k: v for k, v in c.items() if k != "resume"}
    assert same(done["config"]) == same(killed["config"])


@pytest.mark.parametrize("args,needle", [
    (["--no_such_flag=1"], "unknown option --no_such_flag"),
    (["--ddpm_bach=3"], "did you mean --ddpm_batch"),
    (["--ddpm_batch=big"], "expects a int"),
    (["--resume=maybe"], "expects a bool"),
    (["--data_root=/nonexistent/cifar", "--out_dir=/nonexistent/out"], "--data_root"),
    (["--preset=huge"], "--preset"),
    (["--stages=shortft", "--reward=contrastt", "--out_dir=/nonexistent/out"], "unknown reward 'contrastt'"),
    (["--stages=shortft", "--method=sgd", "--out_dir=/nonexistent/out"], "--method must be one of"),
    (["--stages=shortft", "--method=alignprop", "--alignprop_min=30", "--alignprop_max=20", "--out_dir=/nonexistent/out"],
     "AlignProp's window"),
    (["--stages=shortft", "--method=alignprop", "--alignprop_max=51", "--out_dir=/nonexistent/out"], "AlignProp's window"),
    (["--stages=shortft", "--method=drtune", "--drtune_k=0", "--out_dir=/nonexistent/out"], "--drtune_k must be in [1, 50]"),
    (["--stages=shortft", "--method=drtune", "--drtune_k=51", "--out_dir=/nonexistent/out"], "--drtune_k must be in [1, 50]"),
    (["--stages=shortft", "--method=draft", "--draft_k=51", "--out_dir=/nonexistent/out"], "--draft_k must be in [1, 50]"),
    (["--stages=shortft", "--method=draft_lv", "--lv_n=0", "--out_dir=/nonexistent/out"], "--lv_n must be at least 1"),
    (["frobnicate"], "unknown command"),
    (["sample", "--ckpt=/nonexistent.pt"], "not found"),
    (["sample"], "--ckpt"),
])
def test_bad_input_is_one_line_error(args, needle):
    assert needle in one_line_error(run_cli(*args, "--device=cpu", check=False))


def test_empty_data_folder(tmp_path):
    (tmp_path / "train").mkdir()
    line = one_line_error(run_cli(f"--data_root={tmp_path}", f"--out_dir={tmp_path}/o", check=False))
    assert "--data_root" in line


def test_corrupt_checkpoint_and_bad_n(tmp_path, tiny_ddpm):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(open(os.path.join(tiny_ddpm, "ddpm", "ckpt.pt"), "rb").read()[:5000])  # torn file
    assert "corrupt" in one_line_error(run_cli("sample", f"--ckpt={bad}", check=False))
    assert "--n" in one_line_error(run_cli("sample", f"--ckpt={tiny_ddpm}/ddpm/ckpt.pt", "--n=0", check=False))


@pytest.mark.parametrize("override,needle", [
    ("--out_dir=", "--out_dir must be a folder"), ("--T=4000000000", "--T must be at most 10000"),
    ("--ch=2000000", "--ch must be at most 512"), ("--attn_res=3", "--attn_res must be resolutions of the UNet"),
    ("--k_segments=51", "--k_segments must be in [1, 50]"), ("--reward=classifier:spaceship", "--reward: unknown class"),
])
def test_nonsense_is_refused_before_anything_runs(override, needle):
    """Checked where the command line is read (config.check), before any stage starts, in-process."""
    from sftlib import config
    from sftlib.common import UserError

    with pytest.raises(UserError, match=re.escape(needle)):
        config.resolve([override, "--preset=cpu"], False)
    config.resolve(["--preset=cpu"], False)  # the defaults themselves pass
