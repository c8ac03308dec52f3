"""The layout: the import graph of the project's own modules is a DAG that reads bottom-up (concepts ->
library -> stages -> entry points and benchmarks), no file outside tests/ is over 400 lines, and every
entry point answers --help with all its options."""
import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

CONCEPTS = {"ddpm", "unet", "consistency", "tlora", "shortft", "baselines", "rewards"}  # what a paper reader opens first
SCRIPTS = {"train_toy", "train_ddpm", "train_shortcut", "train_classifier", "train_shortft", "train_sd"}


def modules():
    """{module name: file} for the root .py files, sftlib/ and benchmarks/ (as 'sftlib.x', 'benchmarks.x')."""
    found = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    for pkg in ("sftlib", "benchmarks"):
        for f in os.listdir(os.path.join(ROOT, pkg)):
            if f.endswith(".py") and f != "__init__.py":
                found[f"{pkg}.{f[:-3]}"] = os.path.join(ROOT, pkg, f)
    return found


def imports(path, names):
    """The project modules that `path` imports anywhere in it (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # from sftlib import config
    return out & set(names)


def graph():
    mods = modules()
    return {m: imports(p, mods) for m, p in mods.items()}


def test_import_graph_is_a_dag():
    g = graph()
    assert {"shortft", "consistency", "sftlib.config", "train_shortcut"} <= set(g)  # the parser sees the tree
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for d in sorted(g[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in g:
        visit(m, [])


def test_a_cycle_would_be_found(tmp_path):
    """The checker itself: two files importing each other are a cycle."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    names = {"a": 0, "b": 0}
    assert imports(str(tmp_path / "a.py"), names) == {"b"} and imports(str(tmp_path / "b.py"), names) == {"a"}


def test_concepts_and_library_import_no_stage_or_entry_point():
    for m, deps in graph().items():
        if m in CONCEPTS or m.startswith("sftlib."):
            bad = {d for d in deps if d in SCRIPTS or d.startswith("benchmarks.")}
            assert not bad, f"{m} imports {bad}"


def test_concepts_import_only_concepts():
    """The paper's files read on their own: a concept imports other concepts (and torch), never the library,
    a stage, an entry point or a benchmark."""
    g = graph()
    assert CONCEPTS <= set(g), CONCEPTS - set(g)
    for m in CONCEPTS:
        assert g[m] <= CONCEPTS, f"{m} imports {g[m] - CONCEPTS}"


def test_stages_import_no_entry_point_or_benchmark():
    """The layers read bottom-up: a stage (train_ddpm, ...) is imported by the entry point and the benchmarks,
    never the other way round."""
    for m, deps in graph().items():
        if m in SCRIPTS - {"train_toy"}:
            bad = {d for d in deps if d == "train_toy" or d.startswith("benchmarks.")}
            assert not bad, f"{m} imports {bad}"


def test_the_layer_check_sees_a_concept_importing_the_library(tmp_path):
    """The check itself: a concept file importing sftlib is caught by the same parser."""
    (tmp_path / "c.py").write_text("import torch\nfrom sftlib.common import UserError\n")
    assert imports(str(tmp_path / "c.py"), {"sftlib.common": 0, "ddpm": 0}) == {"sftlib.common"}


def test_no_file_outside_tests_is_over_400_lines():
    found = {}
    for dirpath, dirnames, files in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("tests", "data", "out", "__pycache__")]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                with open(path, encoding="utf-8") as fh:
                    found[os.path.relpath(path, ROOT)] = sum(1 for _ in fh)
    assert "shortft.py" in found and "benchmarks/bench_compare.py" in found  # the walk sees the tree
    over = {f: n for f, n in found.items() if n > 400}
    assert not over, over


def test_no_root_module_shadows_a_common_package():
    for name in ("config", "common", "data", "evaluate", "utils", "sd", "lora", "classifier", "bench"):
        assert not os.path.exists(os.path.join(ROOT, name + ".py")), name


@pytest.mark.parametrize("script,key", [("train_toy.py", "--ddpm_lr"), ("train_ddpm.py", "--ddpm_batch"),
                                        ("train_shortcut.py", "--shortcut_steps"), ("train_shortft.py", "--ft_lr"),
                                        ("train_classifier.py", "--cls_batch"),
                                        ("benchmarks/bench_compare.py", "--seconds")])
def test_help_lists_every_option(script, key):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert key in p.stdout and "default:" in p.stdout, p.stdout[-2000:]
    if script == "train_toy.py":
        from sftlib import config

        missing = [k for k in config.DEFAULTS if f"--{k} " not in p.stdout.replace("\n", " ")]
        assert not missing, missing
        assert "(float, default: 0.001)" in " ".join(p.stdout.split())  # --ddpm_lr: type and default
        assert "linear lr warmup" in p.stdout  # the comment beside the key in the defaults
