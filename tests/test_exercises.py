"""The classroom exercises (exercises/): every check passes on the reference solutions, fails on the
starters (each failure the starter's NotImplementedError, so no check can pass without the student's
code) and fails on at least three plausible mutants of the solution (a sign, an off-by-one timestep, a
detached eps, a gradient-altering probe, a wrong reduction, and an answer that calls the project's own
function, which the check disables). The checks run in pytest subprocesses, as a student would run
them, with $SHORTFT_EXERCISE_DIR pointing at the starters, at exercises/solutions or at a mutant's folder."""
import ast
import concurrent.futures
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "exercises")
NAMES = ["ex1_ddim", "ex2_boundary", "ex3_chain", "ex4_reach", "ex5_reward", "ex6_segments", "ex7_truncation",
         "ex8_shortcut", "ex9_hacking", "ex10_ptrain", "ex11_snr"]
EXPERIMENTS = ["ex6_segments", "ex7_truncation", "ex8_shortcut", "ex9_hacking", "ex10_ptrain", "ex11_snr"]


def run_checks(folder, tmp):
    """pytest on every exercises/check_*.py with SHORTFT_EXERCISE_DIR=folder -> (return code, output,
    {check module: [(test name, outcome, message)]}) from pytest's JUnit XML report."""
    xml = os.path.join(tmp, "report.xml")
    checks = [os.path.join("exercises", f"check_{n}.py") for n in NAMES]
    env = {**os.environ, "SHORTFT_EXERCISE_DIR": folder, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *checks]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    results = {}
    for module, name, outcome, message in junit_cases(xml):
        results.setdefault(module, []).append((name, outcome, message))
    return p.returncode, p.stdout + p.stderr, results


def junit_cases(xml):
    """[(check module, test name, passed | failed | skipped, the failure's message)] of a pytest JUnit XML report."""
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            outcome = "failed"
        else:
            outcome = "skipped" if case.find("skipped") is not None else "passed"
        module = case.get("classname").rpartition(".")[2]  # check_ex1_ddim
        cases.append((module, case.get("name"), outcome, "" if bad is None else bad.get("message") or ""))
    return cases


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
    assert len(cases) >= 3, f"check_{name}.py ran {len(cases)} tests:\n{out[-3000:]}"
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
    assert rc != 0 and len(cases) >= 3, out[-3000:]
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


def gapless_functions(path):
    """{name: AST dump} of the module-level functions (and methods) of a file that raise no NotImplementedError."""
    out = {}
    for node in ast.parse(open(path).read()).body:
        for f in ([node] if isinstance(node, ast.FunctionDef) else node.body if isinstance(node, ast.ClassDef) else []):
            if isinstance(f, ast.FunctionDef) and "NotImplementedError" not in ast.dump(f):
                out[f.name] = ast.dump(f)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_starter_and_solution_share_every_function_without_a_gap(name):
    """The starter is the solution with gaps: every function the student does not fill in (the experiment, its
    helpers) is the same code in both, so the reference runs in solutions/RESULTS.md are the starter's runs."""
    starter, solution = gapless_functions(os.path.join(EX, f"{name}.py")), \
        gapless_functions(os.path.join(EX, "solutions", f"{name}.py"))
    assert all(solution.get(f) == body for f, body in starter.items()), \
        [f for f, body in starter.items() if solution.get(f) != body]
    assert "experiment" in starter or name not in EXPERIMENTS  # an experiment's run is never a gap


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


