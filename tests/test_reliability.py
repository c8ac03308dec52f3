"""Safe to load, safe to stop, safe to mistype: checkpoints that would run code are refused, resume
goes on with the checkpoint's config, outputs exist before a stage is done, NaN never reaches a
checkpoint, a full disk and a second run are one line each, the shortcut resumes exactly, a
fine-tuned checkpoint finds its own base. Tiny models on a tiny synthetic image folder: no CIFAR."""
import contextlib
import glob
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from sftlib import config
from sftlib.common import UserError, load_checkpoint, run_main, save_atomic, seed_all, torch_load_trusted
from sftlib.data import CLASSES

SMALL = ["--ch=8", "--ch_mult=1,2", "--num_res_blocks=1", "--attn_res=", "--preset=cpu", "--device=cpu",
         "--log_every=1", "--sample_every=1000"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder in CIFAR-10's ImageFolder layout: 2 random 32x32 JPEGs per class and split."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in CLASSES:
            os.makedirs(root / split / c)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return str(root)


def cfg_of(*args):
    return config.resolve(list(SMALL) + list(args), False)


def fake_ddpm(out_dir, seed=0, **changes):
    """A ddpm checkpoint (complete: its model.safetensors too) with random weights of the small UNet."""
    from sftlib.common import export_safetensors
    from unet import build_unet

    cfg = dict(cfg_of(f"--out_dir={out_dir}", "--ddpm_steps=1"), **changes)
    torch.manual_seed(seed)
    model = build_unet(cfg)
    state = model.state_dict()
    save_atomic(dict(kind="ddpm", model=state, ema=state, opt={}, step=1, rng={}, elapsed=0.0, config=cfg),
                os.path.join(out_dir, "ddpm", "ckpt.pt"))
    export_safetensors(state, cfg, os.path.join(out_dir, "ddpm", "model.safetensors"), kind="ddpm")
    return cfg


class Payload:
    """Unpickling this creates a file: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def malicious(path, kind, marker):
    """A checkpoint of `kind` that holds everything a real one does, plus a code-running payload."""
    cfg = cfg_of()
    from unet import build_unet

    state = build_unet(cfg).state_dict()
    ckpt = dict(kind=kind, config=dict(cfg), model=state, ema=state, unet=state, target=state, opt={}, step=1, rng={},
                elapsed=0.0, edges=[761, 501, 261, 1], arch={"name": "vgg", "width": 8}, test_acc=0.5, base="/x",
                base_sha256="0", done=False, payload=Payload(marker))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(ckpt, path)


# ---- 1. loading never runs code ------------------------------------------------------------------------

def test_no_loader_unpickles_arbitrary_objects():
    """Every torch.load in the code goes through common.torch_load_trusted (weights_only=True)."""
    calls = []
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        if f"{os.sep}tests{os.sep}" in path:
            continue
        for i, line in enumerate(open(path), 1):
            code = line.split("#")[0]
            if ("torch.load(" in code or "weights_only=False" in code or "pickle.load" in code) and '"""' not in code:
                calls.append((os.path.relpath(path, ROOT), line.strip()))
    assert calls == [("sftlib/common.py", 'return torch.load(path, map_location="cpu", weights_only=True)')], calls


def test_malicious_checkpoint_is_refused_by_every_loader(tmp_path, capsys, monkeypatch):
    from sftlib.models import load_ddpm, load_finetuned, load_shortcut
    from sftlib.nets import load_classifier
    from sftlib.stage import Stage

    marker = str(tmp_path / "pwned")
    loaders = {"ddpm": lambda p: load_ddpm(p, "cpu"), "shortcut": lambda p: load_shortcut(p, "cpu"),
               "classifier": lambda p: load_classifier(p, "cpu", "classifier"),
               "evaluator": lambda p: load_classifier(p, "cpu", "evaluator"),
               "shortft": lambda p: load_finetuned(p, "cpu"), "sd aesthetic head": torch_load_trusted}
    for kind, load in loaders.items():
        path = str(tmp_path / kind.replace(" ", "_") / "ckpt.pt")
        malicious(path, kind if kind in ("ddpm", "shortcut", "classifier", "evaluator", "shortft") else "ddpm", marker)
        with pytest.raises(UserError, match="not a trusted checkpoint"):
            load(path)
        assert not os.path.exists(marker), kind
    # resuming a stage reads its checkpoint the same way
    cfg = cfg_of(f"--out_dir={tmp_path}", "--resume")
    with pytest.raises(UserError, match="not a trusted checkpoint"):
        Stage(cfg, "ddpm", "ddpm", "ddpm_steps").resume_or_skip(lambda c: False)
    # and through the command line: sample, eval (the evaluator checkpoint), one line, exit 2
    import train_toy

    np.savez(tmp_path / "s.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    for argv in (["sample", f"--ckpt={tmp_path}/ddpm/ckpt.pt", f"--out={tmp_path}/o.npz", "--device=cpu"],
                 ["eval", f"--samples={tmp_path}/s.npz", f"--out_dir={tmp_path}", "--device=cpu"]):
        line = one_line(train_toy.main, argv, capsys, monkeypatch)
        assert "not a trusted checkpoint" in line
    assert not os.path.exists(marker)


# ---- 5. bad input: one line, exit != 0, no traceback, nothing damaged -----------------------------------

def one_line(main, argv, capsys, monkeypatch):
    """Run an entry point's main through run_main as `prog ARGV`; it must exit non-zero with exactly one
    line on stderr (an exception other than SystemExit escaping here is what would be a traceback)."""
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert e.value.code not in (0, None), (argv, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (argv, err)
    return lines[0]


def tree_digest(folder):
    """{relative path: sha1} of every file under folder (or of the file itself)."""
    if os.path.isfile(folder):
        return {"": hashlib.sha1(open(folder, "rb").read()).hexdigest()}
    return {os.path.relpath(p, folder): hashlib.sha1(open(p, "rb").read()).hexdigest()
            for p in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(p)}


@contextlib.contextmanager
def read_only_folder(path):
    """A folder no one may write to: a read-only tmpfs as root (root ignores file modes), else chmod."""
    os.makedirs(path)
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", path]).returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here")
        try:
            yield path
        finally:
            subprocess.run(["umount", path])
    else:
        os.chmod(path, 0o500)
        yield path


def bad_inputs(t, images):
    """(entry point, argv, what the line must mention) for every kind of bad input tried."""
    import benchmarks.bench_compare as bench_compare
    import benchmarks.bench_ddpm as bench_ddpm
    import benchmarks.bench_shortcut as bench_shortcut
    import train_classifier
    import train_ddpm
    import train_shortcut
    import train_shortft
    import train_toy

    toy, out = train_toy.main, [f"--out_dir={t}/victim", f"--data_root={images}", "--device=cpu"]
    alone = lambda m: (lambda argv: m.train(config.resolve(argv, False), torch.device("cpu")))  # as run_alone
    rows = [(toy, [*out, a], a.split("=")[0]) for a in (
        "--ddpm_batch=0", "--ddpm_batch=-4", "--ch=0", "--ddpm_warmup=0", "--ddpm_ckpt_every=0", "--log_every=0",
        "--ft_steps=0", "--seed=-1", "--seed=99999999999", "--ddpm_lr=-1", "--ddpm_lr=inf", "--ft_lr=nan",
        "--ddpm_grad_clip=-1", "--shortcut_grad_clip=0", "--ft_grad_clip=-1", "--teacher_chain_frac=1.5",
        "--ddpm_ema=2", "--dropout=1", "--cls_label_smoothing=-0.1", "--beta_T=0.00001", "--T=10", "--ch_mult=1,x",
        "--ch_mult=0", "--n_train=5", "--n_eval=1", "--k_segments=0", "--method=sgd", "--cd_loss=l3",
        "--device=tpu", "--ft_reward_scale=-1", "--lora_rank=0", "--attn_res=a", "--sample_every=0", "--cls_batch=0",
        "--shortcut_ckpt_every=-1", "--cls_weight_decay=-1", "--stages=ddpm,foo")]
    empty, npy, wrong = f"{t}/empty.npz", f"{t}/x.npy", f"{t}/wrong.npz"
    rows += [(toy, ["sample", a, f"--ckpt={t}/victim/ddpm/ckpt.pt", f"--out={t}/s.npz", "--device=cpu"], n) for a, n in (
        ("--n=0", "--n"), ("--n=1000000000000", "--n"), ("--steps=0", "--steps"), ("--batch=0", "--batch"),
        ("--eta=2", "--eta"), ("--seed=-3", "--seed"), ("--sampler=foo", "--sampler"))]
    rows += [(toy, ["sample", f"--ckpt={c}", f"--out={t}/s.npz", "--device=cpu"], n) for c, n in (
        (empty, "corrupt"), (f"{t}/nokeys.pt", "lacks"), (f"{t}", "not found"), (npy, "corrupt"))]
    rows += [(toy, ["sample", f"--ckpt={t}/victim/ddpm/ckpt.pt", f"--out={t}/s.png"], "--out")]
    rows += [(toy, ["eval", f"--samples={s}", f"--out_dir={t}/victim"], n) for s, n in (
        (empty, "could not read"), (npy, "could not read"), (wrong, "shape"), (f"{t}/none.npz", "not found"))]
    rows += [(toy, ["eval", f"--samples={wrong}", "--target=dragon"], "dragon")]
    rows += [(alone(train_ddpm), [*out, "--ddpm_steps=0"], "--ddpm_steps"),
             (alone(train_classifier), [*out, "--cls_lr=-1"], "--cls_lr"),
             (alone(train_shortcut), [*out, "--shortcut_batch=0"], "--shortcut_batch"),
             (alone(train_shortft), [*out, "--ft_batch=-2"], "--ft_batch")]
    rows += [(m.main, ["--no_such_option=1"], "unknown option") for m in (bench_ddpm, bench_shortcut, bench_compare)]
    # past the config: the data and the output folder
    corrupt = f"{t}/corrupt"
    shutil.copytree(images, corrupt)
    open(f"{corrupt}/train/cat/0.jpg", "wb").write(b"\xff\xd8 not really a jpeg")
    data = ["--stages=ddpm", "--ddpm_steps=1", *SMALL]
    rows += [(toy, [f"--out_dir={t}/victim_file", f"--data_root={images}", *data], "victim_file"),
             (toy, [f"--out_dir={t}/c", f"--data_root={corrupt}", *data], "0.jpg"),
             (toy, [f"--out_dir={t}/readonly/run", f"--data_root={images}", *data], "readonly")]
    return rows


def test_bad_inputs_are_one_line_errors(tmp_path, images, capsys, monkeypatch):
    t = str(tmp_path)
    fake_ddpm(f"{t}/victim")  # a finished run that no bad command may touch
    open(f"{t}/victim_file", "w").write("not a folder")
    open(f"{t}/empty.npz", "wb").close()
    np.save(f"{t}/x.npy", np.zeros((4, 32, 32, 3), np.uint8))
    np.savez(f"{t}/wrong.npz", images=np.zeros((4, 16, 16, 3), np.uint8))
    torch.save({"kind": "ddpm", "config": {}}, f"{t}/nokeys.pt")
    before = {p: tree_digest(f"{t}/{p}") for p in ("victim", "victim_file")}
    with read_only_folder(f"{t}/readonly"):
        rows = bad_inputs(t, images)
        assert len(rows) >= 40
        for main, argv, needle in rows:
            line = one_line(main, argv, capsys, monkeypatch)
            assert needle in line, (argv, line)
    assert {p: tree_digest(f"{t}/{p}") for p in ("victim", "victim_file")} == before  # nothing damaged
    assert not glob.glob(f"{t}/**/*.tmp[0-9]*", recursive=True)  # no temporary file left


def test_ctrl_c_is_one_line_in_every_entry_point(capsys, monkeypatch):
    import benchmarks.bench_compare as bench_compare
    import benchmarks.bench_ddpm as bench_ddpm
    import benchmarks.bench_shortcut as bench_shortcut
    import train_toy

    def interrupted(*args, **kw):  # Ctrl-C while the entry point reads its options
        raise KeyboardInterrupt

    monkeypatch.setattr(config, "parse_overrides", interrupted)
    for main in (train_toy.main, bench_ddpm.main, bench_shortcut.main, bench_compare.main):
        monkeypatch.setattr(sys, "argv", ["prog"])
        with pytest.raises(SystemExit) as e:
            run_main(main)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 130 and len(err) == 1 and err[0].startswith("interrupted"), err
    modules = {"gpu_jobs.py", "gpu_pipeline.py", "compare_report.py", "frontier.py", "frontier_report.py",
               "results_registry.py", "results_sections.py"}  # imported by the scripts beside them, never run themselves
    for script in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")) + glob.glob(os.path.join(ROOT, "train_*.py")):
        src, name = open(script).read(), os.path.basename(script)
        if name in modules:
            assert 'if __name__ == "__main__":' not in src, script
            continue
        guard = src.split('if __name__ == "__main__":')[-1]
        if name == "results_doc.py":  # no torch there, so not sftlib's run_main: its own one-line guard
            assert "KeyboardInterrupt" in src and "sys.exit(main())" in guard, script
            continue
        assert "run_main(" in guard or "run_alone(" in guard, script  # the guard, in every entry point


# ---- 2. resume goes on with the checkpoint's config; 7. one run per folder ------------------------------

def test_resume_uses_the_checkpoints_config_and_refuses_a_conflicting_flag(tmp_path, images, capsys):
    import train_ddpm

    run = [f"--data_root={images}", "--ddpm_batch=4", "--ddpm_steps=6", "--ddpm_ckpt_every=2", "--ddpm_lr=5e-4"]
    seed_all(0)
    with pytest.raises(UserError, match="loss became nan at step 4"):  # stopped: log rows 1-3, checkpoint at 2
        nan_at(4, lambda: train_ddpm.train(cfg_of(f"--out_dir={tmp_path}/a", *run), torch.device("cpu")))
    assert np.loadtxt(f"{tmp_path}/a/ddpm/log.csv", delimiter=",", skiprows=1)[:, 0].tolist() == [1, 2, 3]
    shutil.move(f"{tmp_path}/a", f"{tmp_path}/moved")  # a moved run reads and writes where it is now
    with pytest.raises(UserError, match="--ddpm_batch=8"):
        train_ddpm.train(cfg_of(f"--out_dir={tmp_path}/moved", f"--data_root={images}", "--resume", "--ddpm_batch=8"),
                         torch.device("cpu"))
    cfg = cfg_of(f"--out_dir={tmp_path}/moved", f"--data_root={images}", "--resume", "--ddpm_lr=1e-4")
    capsys.readouterr()
    train_ddpm.train(cfg, torch.device("cpu"))  # only the learning rate may change (and the budget)
    out = capsys.readouterr().out
    assert "ddpm_lr 0.0005 -> 0.0001" in out and "ddpm_batch=4 " in out  # the printed config is the one that ran
    ckpt = load_checkpoint(f"{tmp_path}/moved/ddpm/ckpt.pt", "ddpm")
    assert ckpt["step"] == 6 and ckpt["config"]["ddpm_batch"] == 4 and ckpt["config"]["ddpm_lr"] == 1e-4
    assert ckpt["config"]["out_dir"] == f"{tmp_path}/moved" and not os.path.exists(f"{tmp_path}/a")
    steps = np.loadtxt(f"{tmp_path}/moved/ddpm/log.csv", delimiter=",", skiprows=1)[:, 0]
    assert list(steps) == [1, 2, 3, 4, 5, 6]  # step 3 of the stopped run is not repeated
    # a complete stage trained on with a larger budget is unfinished again until it ends: its export goes first,
    # so a shortcut is never distilled from the half-trained teacher a stopped extension leaves behind
    export = f"{tmp_path}/moved/ddpm/model.safetensors"
    assert os.path.isfile(export)
    more = cfg_of(f"--out_dir={tmp_path}/moved", f"--data_root={images}", "--resume", "--ddpm_steps=10")
    with pytest.raises(UserError, match="loss became nan at step 8"):
        nan_at(2, lambda: train_ddpm.train(more, torch.device("cpu")))
    assert not os.path.exists(export)
    import train_shortcut
    with pytest.raises(UserError, match="unfinished"):
        train_shortcut.train(cfg_of(f"--out_dir={tmp_path}/moved", f"--data_root={images}"), torch.device("cpu"))


def nan_at(n, fn):
    """Run fn with the n-th eps-loss replaced by NaN."""
    import ddpm

    calls, eps_loss = [0], ddpm.eps_loss

    def poisoned(*a, **kw):
        calls[0] += 1
        loss = eps_loss(*a, **kw)
        return loss * float("nan") if calls[0] == n else loss

    ddpm.eps_loss = poisoned
    try:
        return fn()
    finally:
        ddpm.eps_loss = eps_loss


def test_second_run_on_the_same_folder_is_refused(tmp_path):
    from sftlib.stage import Stage

    folder = tmp_path / "ddpm"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from sftlib.stage import lock_folder; lock_folder(sys.argv[2]); print('locked', flush=True); "
                               "time.sleep(60)", ROOT, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="another run is using"):
            Stage(cfg_of(f"--out_dir={tmp_path}"), "ddpm", "ddpm", "ddpm_steps").start(0)
    finally:
        holder.kill()
        holder.wait()
    Stage(cfg_of(f"--out_dir={tmp_path}"), "ddpm", "ddpm", "ddpm_steps").start(0)  # the lock died with its process


