"""Damaged artefacts and bad options, generated from a real tiny run: every file the pipeline writes is
truncated, overwritten with random bytes, given wrong-typed metadata (JSON, .safetensors, checkpoints,
.npz) or deleted, and the command that reads it is run. Each case must end in one stderr line and a
non-zero exit code with no other file changed, or, for a file the command rebuilds (a cache, a deleted
log), in a rebuilt file. Tallies (cases, clean, tracebacks, accepted) go to the pytest tmp dir."""
import contextlib
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from sftlib.common import run_main

# the smallest pipeline that writes every kind of file: 10 s on one core
TINY_RUN = ["--preset=cpu", "--device=cpu", "--ch=8", "--ch_mult=1,2", "--num_res_blocks=1", "--attn_res=",
            "--n_train=100", "--n_test=100", "--ddpm_steps=2", "--ddpm_batch=4", "--ddpm_ckpt_every=1", "--log_every=1",
            "--sample_every=1000", "--shortcut_steps=2", "--shortcut_batch=4", "--classifier_steps=2",
            "--evaluator_steps=2", "--judge_steps=2", "--cls_batch=8", "--classifier_width=4", "--evaluator_width=4",
            "--judge_width=4", "--ft_steps=2", "--ft_batch=1", "--n_eval=4", "--ft_ckpt_every=1", "--grid_ddpm=4",
            "--grid_shortcut=2", "--grid_ft=2", "--sample_batch=8"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cifar_root):
    """(pristine run folder, scratch folder): the whole pipeline at toy size, and `sample`'s output in it."""
    root = tmp_path_factory.mktemp("corruption")
    run = str(root / "run")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_toy.py"), f"--out_dir={run}",
                        f"--data_root={cifar_root}", *TINY_RUN], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    code, err = call(["sample", f"--ckpt={run}/ddpm/ckpt.pt", "--n=4", "--steps=2", f"--out={run}/samples.npz",
                      "--device=cpu"])
    assert code == 0, err
    return run, str(root)