def gaps(path):
    """[(name, the FunctionDef)] of the functions and methods of a file that raise NotImplementedError: the gaps."""
    out = []
    for node in ast.parse(open(path).read()).body:
        for f in ([node] if isinstance(node, ast.FunctionDef) else node.body if isinstance(node, ast.ClassDef) else []):
            if isinstance(f, ast.FunctionDef) and "NotImplementedError" in ast.dump(f):
                out.append((f"{node.name}.{f.name}" if f is not node else f.name, f))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_starter_gaps_hold_nothing_but_the_gap(name):
    """A starter's gap is its docstring, its TODO comments and `raise NotImplementedError`: no decorator, no line
    of the answer given. So every property its check tests comes from the student's code; none can come with the
    starter, as exercise 10's `@torch.no_grad()` once did (its check's no-graph test then tested the starter)."""
    found = gaps(os.path.join(EX, f"{name}.py"))
    assert found, f"{name}.py has no gap"
    bad = []
    for fname, f in found:
        body = f.body[1:] if f.body and isinstance(f.body[0], ast.Expr) and isinstance(f.body[0].value, ast.Constant) \
            else f.body
        if f.decorator_list:
            bad.append(f"{fname}: decorated with {ast.unparse(f.decorator_list[0])}")
        if len(body) != 1 or not isinstance(body[0], ast.Raise):
            bad.append(f"{fname}: gives {len(body) - 1} statement(s) of the answer: {ast.unparse(body[0])[:80]}")
    assert not bad, bad


# What a TODO or a gap's docstring must not contain: the answer written as code (hints belong, collapsed, in
# exercises/README.md). Each pattern names what it finds.
CODE = {
    "a return statement": r"\breturn\b",
    "a library call or attribute": r"\b(torch|np|numpy|scipy|nn|F)\.\w",
    "a method call": r"\.\w+\(",
    "a module's function called": r"\b[a-z_]\w*\.[a-z_]\w*\(",
    "an assignment": r"\b[A-Za-z_]\w*\s?=(?!=)\s?(?![-\u2212]?\d)\S",
    "a formula as function calls": r"\b(sqrt|exp|log|abs|sum|mean|var|std|max|min|sorted|range|len|float|int|where|cat|"
                                   r"stack|norm|dot|cov|cdist|bincount|zeros_like|randn_like|full|outer)\(",
    "backticked code with parentheses": r"`[\w.]*[(\[][^`]*`",
    "a hint (hints go in exercises/README.md)": r"(?i)\bhint\b",
}


def todo_texts(path):
    """[(where, text)] of a starter's TODO(student) comment blocks (the TODO line and the comment lines after it)
    and of its gaps' docstrings."""
    lines, out = open(path).read().splitlines(), []
    for i, line in enumerate(lines):
        if "# TODO(student)" in line:
            j = i + 1
            while j < len(lines) and lines[j].strip().startswith("#") and "TODO(student)" not in lines[j]:
                j += 1
            out.append((f"line {i + 1}", " ".join(l.strip().lstrip("#").strip() for l in lines[i:j])))
    for fname, f in gaps(path):
        doc = ast.get_docstring(f)
        if doc:
            out.append((f"{fname}'s docstring", " ".join(doc.split())))
    return out


def todos_with_code():
    """['exN.py line L: what it finds: the text'] over every starter."""
    found = []
    for name in NAMES:
        for where, text in todo_texts(os.path.join(EX, f"{name}.py")):
            for what, pattern in CODE.items():
                m = re.search(pattern, text)
                if m:
                    found.append(f"{name}.py {where}: {what} ({m.group(0)!r}): {text[:160]}")
    return found


def test_code_patterns_find_code():
    """The scan is not vacuous: the TODOs the starters had before (each gave the answer) are all caught."""
    old = ["return flatten(torch.autograd.grad(r, params, allow_unused=True), params)",
           "where t == s, return x_t itself (bit for bit), not the DDIM step's x_s; hint: torch.where",
           "x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)", "then the k edges at `ts[(j + 1) * n // k - 1]`",
           "delta = a zero tensor like eps that requires grad", "g (B, H, W), then (var + 1e-8).sqrt()"]
    assert all(any(re.search(p, t) for p in CODE.values()) for t in old), \
        [t for t in old if not any(re.search(p, t) for p in CODE.values())]
    assert not any(re.search(p, "an int: 762 jumps to 761, and t = -1 means x_0 (k = 4: 12, 13, 12, 13)")
                   for p in CODE.values())