def test_one_lock_per_output_folder_for_the_whole_run(tmp_path):
    """A run holds its --out_dir, not only the stage it is in: a second train_toy.py, a stage script or the
    probe on the same folder stops with one line before reading or writing anything, whichever stage it wants."""
    import train_shortcut
    import train_toy
    from benchmarks import ft_probe
    from sftlib import stage

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from sftlib.stage import lock_folder; lock_folder(sys.argv[2]); print('locked', flush=True); "
                               "time.sleep(60)", ROOT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for main in (train_toy.main, stage.alone_main(train_shortcut.train, "doc"), ft_probe.main):
            with pytest.raises(UserError, match="another run is using"):
                main([f"--out_dir={tmp_path}", "--stages=shortcut", "--device=cpu"] if main is train_toy.main
                     else [f"--out_dir={tmp_path}", "--device=cpu"])
        assert sorted(os.listdir(tmp_path)) == ["lock"]  # nothing else was read or written
    finally:
        holder.kill()
        holder.wait()


# ---- 4. NaN never reaches a checkpoint -----------------------------------------------------------------

@pytest.mark.parametrize("stage", ["ddpm", "classifier"])
def test_nan_update_leaves_the_last_checkpoint_finite(tmp_path, images, monkeypatch, stage):
    """The 4th optimiser step writes NaN into the weights; the checkpoint due at step 4 is refused."""
    import train_classifier
    import train_ddpm

    opt_cls = torch.optim.Adam if stage == "ddpm" else torch.optim.SGD
    calls, step = [0], opt_cls.step

    def poisoned(self, *a, **kw):
        out = step(self, *a, **kw)
        calls[0] += 1
        if calls[0] == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(opt_cls, "step", poisoned)
    cfg = cfg_of(f"--out_dir={tmp_path}", f"--data_root={images}", "--ddpm_batch=4", "--ddpm_steps=6",
                 "--ddpm_ckpt_every=2", "--cls_batch=4", "--classifier_steps=6", "--cls_ckpt_every=2")
    with pytest.raises(UserError, match="NaN or infinite at step 4"):
        if stage == "ddpm":
            train_ddpm.train(cfg, torch.device("cpu"))
        else:
            train_classifier.train_net("classifier", cfg, torch.device("cpu"))
    from sftlib.stage import first_nonfinite

    ckpt = load_checkpoint(f"{tmp_path}/{stage}/ckpt.pt", stage)
    assert ckpt["step"] == 2 and first_nonfinite(ckpt) is None


