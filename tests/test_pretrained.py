"""The shipped classroom checkpoints (checkpoints/, sftlib/pretrained.py) and `--pretrained`, end to end:
installed as complete stages, fine-tuned from for a step, sampled from."""
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli
from sftlib import config, pretrained
from sftlib.common import UserError, read_safetensors


def test_shipped_checkpoints_load_and_fit_the_budget():
    sizes = pretrained.shipped_models_are_loadable()  # strict load_state_dict into the config's networks
    assert set(sizes) == set(pretrained.STAGES)
    assert 3e6 < sizes["ddpm"] == sizes["shortcut"] < 5e6
    folder = os.path.join(ROOT, "checkpoints")
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert total <= 30e6  # what ships with the repository
    for stage in pretrained.STAGES:
        _, meta = read_safetensors(os.path.join(folder, f"{stage}.safetensors"))
        unknown = set(meta["config"]) - set(config.DEFAULTS)
        assert not unknown, f"{stage}.safetensors names config keys the code does not know: {unknown}"
        assert meta["step"] == meta["config"][{"ddpm": "ddpm_steps", "shortcut": "shortcut_steps",
                                               "classifier": "classifier_steps",
                                               "evaluator": "evaluator_steps"}[stage]]


def test_pretrained_runs_shortft_and_samples(tmp_path, cifar_root):
    out = tmp_path / "run"
    p = run_cli("--pretrained", f"--out_dir={out}", f"--data_root={cifar_root}", "--device=cpu", "--preset=cpu",
                "--n_test=100", "--ft_steps=1", "--ft_batch=1", "--n_eval=2", "--grid_ft=1", timeout=900)
    assert "[pretrained] ddpm: installed" in p.stdout
    assert "[ddpm]" in p.stdout and "skipping the stage" in p.stdout  # the shipped stages count as complete
    # the installed base is the shipped one (fp16 weights, loaded as fp32)
    shipped, _ = pretrained.read("ddpm")
    ckpt = torch.load(out / "ddpm" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(ckpt["ema"][k], v) for k, v in shipped.items())
    assert ckpt["config"]["out_dir"] == str(out) and ckpt["config"]["data_root"] == cifar_root  # this run's paths
    assert (out / "shortft" / "metrics.json").is_file()
    s = run_cli("sample", f"--ckpt={out / 'shortft' / 'ckpt.pt'}", "--n=2", f"--out={tmp_path / 's.npz'}",
                "--device=cpu", timeout=600)
    assert "wrote" in s.stdout
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].shape == (2, 32, 32, 3) and f["images"].dtype == np.uint8


def test_missing_or_foreign_shipped_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="restore it with git checkout"):
        pretrained.read("ddpm", folder=str(tmp_path))
    shutil.copy(os.path.join(ROOT, "checkpoints", "evaluator.safetensors"), tmp_path / "ddpm.safetensors")
    with pytest.raises(UserError, match="not a 'ddpm'"):
        pretrained.read("ddpm", folder=str(tmp_path))
    (tmp_path / "shortcut.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt"):
        pretrained.read("shortcut", folder=str(tmp_path))