def test_no_todo_or_gap_docstring_contains_code():
    """Every TODO says what the gap must give back and why, in the paper's terms, never the code."""
    found = todos_with_code()
    assert not found, "TODOs that still contain code:\n" + "\n".join(found)


# Each exercise function that writes a project function has its name and its parameters, in the same order (the
# project's may add parameters with defaults after them); one that combines two takes the parameters of both.
MIRRORS = {
    "ex1_ddim.predict_x0": ["ddpm.predict_x0"],
    "ex1_ddim.ddim_step": ["ddpm.ddim_step"],
    "ex2_boundary.edge_of": ["consistency.edge_of"],
    "ex2_boundary.jump": ["consistency.jump"],
    "ex3_chain.shortft_chain": ["shortft.shortft_chain"],
    "ex6_segments.segment_edges": ["consistency.segment_edges"],
    "ex6_segments.segment_groups": ["shortft.segment_groups"],
    "ex7_truncation.truncated_gradient": ["baselines.draft_chain", "sftlib.gradstudy.full_decomposition"],  # DRaFT-K's gradient
    "ex7_truncation.cosine": ["sftlib.gradstudy.cosine"],
}
LIBRARY = ["ddpm", "consistency", "shortft", "baselines", "rewards", "sftlib.gradstudy", "sftlib.metrics", "sftlib.fid",
           "benchmarks.ft_probe"]
# Exercise functions that share a project function's name but not (yet) its signature, and why.
KNOWN_DRIFT = {
    "ex10_ptrain.chain_gap": "benchmarks/ft_probe.py's chain_gap(cfg, ft, student, sched, x_T, x0_real, phase) takes a "
                             "config and a precomputed real x_0 and gives the batch mean; the exercise draws the real "
                             "chain itself and gives one value per sample (its check pins the mean to the project's)",
}


def library_params(dotted):
    mod, attr = dotted.rsplit(".", 1)
    return list(inspect.signature(getattr(importlib.import_module(mod), attr)).parameters.values())


def test_exercise_functions_have_the_names_and_parameters_of_the_project_functions_they_mirror():
    sys.path.insert(0, ROOT)
    wrong = []
    for key, sources in MIRRORS.items():
        name, fname = key.split(".")
        for folder in (EX, os.path.join(EX, "solutions")):
            ours = functions(os.path.join(folder, f"{name}.py")).get(fname)
            params = [library_params(d) for d in sources]
            if len(sources) == 1:
                assert fname == sources[0].rsplit(".", 1)[1], key
                lib = params[0]
                extra_ok = all(p.default is not inspect.Parameter.empty for p in lib[len(ours or []):])
                if ours != [p.name for p in lib][:len(ours or [])] or not extra_ok:
                    wrong.append(f"{folder}/{key}{tuple(ours or ())} vs {sources[0]}{tuple(p.name for p in lib)}")
            else:  # the first's parameters without defaults, then those the second adds after the shared ones
                first = [p.name for p in params[0]]
                second = [p.name for p in params[1] if p.name not in first and p.default is inspect.Parameter.empty]
                if ours != first + second:
                    wrong.append(f"{folder}/{key}{tuple(ours or ())} vs {tuple(first + second)}")
    assert not wrong, wrong
    # every exercise function named like a project function is listed above, or its drift is known and said
    for name in NAMES:
        for fname in functions(os.path.join(EX, f"{name}.py")):
            same = [m for m in LIBRARY if inspect.isfunction(getattr(importlib.import_module(m), fname, None))]
            assert not same or f"{name}.{fname}" in MIRRORS or f"{name}.{fname}" in KNOWN_DRIFT, (name, fname, same)