def call(argv, main=None):
    """(exit code, stderr) of an entry point's main run through run_main as `prog ARGV`, in this process.
    An exception escaping run_main is what would have been a traceback: returned as code 'traceback'."""
    if main is None:
        import train_toy

        main = train_toy.main
    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["prog", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_main(main)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if isinstance(e.code, str):  # sys.exit("error: ...") prints it
            err.write(e.code + "\n")
    except BaseException as e:  # noqa: BLE001 - any other escape is a traceback
        return "traceback", f"{type(e).__name__}: {e}"
    finally:
        sys.argv = old
    return code, err.getvalue()


def digest(folder):
    """{relative path: sha1} of every file under folder, lock files left out (opened, never written)."""
    return {os.path.relpath(p, folder): hashlib.sha1(open(p, "rb").read()).hexdigest()
            for p in glob.glob(os.path.join(folder, "**"), recursive=True)
            if os.path.isfile(p) and os.path.basename(p) != "lock"}


# ---- which command reads which file ----------------------------------------------------------------------

def reader_of(rel, run, scratch, cifar):
    """(argv, files to remove first so that the command reads rel) of the command that reads run/rel,
    or None when no command reads it (images, lock files, the LoRA export and the fine-tuning's own log)."""
    out = f"--out={scratch}/out/o.npz"
    evaluate = ["eval", f"--samples={run}/samples.npz", f"--out_dir={run}", "--target=ship", "--device=cpu"]
    resume = lambda *a: [f"--out_dir={run}", f"--data_root={cifar}", "--preset=cpu", "--device=cpu", "--resume", *a]
    if rel == "ddpm/ckpt.pt":
        return ["sample", f"--ckpt={run}/{rel}", "--n=2", "--steps=2", out, "--device=cpu"], ()
    if rel in ("shortcut/ckpt.pt", "shortcut/model.safetensors"):
        return ["sample", f"--ckpt={run}/{rel}", "--n=2", "--sampler=shortcut", out, "--device=cpu"], ()
    if rel in ("ddpm/model.safetensors", "shortft/ckpt.pt"):
        return ["sample", f"--ckpt={run}/{rel}", "--n=2", "--steps=2", out, "--device=cpu"], ()
    if rel in ("classifier/ckpt.pt", "evaluator/ckpt.pt", "judge/ckpt.pt", "evaluator/real_stats.npz",
               "judge/real_stats.npz", "samples.npz"):
        return evaluate, ()
    if rel == "shortft/metrics.json":
        return [f"--out_dir={run}", "--stages=shortft", "--preset=cpu", "--device=cpu"], ()
    for stage, steps in (("ddpm", "ddpm_steps"), ("shortcut", "shortcut_steps"), ("classifier", "classifier_steps"),
                         ("evaluator", "evaluator_steps"), ("judge", "judge_steps")):
        if rel == f"{stage}/log.csv":  # read when the stage resumes with a larger budget
            return resume(f"--stages={'classifier' if stage in ('evaluator', 'judge') else stage}", f"--{steps}=3"), ()
    if rel.startswith("cache/"):
        if "_half1_" in rel:
            return resume("--stages=classifier", "--judge_steps=3"), ()  # the judge's own images
        if "_half0_" in rel:
            return evaluate, ("judge/real_stats.npz",)  # the judge's floor images, when its statistics are made
        if "_test_" in rel:
            return evaluate, ("evaluator/real_stats.npz",)
        return resume("--stages=classifier", "--classifier_steps=3"), ()
    return None


REBUILT_WHEN_DELETED = ("evaluator/real_stats.npz", "judge/real_stats.npz", "cache/", "/log.csv")
# optional by design: eval scores without the reward classifier's view, and without a judge (older run folders)
OPTIONAL = ("classifier/ckpt.pt", "judge/ckpt.pt")


# ---- the damages ------------------------------------------------------------------------------------------

def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def random_bytes(path):
    n = os.path.getsize(path)
    open(path, "wb").write(np.random.default_rng(n).integers(0, 256, max(n, 64), dtype=np.uint8).tobytes())


def edit_ckpt(change):
    def damage(path):
        ckpt = torch.load(path, weights_only=True)
        change(ckpt)
        torch.save(ckpt, path)
    return damage


def edit_json(change):
    def damage(path):
        m = json.load(open(path))
        m = change(m) or m
        open(path, "w").write(json.dumps(m))
    return damage


def edit_safetensors(meta_change=None, nan=False):
    def damage(path):
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(path, "pt") as f:
            meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
        if meta_change:
            meta_change(meta)
        if nan:
            state = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, path, metadata=meta)
    return damage


def edit_npz(change):
    def damage(path):
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        change(arrays)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    return damage


def set_key(d, key, value):
    d[key] = value


def ckpt_damages(rel):
    """Wrong-typed or out-of-range fields of a checkpoint: every one must be refused."""
    d = {"config not a dict": edit_ckpt(lambda c: set_key(c, "config", [1, 2])),
         "kind a number": edit_ckpt(lambda c: set_key(c, "kind", 5)),
         "step a string": edit_ckpt(lambda c: set_key(c, "step", "ten")),
         "config ch a string": edit_ckpt(lambda c: set_key(c["config"], "ch", "big")),
         "config beta_T out of range": edit_ckpt(lambda c: set_key(c["config"], "beta_T", 7.0))}
    if not rel.startswith("classifier"):  # the reward classifier's own config is never read
        d["config without a key it needs"] = edit_ckpt(lambda c: c["config"].pop(
            "data_root" if c["kind"] in ("evaluator", "judge") else "T"))
    weights = {"ddpm": "ema", "shortcut": "ema", "shortft": "unet"}.get(rel.split("/")[0], "model")
    d["weights all NaN"] = edit_ckpt(lambda c: c[weights].update(
        {k: v.fill_(float("nan")) for k, v in c[weights].items() if v.is_floating_point()}))
    if rel.startswith(("shortcut", "shortft")):
        d["edges out of range"] = edit_ckpt(lambda c: set_key(c, "edges", [5000, 1]))
        d["edges not ints"] = edit_ckpt(lambda c: set_key(c, "edges", ["a"]))
    if rel.startswith("shortft"):
        d["base_sha256 a number"] = edit_ckpt(lambda c: set_key(c, "base_sha256", 12))
    if rel.startswith(("classifier", "evaluator", "judge")):
        d["unknown architecture"] = edit_ckpt(lambda c: set_key(c, "arch", {"name": "transformer", "width": 4}))
        d["negative width"] = edit_ckpt(lambda c: set_key(c, "arch", dict(c["arch"], width=-4)))
        d["test_acc 7"] = edit_ckpt(lambda c: set_key(c, "test_acc", 7.0))
    return d


