"""The classroom exercises (exercises/): every check passes on the reference solutions and fails on the
starters, each failure being the starter's NotImplementedError, so no check can pass without the
student's code. The checks run in two pytest subprocesses (all six exercises at once), as a student
would run them, with $SHORTFT_EXERCISE_DIR pointing at the starters or at exercises/solutions."""
import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "exercises")
NAMES = ["ex1_ddim", "ex2_boundary", "ex3_chain", "ex4_reach", "ex5_reward", "ex6_segments"]


def run_checks(folder, tmp):
    """pytest on every exercises/check_*.py with SHORTFT_EXERCISE_DIR=folder -> (return code, output,
    {check module: [(test name, outcome, message)]}) from pytest's JUnit XML report."""
    xml = os.path.join(tmp, "report.xml")
    checks = [os.path.join("exercises", f"check_{n}.py") for n in NAMES]
    env = {**os.environ, "SHORTFT_EXERCISE_DIR": folder, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *checks]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    results = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            outcome = "failed"
        else:
            outcome = "skipped" if case.find("skipped") is not None else "passed"
        module = case.get("classname").rpartition(".")[2]  # check_ex1_ddim
        results.setdefault(module, []).append((case.get("name"), outcome, "" if bad is None else bad.get("message", "")))
    return p.returncode, p.stdout + p.stderr, results


@pytest.fixture(scope="module")
def on_solutions(tmp_path_factory):
    return run_checks(os.path.join(EX, "solutions"), str(tmp_path_factory.mktemp("solutions")))


@pytest.fixture(scope="module")
def on_starters(tmp_path_factory):
    return run_checks(EX, str(tmp_path_factory.mktemp("starters")))


@pytest.mark.parametrize("name", NAMES)
def test_reference_solution_passes_its_check(name, on_solutions):
    rc, out, results = on_solutions
    cases = results.get(f"check_{name}", [])
    assert len(cases) >= 4, f"check_{name}.py ran {len(cases)} tests:\n{out[-3000:]}"
    failed = [(n, m) for n, o, m in cases if o != "passed"]
    assert not failed, f"exercises/solutions/{name}.py fails check_{name}.py: {failed}\n{out[-3000:]}"


def test_all_checks_pass_on_the_solutions(on_solutions):
    rc, out, results = on_solutions
    assert rc == 0 and set(results) == {f"check_{n}" for n in NAMES}, out[-3000:]


@pytest.mark.parametrize("name", NAMES)
def test_starter_fails_every_test_of_its_check_with_not_implemented(name, on_starters):
    """Not one test passes on the starter (each one calls the student's code), and each fails for the
    expected reason: the starter's NotImplementedError, not a broken check."""
    rc, out, results = on_starters
    cases = results.get(f"check_{name}", [])
    assert rc != 0 and len(cases) >= 4, out[-3000:]
    wrong = [(n, o, m[:200]) for n, o, m in cases if o != "failed" or "NotImplementedError" not in m]
    assert not wrong, f"on the starter {name}.py these tests did not fail with NotImplementedError: {wrong}"


def functions(path):
    """{name: argument names} of the module-level functions and classes' methods of a Python file."""
    tree = ast.parse(open(path).read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = [a.arg for a in node.args.args]
        elif isinstance(node, ast.ClassDef):
            for f in node.body:
                if isinstance(f, ast.FunctionDef):
                    out[f"{node.name}.{f.name}"] = [a.arg for a in f.args.args]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_starter_has_marked_gaps_and_the_solution_has_none(name):
    starter, solution = os.path.join(EX, f"{name}.py"), os.path.join(EX, "solutions", f"{name}.py")
    s, sol = open(starter).read(), open(solution).read()
    assert "# TODO(student):" in s and "raise NotImplementedError" in s
    assert "TODO(student)" not in sol and "NotImplementedError" not in sol
    assert functions(starter) == functions(solution)  # the same API: the check cannot tell them apart by name


def test_exercise_readme_gives_each_check_command():
    readme = open(os.path.join(EX, "README.md")).read()
    for name in NAMES:
        assert f"python -m pytest exercises/check_{name}.py" in readme, name