# Plausible mistakes, each a list of (text of the reference solution, what the mistake writes instead);
# an old text of None appends the new one (a redefinition that calls the project's own function).
MUTANTS = {
    "ex1_ddim": {
        "x0_hat adds the noise instead of removing it": [("(x_t - (1 - abar_t).sqrt() * eps)", "(x_t + (1 - abar_t).sqrt() * eps)")],
        "abar of the timestep before (off by one)": [("    abar_t = sched.abar(t)  # () \\bar{alpha}_t", "    abar_t = sched.abar(t - 1)")],
        "sigma without its second square root": [("* (1 - abar_t / abar_s).sqrt()  # ()", "* (1 - abar_t / abar_s)  # ()")],
        "the direction term forgets sigma": [("(1 - abar_s - sigma**2).sqrt() * eps", "(1 - abar_s).sqrt() * eps")],
        "calls ddpm.ddim_step": [(None, "\n\ndef ddim_step(sched, x_t, eps, t, s, eta=0.0, noise=None):\n"
                                        "    return ddpm.ddim_step(sched, x_t, eps, t, s, eta, noise)\n\n\nimport ddpm\n")],
    },
    "ex2_boundary": {
        "an edge belongs to the segment above it": [("below = [e for e in edges if e < t]", "below = [e for e in edges if e <= t]")],
        "no exact boundary: the DDIM step from s to s": [("return torch.where(same, x_t, x_s)", "return x_s")],
        "the student sees a detached x_t": [("eps = student(x_t, t)  # (B, C, H, W)", "eps = student(x_t.detach(), t)")],
        "calls consistency.jump": [(None, "\n\ndef jump(student, sched, x_t, t, s):\n    import consistency\n"
                                          "    return consistency.jump(student, sched, x_t, t, s)\n")],
        "calls its own helper, then consistency.jump": [(None, "\n\ndef jump(student, sched, x_t, t, s):\n    import consistency\n"
                                                              "    as_vec(t, x_t)\n"
                                                              "    return consistency.jump(student, sched, x_t, t, s)\n")],
    },
    "ex3_chain": {
        "segment 1 keeps its whole graph (no truncation)": [("with torch.no_grad():  # truncated backprop", "with torch.enable_grad():  # truncated backprop")],
        "the jump starts one step early, at the previous edge": [("x = jump(student, sched, x, g[0], g[-1])", "x = jump(student, sched, x, groups[j - 1][-1], g[-1])")],
        "no base step at the edge after a jump": [("x = base_step(model, sched, x, g[-1], next_t(groups, j, len(g) - 1))  # the base step at s_j", "pass")],
        "the jump's input is detached": [("x = jump(student, sched, x, g[0], g[-1])", "x = jump(student, sched, x.detach(), g[0], g[-1])")],
        "calls shortft.shortft_chain": [(None, "\n\ndef shortft_chain(model, student, sched, x_T, groups, phase=0):\n    import shortft\n"
                                               "    return shortft.shortft_chain(model, student, sched, x_T, groups, phase)\n")],
    },
    "ex4_reach": {
        "the probe detaches eps": [("return eps + delta", "return eps.detach() + delta")],
        "delta does not require grad": [("torch.zeros_like(eps, requires_grad=True)", "torch.zeros_like(eps)")],
        "x_T counts as reached by a zero gradient": [("x_T.grad is not None and bool(x_T.grad.abs().sum() > 0)", "x_T.grad is not None")],
        "timesteps in ascending order": [("sorted(reached, reverse=True)", "sorted(reached)")],
        "x_T measured as given, not as a leaf of its own": [("x_T = x_T.detach().clone().requires_grad_(True)", "x_T = x_T")],
    },
    "ex5_reward": {
        "gray level in [-1, 1], not [0, 1]": [("g = ((x + 1) / 2).mean(dim=1)", "g = x.mean(dim=1)")],
        "the batch's mean, not each image's": [("mu = g.mean(dim=(1, 2), keepdim=True)", "mu = g.mean()")],
        "the variance, not its square root": [("return (var + 1e-8).sqrt()", "return var + 1e-8")],
        "no 1e-8: an infinite gradient on a flat image": [("return (var + 1e-8).sqrt()", "return var.sqrt()")],
    },
    "ex6_segments": {
        "edges at the start of each group": [("ts[(j + 1) * n_steps // k - 1]", "ts[j * n_steps // k]")],
        "round instead of floor": [("ts[(j + 1) * n_steps // k - 1]", "ts[round((j + 1) * n_steps / k) - 1]")],
        "k = n_steps refused": [("if not 1 <= k <= n_steps:", "if not 1 <= k < n_steps:")],
        "an edge opens the next group instead of closing its own": [("            groups.append(current)\n            current = []",
                                                                     "            groups.append(current[:-1])\n            current = [t]")],
        "calls consistency.segment_edges": [(None, "\n\ndef segment_edges(T, n_steps, k):\n    import consistency\n"
                                                   "    return consistency.segment_edges(T, n_steps, k)\n")],
    },
    "ex7_truncation": {
        "one call too many keeps a graph": [("for i in range(len(timesteps) - K):", "for i in range(len(timesteps) - K - 1):"),
                                            ("for i in range(len(timesteps) - K, len(timesteps)):", "for i in range(len(timesteps) - K - 1, len(timesteps)):")],
        "the first K calls keep the graph, not the last": [("with torch.no_grad():  # the truncated part", "with torch.enable_grad():  # the truncated part"),
                                                           ("for i in range(len(timesteps) - K, len(timesteps)):  # the last K calls, with a graph\n        x = ddim_call",
                                                            "for i in range(len(timesteps) - K, len(timesteps)):  # the last K calls, with a graph\n        x = x.detach() if i == K else x\n        x = ddim_call")],
        "the batch's sum, not its mean": [("r = reward(x).mean()", "r = reward(x).sum()")],
        "cosine without normalising": [("return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-30))", "return float(torch.dot(a, b))")],
        "calls baselines.draft_chain": [(None, "\n\ndef truncated_gradient(model, sched, x_T, timesteps, K, reward, params):\n    import baselines\n"
                                             "    x = baselines.draft_chain(model, sched, x_T, timesteps, K)\n"
                                             "    return flatten(torch.autograd.grad(reward(x).mean(), params, allow_unused=True), params)\n")],
    },
    "ex8_shortcut": {
        "the chain stops one step short of s": [("        if t_next == s:\n            return x\n        i += 1",
                                                 "        i += 1\n        if (timesteps[i + 1] if i + 1 < len(timesteps) else -1) == s:\n            return x")],
        "the first call at the next timestep": [("        t_i = timesteps[i]\n", "        t_i = timesteps[i + 1] if i + 1 < len(timesteps) else timesteps[i]\n")],
        "one number for the batch": [(".pow(2).flatten(1).mean(1)  # (B,)", ".pow(2).mean()")],
        "the jump with the base instead of the jumper": [("(jump(jumper, sched, x_t, t, s) - target)", "(jump(base, sched, x_t, t, s) - target)")],
    },
    "ex9_hacking": {
        "the real images' class mix, not the samples'": [("w = np.bincount(pred, minlength=int(real_labels.max()) + 1) / len(pred)",
                                                          "w = np.bincount(real_labels) / len(real_labels)")],
        "the mixture's covariance without its between-class part": [("second = second + w[c] * (sigma_c + np.outer(mu_c, mu_c))", "second = second + w[c] * sigma_c"),
                                                                     ("sigma_ref = second - np.outer(mu_ref, mu_ref)", "sigma_ref = second")],
        "the samples' covariance unbiased, the reference's not": [("frechet_distance(feats.mean(0), np.cov(feats, rowvar=False, bias=True), mu_ref",
                                                                   "frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu_ref")],
        "diversity counts each sample's distance to itself": [("return float(d.sum() / (n * (n - 1)))", "return float(d.mean())")],
        "calls sftlib.metrics.class_matched": [(None, "\n\ndef class_matched_fd(feats, pred, real_feats, real_labels):\n"
                                                      "    from sftlib import metrics\n"
                                                      "    stats = dict(labels_test=real_labels, feats_test=real_feats, labels_train=real_labels, feats_train=real_feats)\n"
                                                      "    return metrics.class_matched(feats, pred, stats)['fd_matched']\n")],
    },
    "ex10_ptrain": {
        "the real chain calls the UNet, not the T-LoRA model": [("real = ddpm.ddim_sample(ft, sched, x_T, timesteps)", "real = ddpm.ddim_sample(ft.unet, sched, x_T, timesteps)")],
        "the measurement builds a graph": [("    with torch.no_grad():  # a measurement", "    with torch.enable_grad():  # a measurement")],
        "the phase is ignored": [("short = shortft_chain(ft, student, sched, x_T, ft.groups, phase)", "short = shortft_chain(ft, student, sched, x_T, ft.groups, 0)")],
        "one number for the batch": [("return (short - real).pow(2).flatten(1).mean(1)  # (B,)", "return (short - real).pow(2).mean()")],
        "summed over the pixels, not averaged": [("return (short - real).pow(2).flatten(1).mean(1)  # (B,)", "return (short - real).pow(2).flatten(1).sum(1)")],
        "calls ft_probe.chain_gap": [(None, "\n\ndef chain_gap(ft, student, sched, x_T, timesteps, phase=0):\n    from benchmarks import ft_probe\n"
                                           "    cfg = dict(method='shortft')\n    real = ddpm.ddim_sample(ft, sched, x_T, timesteps)\n"
                                           "    return ft_probe.chain_gap(cfg, ft, student, sched, x_T, real, phase) * torch.ones(len(x_T))\n")],
    },
    "ex11_snr": {
        "each noise's gradient normalised before the batch average": [("g_a, g_b = grads_a.mean(0), grads_b.mean(0)  # (P,) each",
                                                                      "g_a = (grads_a / grads_a.norm(dim=1, keepdim=True)).mean(0)\n"
                                                                      "    g_b = (grads_b / grads_b.norm(dim=1, keepdim=True)).mean(0)")],
        "the dot product, not the cosine": [("return float(torch.dot(g_a, g_b) / (g_a.norm() * g_b.norm()).clamp(min=1e-30))",
                                             "return float(torch.dot(g_a, g_b))")],
        "two independent draws: the batches can share noises": [("    perm = rng.permutation(n)  # (n,)\n    return perm[:B], perm[B:2 * B]",
                                                                  "    return rng.choice(n, B, replace=False), rng.choice(n, B, replace=False)")],
        "the second batch starts half a batch in (overlapping)": [("return perm[:B], perm[B:2 * B]", "return perm[:B], perm[B // 2:B // 2 + B]")],
        "calls gradstudy.cosine": [(None, "\n\ndef batch_cosine(grads_a, grads_b):\n    from sftlib import gradstudy\n"
                                          "    return gradstudy.cosine(grads_a.mean(0), grads_b.mean(0))\n")],
    },
}