def damages_of(rel):
    """{name: damage(path)} for the file run/rel, by its kind."""
    d = {"truncated": truncate, "random bytes": random_bytes}
    if rel.endswith(".pt"):
        d.update(ckpt_damages(rel))
    elif rel.endswith(".safetensors"):
        d.update({"kind not a string": edit_safetensors(lambda m: set_key(m, "kind", "5")),
                  "metadata not JSON": edit_safetensors(lambda m: set_key(m, "config", "{torn")),
                  "config ch a string": edit_safetensors(lambda m: set_key(m, "config", json.dumps(
                      dict(json.loads(m["config"]), ch="big")))),
                  "weights all NaN": edit_safetensors(nan=True)})
        if "shortcut" in rel:
            d["edges out of range"] = edit_safetensors(lambda m: set_key(m, "edges", "[5000, 1]"))
    elif rel.endswith(".json"):
        d.update({"a list": edit_json(lambda m: [1, 2]), "after not an object": edit_json(lambda m: set_key(m, "after", 3)),
                  "n_samples a string": edit_json(lambda m: set_key(m["after"], "n_samples", "four")),
                  "a metric a string": edit_json(lambda m: set_key(m["after"], "fd", "low")),
                  "not UTF-8": lambda p: open(p, "ab").write(b"\xff\xfe")})
    elif rel.endswith(".npz"):
        first = "images" if rel == "samples.npz" else "x" if rel.startswith("cache/") else "mu_test"
        d.update({"object array": edit_npz(lambda a: set_key(a, first, np.array([{"a": 1}] * 4, dtype=object))),
                  "wrong dtype": edit_npz(lambda a: set_key(a, first, a[first].astype(np.complex64))),
                  "wrong shape": edit_npz(lambda a: set_key(a, first, a[first].reshape(-1)[:7])),
                  "array missing": edit_npz(lambda a: a.pop(first))})
        if rel.endswith("real_stats.npz"):
            d["labels out of range"] = edit_npz(lambda a: set_key(a, "labels_test", a["labels_test"] + 50))
            d["NaN features"] = edit_npz(lambda a: a["feats_train"].fill(np.nan))
        if rel.startswith("cache/"):
            d["fewer labels than images"] = edit_npz(lambda a: set_key(a, "y", a["y"][:-1]))
    elif rel.endswith(".csv"):
        d.update({"not a number": lambda p: open(p, "a").write("3,abc,1\n"),
                  "another header": lambda p: open(p, "w").write("foo,bar\n1,2\n"),
                  "not UTF-8": lambda p: open(p, "ab").write(b"\xff\xfe\n")})
    d["deleted"] = os.remove
    return d


def restore(work, pristine, then, now):
    """Make `work` (whose digest is `now`) byte-identical to `pristine` (whose digest is `then`) again."""
    for rel in now.keys() - then.keys():
        os.remove(os.path.join(work, rel))
    for rel, h in then.items():
        if now.get(rel) != h:
            shutil.copyfile(os.path.join(pristine, rel), os.path.join(work, rel))


