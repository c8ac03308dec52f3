"""The classroom exercises (exercises/): every check passes on the reference solutions, fails on the
starters (each failure the starter's NotImplementedError, so no check can pass without the student's
code) and fails on at least three plausible mutants of the solution (a sign, an off-by-one timestep, a
detached eps, a gradient-altering probe, a wrong reduction, and an answer that calls the project's own
function, which the check disables). The checks run in pytest subprocesses, as a student would run
them, with $SHORTFT_EXERCISE_DIR pointing at the starters, at exercises/solutions or at a mutant's folder."""
import ast
import concurrent.futures
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "exercises")
NAMES = ["ex1_ddim", "ex2_boundary", "ex3_chain", "ex4_reach", "ex5_reward", "ex6_segments", "ex7_truncation",
         "ex8_shortcut", "ex9_hacking", "ex10_ptrain"]
EXPERIMENTS = ["ex6_segments", "ex7_truncation", "ex8_shortcut", "ex9_hacking", "ex10_ptrain"]


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
        "one call too many keeps a graph": [("for i in range(len(steps) - K):", "for i in range(len(steps) - K - 1):"),
                                            ("for i in range(len(steps) - K, len(steps)):", "for i in range(len(steps) - K - 1, len(steps)):")],
        "the first K calls keep the graph, not the last": [("with torch.no_grad():  # the truncated part", "with torch.enable_grad():  # the truncated part"),
                                                           ("for i in range(len(steps) - K, len(steps)):  # the last K calls, with a graph\n        x = ddim_call",
                                                            "for i in range(len(steps) - K, len(steps)):  # the last K calls, with a graph\n        x = x.detach() if i == K else x\n        x = ddim_call")],
        "the batch's sum, not its mean": [("r = reward(x).mean()", "r = reward(x).sum()")],
        "cosine without normalising": [("return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-30))", "return float(torch.dot(a, b))")],
        "calls baselines.draft_chain": [(None, "\n\ndef truncated_gradient(model, sched, x_T, steps, K, reward, params):\n    import baselines\n"
                                             "    x = baselines.draft_chain(model, sched, x_T, steps, K)\n"
                                             "    return flatten(torch.autograd.grad(reward(x).mean(), params, allow_unused=True), params)\n")],
    },
    "ex8_shortcut": {
        "the chain stops one step short of s": [("        if t_next == s:\n            return x\n        i += 1",
                                                 "        i += 1\n        if (steps[i + 1] if i + 1 < len(steps) else -1) == s:\n            return x")],
        "the first call at the next timestep": [("        t_i = steps[i]\n", "        t_i = steps[i + 1] if i + 1 < len(steps) else steps[i]\n")],
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
        "the real chain calls the UNet, not the T-LoRA model": [("real = ddpm.ddim_sample(ft, sched, x_T, steps)", "real = ddpm.ddim_sample(ft.unet, sched, x_T, steps)")],
        "the phase is ignored": [("short = shortft_chain(ft, student, sched, x_T, ft.groups, phase)", "short = shortft_chain(ft, student, sched, x_T, ft.groups, 0)")],
        "one number for the batch": [("return (short - real).pow(2).flatten(1).mean(1)  # (B,)", "return (short - real).pow(2).mean()")],
        "summed over the pixels, not averaged": [("return (short - real).pow(2).flatten(1).mean(1)  # (B,)", "return (short - real).pow(2).flatten(1).sum(1)")],
        "calls ft_probe.chain_gap": [(None, "\n\ndef chain_gap(ft, student, sched, x_T, steps, phase=0):\n    from benchmarks import ft_probe\n"
                                           "    cfg = dict(method='shortft')\n    real = ddpm.ddim_sample(ft, sched, x_T, steps)\n"
                                           "    return ft_probe.chain_gap(cfg, ft, student, sched, x_T, real, phase) * torch.ones(len(x_T))\n")],
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
    """The five experiments, run as a student runs them (python -m exercises.<name>), on the reference
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
