"""The shipped classroom checkpoints (checkpoints/, sftlib/pretrained.py) and `--pretrained`, end to end:
installed as complete stages, fine-tuned from for a step, sampled from."""
import os
import shutil

import numpy as np
import pytest
import torch

from benchmarks import ft_probe
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
        # the stage's keys, or the comparison's own that the training run's config also held then
        unknown = set(meta["config"]) - set(config.DEFAULTS) - set(ft_probe.PROBE_DEFAULTS)
        assert not unknown, f"{stage}.safetensors names config keys the code does not know: {unknown}"
        assert meta["step"] == meta["config"][{"ddpm": "ddpm_steps", "shortcut": "shortcut_steps",
                                               "classifier": "classifier_steps",
                                               "evaluator": "evaluator_steps", "judge": "judge_steps"}[stage]]


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


def test_sample_draws_from_the_shipped_safetensors(tmp_path):
    """`train_toy.py sample --ckpt=checkpoints/<model>.safetensors`: the base with DDIM, the shortcut with its
    own k + 1 calls; a torn file, or a sampler that does not fit the model, is one line and exit code 2."""
    for name, extra, n in (("ddpm", ["--steps=4"], 3), ("shortcut", ["--sampler=shortcut"], 2)):
        out = tmp_path / f"{name}.npz"
        run_cli("sample", f"--ckpt={os.path.join(ROOT, 'checkpoints', name + '.safetensors')}", f"--n={n}", *extra,
                f"--out={out}", "--device=cpu", timeout=600)
        with np.load(out) as f:
            assert f["images"].shape == (n, 32, 32, 3) and f["images"].dtype == np.uint8
            assert f["images"].std() > 0  # an image, not a constant
        assert (tmp_path / f"{name}.png").is_file()
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(open(os.path.join(ROOT, "checkpoints", "ddpm.safetensors"), "rb").read()[:5000])
    for args, needle in (([f"--ckpt={torn}"], "corrupt"),
                         ([f"--ckpt={os.path.join(ROOT, 'checkpoints', 'shortcut.safetensors')}"], "--sampler=shortcut"),
                         ([f"--ckpt={os.path.join(ROOT, 'checkpoints', 'evaluator.safetensors')}"], "not a 'ddpm'")):
        p = run_cli("sample", *args, "--n=2", f"--out={tmp_path / 'x.npz'}", "--device=cpu", check=False, timeout=300)
        lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr


def test_pretrained_config_names_the_shipped_training_keys(tmp_path, capsys):
    """With --pretrained, the config printed and stored by the run holds the keys that trained the shipped
    models (checkpoints/README.md's cards), never the CPU preset's values for stages it did not train."""
    cfg = config.resolve([f"--out_dir={tmp_path}", "--pretrained", "--ddpm_batch=32"], False)
    pretrained.install(cfg)
    assert "--ddpm_batch=32 ignored" in capsys.readouterr().out  # a typed key the shipped models overrule
    ddpm_cfg, shortcut_cfg = pretrained.read("ddpm")[1]["config"], pretrained.read("shortcut")[1]["config"]
    cls_cfg = pretrained.read("classifier")[1]["config"]
    assert (cfg["ddpm_batch"], cfg["ddpm_lr"], cfg["ddpm_ema"]) == (ddpm_cfg["ddpm_batch"], ddpm_cfg["ddpm_lr"],
                                                                   ddpm_cfg["ddpm_ema"]) == (256, 8e-4, 0.999)
    assert (cfg["shortcut_batch"], cfg["shortcut_lr"], cfg["cd_target_ema"]) == (256, 2e-4, 0.0) == (
        shortcut_cfg["shortcut_batch"], shortcut_cfg["shortcut_lr"], shortcut_cfg["cd_target_ema"])
    assert (cfg["cls_batch"], cfg["cls_lr"]) == (cls_cfg["cls_batch"], cls_cfg["cls_lr"]) == (512, 0.4)
    assert cfg["eps_skip"] is False and cfg["ch"] == 48  # the shapes, as before
    assert cfg["ft_lr"] == config.DEFAULTS["ft_lr"] and cfg["out_dir"] == str(tmp_path)  # the run's own keys stay


def test_quick_preset_is_pretrained_and_small():
    cfg = config.resolve(["--preset=quick"], False)
    assert cfg["pretrained"] and cfg["preset"] == "quick"
    # what was measured at 5.0 min on 2 free cores (checkpoints/README.md): no larger
    assert cfg["ft_steps"] * cfg["ft_batch"] <= 480 and cfg["n_eval"] <= 128 and cfg["sample_batch"] <= 32
    assert config.resolve(["--preset=quick", "--ft_steps=5"], False)["ft_steps"] == 5  # keys still override it


def test_a_shortcut_next_to_another_base_is_refused(tmp_path):
    """Provenance across --pretrained: the installed shortcut names the shipped base it was distilled from, so
    a kept base of one's own (here: the installed one replaced by other weights) makes the shortcut stage and
    ShortFT stop with one line instead of fine-tuning one base through another base's shortcut."""
    import train_shortcut
    import train_shortft
    from sftlib.common import export_safetensors, file_sha256, load_checkpoint

    cfg = config.resolve([f"--out_dir={tmp_path}", "--pretrained", "--device=cpu"], False)
    pretrained.install(cfg)
    shortcut = load_checkpoint(str(tmp_path / "shortcut" / "ckpt.pt"), "shortcut")
    assert shortcut["teacher_sha256"] == file_sha256(str(tmp_path / "ddpm" / "model.safetensors"))
    train_shortcut.train(dict(cfg), torch.device("cpu"))  # the shipped pair: complete, skipped, no error
    state, meta = read_safetensors(str(tmp_path / "ddpm" / "model.safetensors"))
    export_safetensors({k: v + 1e-3 for k, v in state.items()}, meta["config"], str(tmp_path / "ddpm" / "model.safetensors"),
                       kind="ddpm")  # another base in its place
    with pytest.raises(UserError, match="another teacher"):
        train_shortcut.train(dict(cfg), torch.device("cpu"))
    with pytest.raises(UserError, match="distilled from another base model"):
        train_shortft.train(dict(cfg), torch.device("cpu"))