def classify(code, err, changed, rebuilt_ok):
    """'traceback', 'accepted' (exit 0 on a damaged file), 'clean', or what else went wrong."""
    if code == "traceback" or "Traceback" in err:
        return "traceback"
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 0:
        return "clean" if rebuilt_ok else "accepted"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return "not one line"
    return "other files changed" if changed else "clean"


def tally_of(results):
    kinds = [r[-1] for r in results]
    return dict(cases=len(kinds), clean=kinds.count("clean"), tracebacks=kinds.count("traceback"),
                accepted=kinds.count("accepted"), other=len(kinds) - kinds.count("clean") - kinds.count("traceback")
                - kinds.count("accepted"))


def test_every_damaged_artefact_is_one_line_and_changes_nothing_else(tiny_run, tmp_path, cifar_root):
    pristine, scratch = tiny_run
    work = str(tmp_path / "run")
    shutil.copytree(pristine, work)
    os.makedirs(f"{scratch}/out", exist_ok=True)
    then = digest(pristine)
    files = sorted(then)
    results, unread = [], []
    for rel in files:
        reader = reader_of(rel, work, scratch, cifar_root)
        if reader is None:
            unread.append(rel)
            continue
        argv, prep = reader
        for name, damage in damages_of(rel).items():
            for p in prep:
                os.remove(os.path.join(work, p))
            damage(os.path.join(work, rel))
            before = {k: v for k, v in then.items() if k != rel and k not in prep}  # work was pristine
            code, err = call(argv)
            after = digest(work)
            changed = {k: v for k, v in after.items() if k != rel} != before
            rebuilt = name == "deleted" and code == 0 and (rel in OPTIONAL or any(
                t in rel for t in REBUILT_WHEN_DELETED) and os.path.isfile(os.path.join(work, rel)))
            results.append((rel, name, code, err.strip()[-300:], classify(code, err, changed, rebuilt)))
            restore(work, pristine, then, after)
    tally = tally_of(results)
    with open(tmp_path.parent / "corruption_tally.json", "w") as f:
        json.dump(dict(tally, unread=unread, cases_by_file={r[0]: [x[1] for x in results if x[0] == r[0]]
                                                            for r in results},
                       failures=[r for r in results if r[-1] != "clean"]), f, indent=1)
    print("corruption tally:", tally, "files no command reads:", unread)
    assert len({r[0] for r in results}) >= 20, sorted({r[0] for r in results})  # every kind of file was damaged
    assert tally["tracebacks"] == 0 and tally["accepted"] == 0, [r for r in results if r[-1] != "clean"]
    assert tally["clean"] == tally["cases"], [r for r in results if r[-1] != "clean"]


# ---- bad options, over the entry points --------------------------------------------------------------------

def entry(name):
    """An entry point's main(argv)."""
    import train_toy

    if name == "train_ddpm.py":
        import train_ddpm
        from sftlib.stage import alone_main

        return alone_main(train_ddpm.train, "doc")
    if name.startswith("benchmarks/"):
        import importlib

        return importlib.import_module(name[:-3].replace("/", ".")).main
    return train_toy.main


