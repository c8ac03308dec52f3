"""docs/results.md is generated from benchmarks/results/ by benchmarks/results_doc.py: the committed document is
exactly what the results files give, its numbers are the files' numbers in the right tables, and a broken or
missing results file stops the generator with one line naming it."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "results_doc.py")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DOC = os.path.join(ROOT, "docs", "results.md")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def result(name):
    with open(os.path.join(RESULTS, name), encoding="utf-8") as f:
        return json.load(f)


def section(doc, name):
    """The `### ` section of the document whose tag names benchmarks/results/<name>."""
    found = [s for s in doc.split("\n### ") if f"- **File:** `benchmarks/results/{name}`" in s]
    assert len(found) == 1, f"{name}: {len(found)} sections name it"
    return found[0]


def cell(text, column, row, after=""):
    """The cell in `column` of the row whose first cell is `row`, in the first table after the line starting with `after`."""
    lines = text.split("\n")
    start = next(i for i, ln in enumerate(lines) if ln.startswith(after)) if after else 0
    i = next(i for i in range(start, len(lines)) if lines[i].startswith("| "))
    split = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")]
    head, body = split(lines[i]), []
    for ln in lines[i + 2:]:
        if not ln.startswith("| "):
            break
        body.append(split(ln))
    return [r for r in body if r[0] == row][0][head.index(column)]


def test_committed_doc_is_what_the_results_files_give(tmp_path):
    p = run("--check")
    assert p.returncode == 0, p.stderr
    out = tmp_path / "results.md"
    assert run(f"--out={out}").returncode == 0
    assert out.read_bytes() == open(DOC, "rb").read()
    # and the generator stays light: no torch, no numpy
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(SCRIPT)!r}); import results_doc; "
            f"results_doc.build({RESULTS!r}); assert not {{'torch', 'numpy'}} & set(sys.modules), 'heavy import'")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60).returncode == 0


def test_numbers_are_the_files_numbers_in_their_tables():
    doc = open(DOC, encoding="utf-8").read()
    # 1. ShortFT's ship-rate gain on today's base: mean and bootstrap interval, as recorded
    m, (lo, hi) = result("compare_cpu_epsskip.json")["summary"]["shortft"]["gain_mean_ci"]
    assert cell(section(doc, "compare_cpu_epsskip.json"), "held-out target rate gain", "shortft") == \
        f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    # 2. AlignProp's cosine with the full gradient on the classroom checkpoints, hard clip: mean [min, max] over the inits
    runs = [r for r in result("gradients_h100_classroom.json")["runs"] if r["clip"] == "hard"]
    cos = [r["methods"]["alignprop"]["cos"] for r in runs]
    assert cell(section(doc, "gradients_h100_classroom.json"), "cos, hard clip", "alignprop") == \
        f"{sum(cos) / len(cos):.3f} [{min(cos):.3f}, {max(cos):.3f}]"
    # 3. the deeper UNet's Inception FID in the architecture ablation
    r = result("recipe_cpu_arch.json")["skip_res2"]
    assert cell(section(doc, "recipe_cpu_arch.json"), "Inception FID (samples)", "skip_res2") == f"{r['fid']:.1f} ({r['fid_n']})"
    # 4. a GPU number: ShortFT's step on the H200, in the methods table (not the SD one), next to the card it ran on
    gpu = result("gpu_h200.json")
    ms = [m["ms_per_step"] for m in gpu["methods"] if m["method"] == "shortft"][0]
    s = section(doc, "gpu_h200.json")
    assert cell(s, "ms/step", "shortft", after="One fine-tuning step per method") == f"{ms:.0f}"
    assert f"{gpu['env']['device']}, torch {gpu['env']['torch']}" in s


BROKEN = {
    "compare_cpu.json": lambda p: p.write_text('{"opts": {"seconds": 25'),  # truncated
    "gpu_h200_fid.json": lambda p: p.unlink(),  # missing
    "ptrain_cpu.json": lambda p: p.write_text('{"opts": {}}'),  # valid JSON, not a comparison
    "shortcut_spans_default_cpu.txt": lambda p: p.write_text("no results here\n"),
    "pipeline_cpu_old.md": lambda p: p.write_text("# a title only\n"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_results_file_is_one_line_naming_it(tmp_path, name):
    folder = tmp_path / "results"
    shutil.copytree(RESULTS, folder)
    BROKEN[name](folder / name)
    out = tmp_path / "results.md"
    p = run(f"--results_dir={folder}", f"--out={out}")
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and lines[0].startswith("error: "), p.stderr
    assert not out.exists()


def test_check_names_a_drifted_doc(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text(open(DOC, encoding="utf-8").read().replace("| shortft |", "| shortft  |", 1), encoding="utf-8")
    p = run("--check", f"--out={doc}")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and str(doc) in p.stderr


def test_frontier_cell_recomputed_from_the_runs():
    """The comparison's matched-cost cell for ShortFT, recomputed from the results file's runs (each run's curve
    in judge features, relative to its own first point) with frontier.frontier_at: the mean over seeds is the
    number the document shows."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import frontier

    d = result("compare_frontier_ship_cpu.json")
    level = d["cost_levels"][0]
    base = d["runs"][0]["curve"][0]["judge_fd"]
    per_seed = {}
    for r in d["runs"]:
        if r["name"] == "shortft":
            p0 = r["curve"][0]
            per_seed.setdefault(r["seed"], []).append(
                [(p["judge_fd"] - p0["judge_fd"], p["judge_target_rate"] - p0["judge_target_rate"]) for p in r["curve"]])
    vals = [frontier.frontier_at(c, level * base)[0] for c in per_seed.values()]
    assert len(vals) >= 3
    doc = open(DOC, encoding="utf-8").read()
    text = section(doc, "compare_frontier_ship_cpu.json")
    col = f"judge FD rise {level:g}x base ({level * base:.2f})"
    assert cell(text, col, "shortft", "| arm").startswith(f"{sum(vals) / len(vals):+.3f} ["), cell(text, col, "shortft", "| arm")