# ---- 6. disk full ----------------------------------------------------------------------------------------

def test_disk_full_is_one_line_and_leaves_no_temporary_file(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)]).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a 1 MiB tmpfs here (needs root)")
    try:
        path = str(folder / "ckpt.pt")
        save_atomic({"w": torch.ones(1000)}, path)  # 4 kB: fits
        with pytest.raises(UserError, match="disk full while writing"):
            save_atomic({"w": torch.ones(1_000_000)}, path)  # 4 MB: does not
        assert os.listdir(folder) == ["ckpt.pt"]  # no temporary file left
        assert torch.equal(torch_load_trusted(path)["w"], torch.ones(1000))  # the earlier file intact
        with pytest.raises(UserError, match="disk full while writing"):  # plain file writes, too
            from sftlib.common import write_text
            write_text(str(folder / "metrics.json"), "x" * 2_000_000)
        assert os.listdir(folder) == ["ckpt.pt"]
    finally:
        import gc

        gc.collect()  # torch.save's failed writer may still hold its file until collected
        subprocess.run(["umount", "-l", str(folder)])


# ---- 8. the shortcut stage resumes exactly; log.csv keeps one row per step -------------------------------

def test_shortcut_stopped_and_resumed_ends_equal_to_an_unstopped_run(tmp_path, images, monkeypatch):
    import train_shortcut

    def run(out, *extra):
        return train_shortcut.train(cfg_of(f"--out_dir={out}", f"--data_root={images}", "--shortcut_batch=4",
                                           "--shortcut_steps=5", "--shortcut_ckpt_every=2", *extra), torch.device("cpu"))

    for out in ("a", "b"):
        fake_ddpm(str(tmp_path / out))
    seed_all(0)
    run(tmp_path / "a")
    calls, cd_loss = [0], train_shortcut.cd_loss

    def ctrl_c_at_step_4(*a, **kw):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return cd_loss(*a, **kw)

    monkeypatch.setattr(train_shortcut, "cd_loss", ctrl_c_at_step_4)
    seed_all(0)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(train_shortcut, "cd_loss", cd_loss)
    seed_all(123)  # the resumed run's RNG comes from the checkpoint, not from here
    run(tmp_path / "b", "--resume")
    a, b = (load_checkpoint(str(tmp_path / o / "shortcut" / "ckpt.pt"), "shortcut") for o in ("a", "b"))
    assert a["step"] == b["step"] == 5
    for key in ("model", "ema", "target"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert torch.equal(a["chains"]["x"], b["chains"]["x"])
    for o in ("a", "b"):
        steps = np.loadtxt(tmp_path / o / "shortcut" / "log.csv", delimiter=",", skiprows=1)[:, 0]
        assert steps.tolist() == [1, 2, 3, 4, 5], (o, steps)


# ---- 3. done is written last; 9. a fine-tuned checkpoint names its base by hash ----------------------------

def test_stop_during_final_evaluation_then_resume_writes_every_output(tmp_path, monkeypatch):
    import train_shortft
    from sftlib import metrics
    from sftlib.models import load_finetuned

    out = tmp_path / "run"
    base_cfg = fake_ddpm(str(out))
    teacher = load_checkpoint(str(out / "ddpm" / "ckpt.pt"), "ddpm")
    save_atomic(dict(teacher, kind="shortcut", edges=[761, 501, 261, 1]), str(out / "shortcut" / "ckpt.pt"))
    from sftlib.common import export_safetensors
    export_safetensors(teacher["ema"], base_cfg, str(out / "shortcut" / "model.safetensors"), kind="shortcut")
    os.makedirs(out / "evaluator")
    open(out / "evaluator" / "ckpt.pt", "w").close()  # present; the judge itself is stubbed below
    calls = [0]

    def judge(images, *a, **kw):  # the held-out judge, stubbed: this test is about what is written when
        calls[0] += 1
        if calls[0] == 2:  # the evaluation after training: Ctrl-C there
            raise KeyboardInterrupt
        return {"fd": 1.0, "diversity": 1.0, "reward_mean": float(images.mean())}

    monkeypatch.setattr(metrics, "evaluate_samples", judge)
    args = [f"--out_dir={out}", "--reward=brightness", "--ft_steps=2", "--ft_batch=1", "--n_eval=2", "--ft_ckpt_every=1"]
    with pytest.raises(KeyboardInterrupt):
        train_shortft.train(cfg_of(*args), torch.device("cpu"))
    ckpt = load_checkpoint(str(out / "shortft" / "ckpt.pt"), "shortft")
    assert ckpt["step"] == 2 and not ckpt["done"]  # not done: its outputs do not exist yet
    with pytest.raises(UserError, match="--resume"):
        train_shortft.train(cfg_of(*args), torch.device("cpu"))
    train_shortft.train(cfg_of(*args, "--resume"), torch.device("cpu"))
    assert load_checkpoint(str(out / "shortft" / "ckpt.pt"), "shortft")["done"]
    for f in ("metrics.json", "log.csv", "before_after.png", "reward.png", "lora.safetensors"):
        assert (out / "shortft" / f).is_file(), f
    assert np.loadtxt(out / "shortft" / "log.csv", delimiter=",", skiprows=1)[:, 0].tolist() == [1, 2]
    os.rename(out / "shortcut" / "model.safetensors", out / "shortcut" / "aside")  # provenance: an unfinished upstream
    with pytest.raises(UserError, match="the shortcut stage in .* is unfinished"):  # is refused before anything runs
        train_shortft.train(cfg_of(*args), torch.device("cpu"))
    os.rename(out / "shortcut" / "aside", out / "shortcut" / "model.safetensors")
    # moved elsewhere, the checkpoint finds its own base beside it, by hash, wherever the command runs
    moved = tmp_path / "elsewhere"
    shutil.move(str(out), str(moved))
    monkeypatch.chdir(tmp_path)
    load_finetuned(str(moved / "shortft" / "ckpt.pt"), "cpu")
    fake_ddpm(str(moved), seed=1, **{k: base_cfg[k] for k in ("ch",)})  # another base in its place
    with pytest.raises(UserError, match="another base model"):
        load_finetuned(str(moved / "shortft" / "ckpt.pt"), "cpu")
    shutil.rmtree(moved / "ddpm")
    with pytest.raises(UserError, match="base model .* is missing"):
        load_finetuned(str(moved / "shortft" / "ckpt.pt"), "cpu")


def test_a_stage_run_alone_is_seeded_by_its_seed_flag(tmp_path):
    """train_<stage>.py --seed=S starts from the same generators as train_toy.py --seed=S: without
    seeding, a torch process starts from a random seed and --seed would do nothing."""
    import random

    from sftlib import stage

    drawn = []
    record = lambda cfg, device: drawn.append((torch.rand(3), np.random.rand(), random.random(), cfg["seed"]))
    for s in (3, 3, 4):
        stage.alone_main(record, "doc")([f"--seed={s}", "--device=cpu", f"--out_dir={tmp_path}"])
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    oracle = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(drawn[0][0], oracle[0]) and drawn[0][1:3] == oracle[1:] and drawn[0][3] == 3
    assert torch.equal(drawn[1][0], drawn[0][0])
    assert not torch.equal(drawn[2][0], drawn[0][0]) and drawn[2][1] != drawn[0][1]
    for script in ("train_ddpm.py", "train_shortcut.py", "train_classifier.py", "train_shortft.py"):
        assert "run_alone(" in open(os.path.join(ROOT, script)).read(), script  # every stage script goes through it