def bad_options(run, scratch):
    """{entry point: [argv, ...]}: options that do not apply, are out of range, or conflict."""
    ckpt, out = f"--ckpt={run}/ddpm/ckpt.pt", f"--out={scratch}/bad/o.npz"
    sample = lambda *a: ["sample", ckpt, "--n=2", out, "--device=cpu", *a]
    short = lambda *a: ["sample", f"--ckpt={run}/shortcut/ckpt.pt", "--sampler=shortcut", "--n=2", out, "--device=cpu",
                        *a]
    evaluate = lambda *a: ["eval", f"--samples={run}/samples.npz", f"--out_dir={run}", "--device=cpu", *a]
    stage = lambda *a: [f"--out_dir={scratch}/victim", "--device=cpu", "--preset=cpu", *a]
    return {
        "train_toy.py": [stage(a) for a in ("--ddpm_steps=-1", "--ft_lr=inf", "--reward=inf*brightness",
                                            "--reward=nan*brightness", "--reward=brightness:7", "--seed=-2",
                                            "--n_eval=1", "--stages=ddpm,nope", "--ddpm_lr=nan", "--frobnicate=1")],
        "train_toy.py sample": [sample("--sampler=ddpm", "--eta=0.5"), short("--eta=0.3"), short("--steps=7"),
                                sample("--sampler=ddpm", "--steps=20"), sample("--n=-1"), sample("--eta=-1"),
                                sample("--batch=0"), sample("--sampler=euler"), sample("--steps=0"),
                                ["sample", ckpt, "--out=o.txt"]],
        "train_toy.py eval": [evaluate("--n_boot=-5"), evaluate("--fid_ref_n=0"), evaluate("--target=dragon"),
                              evaluate("--reward=inf*brightness"), evaluate("--device=tpu"), ["eval"]],
        "train_ddpm.py": [stage(a) for a in ("--ddpm_batch=0", "--ddpm_ema=1.5", "--ch_mult=1,,2", "--T=3")],
        "benchmarks/bench_shortcut.py": [[f"--out_dir={run}", "--device=cpu", a] for a in ("--n=0", "--n=-3",
                                                                                         "--grad_batch=0", "--nope=1")],
        "benchmarks/bench_ddpm.py": [["--device=cpu", a] for a in ("--iters=0", "--iters=-2", "--nope=1")],
    }


@pytest.mark.parametrize("name", ["train_toy.py", "train_toy.py sample", "train_toy.py eval", "train_ddpm.py",
                                  "benchmarks/bench_shortcut.py", "benchmarks/bench_ddpm.py"])
def test_bad_options_are_one_line_errors(tiny_run, tmp_path, name):
    run, scratch = tiny_run
    before = digest(run)
    results = []
    for argv in bad_options(run, scratch)[name]:
        code, err = call(argv, entry(name))
        results.append((name, " ".join(a for a in argv if run not in a and scratch not in a), code, err.strip(),
                        classify(code, err, False, False)))
    assert digest(run) == before  # no bad option touched the run
    assert not glob.glob(f"{scratch}/victim/**/ckpt.pt", recursive=True)  # nor trained anything
    tally = tally_of(results)
    with open(tmp_path.parent / "bad_options_tally.jsonl", "a") as f:
        f.write(json.dumps(dict(tally, entry=name)) + "\n")
    assert tally["tracebacks"] == 0 and tally["accepted"] == 0, [r for r in results if r[-1] != "clean"]
    assert tally["clean"] == tally["cases"], [r for r in results if r[-1] != "clean"]


def test_a_killed_sample_leaves_no_temporary_file_behind(tiny_run, tmp_path):
    """atomic_path's temporary files of a `sample` killed mid-write (a dead process id) are removed by the next
    `sample` to the same output; one of a live process (this one's parent) is kept."""
    run, _ = tiny_run
    out = tmp_path / "s.npz"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [tmp_path / f"s.tmp{dead.stdout.strip()}.npz", tmp_path / f"s.tmp{dead.stdout.strip()}.png"]
    live = tmp_path / f"s.tmp{os.getppid()}.npz"
    for p in stale + [live]:
        p.write_bytes(b"torn")
    code, err = call(["sample", f"--ckpt={run}/ddpm/ckpt.pt", "--n=2", "--steps=2", f"--out={out}", "--device=cpu"])
    assert code == 0, err
    assert not any(p.exists() for p in stale) and live.exists()
    assert np.load(out)["images"].shape == (2, 32, 32, 3)


def test_the_readers_know_every_classifier_architecture():
    """sftlib/readers.py names the architectures a checkpoint may hold without importing sftlib/nets.py (which
    reads checkpoints through it): the two lists are the same."""
    from sftlib import nets, readers

    assert set(readers.ARCH_NAMES) == set(nets.ARCHS)