def mutate(name, edits, folder):
    """A copy of exercises/solutions with <name>.py mutated: every old text must occur exactly once."""
    shutil.copytree(os.path.join(EX, "solutions"), folder)
    path = os.path.join(folder, f"{name}.py")
    src = open(path).read()
    for old, new in edits:
        if old is None:
            src += new
        else:
            assert src.count(old) == 1, f"{name}: the mutant's text occurs {src.count(old)} times: {old!r}"
            src = src.replace(old, new)
    open(path, "w").write(src)


def check_outcomes(name, folders, report_dir):
    """{folder: (pytest's return code, the failures' messages)} of check_<name>.py on the module in each
    folder, stopping at the first failure, all in one subprocess (tests/mutant_runner.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mutant_runner.py"), name, report_dir, *folders],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    codes = {line.split(" ", 2)[2]: int(line.split(" ", 2)[1]) for line in p.stdout.splitlines() if line.startswith("@@ ")}
    assert set(codes) == set(folders), p.stdout[-3000:] + p.stderr[-3000:]
    out = {}
    for i, folder in enumerate(folders):
        xml = os.path.join(report_dir, f"{i}.xml")
        cases = junit_cases(xml) if os.path.isfile(xml) else []
        out[folder] = (codes[folder], " | ".join(m[:300] for _, _, outcome, m in cases if outcome == "failed"))
    return out


def test_every_exercise_has_three_mutants_or_more():
    assert set(MUTANTS) == set(NAMES) and all(len(m) >= 3 for m in MUTANTS.values())


@pytest.fixture(scope="module")
def mutant_outcomes(tmp_path_factory):
    """{name: ({mutant label: (return code, failure messages)}, the solution's (return code, messages))}:
    every exercise's mutants, then its solution as the control, in one process per exercise, two at a time."""
    jobs = {}
    for name in NAMES:
        tmp = str(tmp_path_factory.mktemp(name))
        folders = {label: os.path.join(tmp, f"m{i}") for i, label in enumerate(MUTANTS[name])}
        for label, edits in MUTANTS[name].items():
            mutate(name, edits, folders[label])
        jobs[name] = (folders, tmp)
    solutions = os.path.join(EX, "solutions")

    def run(name):
        folders, tmp = jobs[name]
        out = check_outcomes(name, list(folders.values()) + [solutions], tmp)
        return {label: out[f] for label, f in folders.items()}, out[solutions]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two processes of one thread each: the 2 cores
        return dict(zip(NAMES, pool.map(run, NAMES)))


@pytest.mark.parametrize("name", NAMES)
def test_check_fails_on_every_mutant(name, mutant_outcomes):
    """Each mutant fails the check with a failing test (pytest's return code 1), not a crash of the check
    (2: a collection error, e.g. a syntax error in the mutant) and not a NotImplementedError; the solution,
    checked last in the same process, still passes."""
    outcomes, control = mutant_outcomes[name]
    assert control[0] == 0, f"the solution fails its check after the mutants ran in the same process: {control}"
    survived = [label for label, (rc, msg) in outcomes.items() if rc != 1 or not msg or "NotImplementedError" in msg]
    assert not survived, "\n".join(f"mutant {label!r} of {name}: rc {outcomes[label][0]}: {outcomes[label][1][:1500]}"
                                   for label in survived)


def test_every_experiment_and_the_walkthrough_run_on_the_classroom_checkpoints(cifar_root, tmp_path):
    """The six experiments, run as a student runs them (python -m exercises.<name>), on the reference
    solutions in their --quick form (fewer noises and steps), and the walkthrough, two at a time: each
    finishes, prints its table and its closing timing line. Their full runs are timed in exercises/README.md."""
    env = {**os.environ, "SHORTFT_CIFAR": cifar_root, "SHORTFT_LAB_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}

    def run(module):
        return subprocess.run([sys.executable, "-m", module, "--quick"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
    modules = ["exercises.walkthrough"] + [f"exercises.solutions.{name}" for name in EXPERIMENTS]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(zip(modules, pool.map(run, modules)))
    for module, p in results.items():
        assert p.returncode == 0, f"{module}: {p.stderr[-3000:]}"
        assert p.stdout.rstrip().endswith(" s)"), f"{module}:\n{p.stdout[-2000:]}"
        assert "Your prediction:" in p.stdout or module == "exercises.walkthrough", module
    walk = results["exercises.walkthrough"].stdout
    assert all(f"PAPER.md Sec. {i}" in walk for i in range(1, 6)), walk[-2000:]  # the paper's sections, in order
    assert [walk.index(f"PAPER.md Sec. {i}") for i in range(1, 6)] == sorted(walk.index(f"PAPER.md Sec. {i}") for i in range(1, 6))
    assert "18 calls, 7 on the gradient path" in walk
    assert os.path.isfile(tmp_path / "ex9_before_after.png")
    assert os.path.isfile(tmp_path / "walkthrough" / "3_real_vs_short_x0.png")


def test_experiments_refuse_an_unknown_option_in_one_line(capsys):
    """An experiment takes only --quick: another option is one error line and exit code 2 (never ignored), --help
    says what it takes; every experiment's and the walkthrough's entry goes through lab.quick_flag."""
    from exercises import lab

    assert lab.quick_flag([]) is False and lab.quick_flag(["--quick"]) is True
    with pytest.raises(SystemExit) as e:
        lab.quick_flag(["--quick", "--seeds=3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--seeds=3" in err
    with pytest.raises(SystemExit) as e:
        lab.quick_flag(["--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out
    for name in [*EXPERIMENTS, "walkthrough"]:
        main = open(os.path.join(EX, f"{name}.py")).read().split('if __name__ == "__main__":')[-1]
        assert "lab.run(" in main or "lab.quick_flag()" in main, name
    p = subprocess.run([sys.executable, "-m", "exercises.ex7_truncation", "--nosuch"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--nosuch" in p.stderr


def test_two_level_bootstrap_covers_the_seeds_and_the_noises():
    """lab.bootstrap on (seeds, noises) values, against closed forms: when the values differ only between seeds, its
    interval is that of the mean of 3 seeds drawn with replacement (enumerated: 27 equally likely draws); when they
    differ only between noises, it is the one-level interval over the noises (~ mean -/+ 1.96 sd / sqrt(N)); and the
    seed-level spread is not lost when there are many noises (the one-level bootstrap of the same values pooled, as
    if the 48 were independent, gives an interval about 4 times narrower here). Each end is checked against the
    enumerated distribution of the resampled seeds' mean, 4 seeds: a draw of the wrong size moves it."""
    import itertools

    import numpy as np

    from exercises import lab

    a = np.array([0.0, 1.0, 2.0])
    by_seed = np.repeat(a[:, None], 16, axis=1)  # (3, 16): the seed decides everything
    means = np.sort([np.mean(c) for c in itertools.product(a, repeat=3)])  # the 27 equally likely resamples
    m, (lo, hi) = lab.bootstrap(by_seed)
    assert m == 1.0 and (lo, hi) == (means[0], means[-1])  # 1/27 = 3.7 % at each end: past the 2.5 % points
    e = np.random.default_rng(1).normal(size=400)
    by_noise = np.repeat(e[None], 3, axis=0)  # (3, 400): the seed changes nothing
    m, (lo, hi) = lab.bootstrap(by_noise)
    half = 1.96 * e.std() / np.sqrt(len(e))
    assert m == pytest.approx(e.mean()) and hi - lo == pytest.approx(2 * half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(e.mean(), abs=0.1 * half)
    both = a[:, None] + 0.01 * np.random.default_rng(2).normal(size=(3, 16))
    _, (lo2, hi2) = lab.bootstrap(both)
    _, (lo1, hi1) = lab.bootstrap(both.reshape(-1))
    assert hi2 - lo2 > 1.5 and hi1 - lo1 < 0.8  # two levels: the 3 seeds' spread; pooled: 48 "independent" values
    a4 = np.array([0.0, 1.0, 3.0, 7.0])  # 4 seeds: 256 equally likely resamples, whose mean's quantiles are known
    means4 = np.sort([np.mean(c) for c in itertools.product(a4, repeat=4)])
    _, (lo4, hi4) = lab.bootstrap(np.repeat(a4[:, None], 5, axis=1), n_boot=20000)
    exact = np.percentile(means4, [2.5, 97.5])  # of the 256 equally likely means
    # (0.5, 5.5), each with a margin of 0.5 % of probability or more; 3 seeds drawn instead of 4 give (1/3, 17/3)
    assert abs(lo4 - exact[0]) <= 0.05 and abs(hi4 - exact[1]) <= 0.05, (lo4, hi4, exact)
