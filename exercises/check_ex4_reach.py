"""Check for exercise 4 (gradient reach): the probe on chains whose answer is known by construction,
then the expected outcome on the project's DRaFT-K and ShortFT chains."""
import torch

import checklib
import ddpm
import baselines
import shortft

ex = checklib.load("ex4_reach")
STEPS = ddpm.ddim_timesteps(1000, 50)  # 981, 961, ..., 1
GROUPS = shortft.segment_groups(STEPS, [761, 501, 261, 1])


def setup():
    x_T = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return checklib.schedule64(), checklib.tiny_unet(0), checklib.tiny_unet(1).requires_grad_(False), x_T


def step(model, sched, x, i, steps=STEPS):
    t, s = steps[i], (steps[i + 1] if i + 1 < len(steps) else -1)
    return ddpm.ddim_step(sched, x, model(x, torch.full((x.shape[0],), t)), t, s)


def test_probe_changes_no_value_and_records_every_call():
    sched, model, _, x = setup()
    probe = ex.Probe(model)
    t = torch.full((1,), 761)
    assert torch.equal(probe(x, t), model(x, t)) and torch.equal(probe(x, t - 20), model(x, t - 20))
    assert [c[0] for c in probe.calls] == [761, 741]


def test_known_chains():
    """Built here, so the answer is known: DRaFT-3 as in Clark et al. (x and eps cut before the last 3
    steps), full backprop, and an eps-only cut (AlignProp's: eps detached before step 45, x_t never)."""
    sched, model, _, x_T = setup()

    def draft3(m, x):
        with torch.no_grad():
            for i in range(47):
                x = step(m, sched, x, i)
        for i in range(47, 50):
            x = step(m, sched, x, i)
        return x

    def eps_cut(m, x):
        for i in range(50):
            with torch.set_grad_enabled(i >= 45):
                eps = m(x, torch.full((1,), STEPS[i]))  # (1, 3, 8, 8)
            x = ddpm.ddim_step(sched, x, eps, STEPS[i], STEPS[i + 1] if i < 49 else -1)
        return x

    def full(m, x):
        for i in range(50):
            x = step(m, sched, x, i)
        return x

    assert ex.gradient_reach(draft3, model, x_T) == ([41, 21, 1], False)
    assert ex.gradient_reach(full, model, x_T) == (STEPS, True)
    assert ex.gradient_reach(eps_cut, model, x_T) == ([81, 61, 41, 21, 1], True)


def test_a_zero_gradient_or_no_graph_is_no_reach():
    sched, model, _, x_T = setup()
    zero = lambda m, x: x + 0 * m(x, torch.full((1,), 501))  # a graph to eps, but d x_0 / d eps = 0
    assert ex.gradient_reach(zero, model, x_T) == ([], True)
    x_zero = lambda m, x: 0 * x + m(x.detach(), torch.full((1,), 501))  # a graph to x_T, but a zero gradient
    assert ex.gradient_reach(x_zero, model, x_T) == ([501], False)
    assert ex.gradient_reach(lambda m, x: m(x, torch.full((1,), 501)).detach(), model, x_T) == ([], False)


def test_a_timestep_called_twice_counts_once():
    sched, model, _, x_T = setup()
    lv = lambda m, x: baselines.draft_lv_chain(m, sched, x, STEPS[-5:], n=2)  # DRaFT-LV: the last step twice
    assert ex.gradient_reach(lv, model, x_T)[0] == [1]


def test_expected_outcome_draft_k_misses_segment_1_shortft_reaches_it():
    """DRaFT-K's gradient reaches the first segment (981..761) only for K >= 39 steps of backprop;
    the ShortFT chain (phase 0) reaches one network call in every segment, through 7 calls."""
    sched, model, student, x_T = setup()
    for K, seg1 in ((1, False), (38, False), (39, True)):
        reached, _ = ex.gradient_reach(lambda m, x: baselines.draft_chain(m, sched, x, STEPS, K), model, x_T)
        assert reached == STEPS[-K:] and any(t in GROUPS[0] for t in reached) == seg1, K
    for phase, expected in ((0, [761, 501, 261, 1]), (2, [261, 1])):
        chain = lambda m, x: shortft.shortft_chain(m, student, sched, x, GROUPS, phase)
        assert ex.gradient_reach(chain, model, x_T) == (expected, False), phase


def test_probe_gradient_is_dr_deps_by_finite_differences():
    """delta.grad must be the reward's derivative w.r.t. that call's eps through the rest of the chain,
    network calls included: each call's output is bumped by +-h v (no autograd) and the central finite
    difference of r = sum(x_0) compared with <delta.grad, v>. A probe that detaches eps (or x) measures
    another gradient: it cuts the later calls' dependence on this one."""
    sched, model, _, x_T = setup()
    steps = STEPS[-4:]  # a 4-step chain 61 -> 41 -> 21 -> 1 -> x_0

    def chain(m, x):
        for i, t in enumerate(steps):
            x = ddpm.ddim_step(sched, x, m(x, torch.full((1,), t)), t, steps[i + 1] if i + 1 < len(steps) else -1)
        return x

    probe = ex.Probe(model)
    chain(probe, x_T.clone()).sum().backward()
    assert [t for t, _ in probe.calls] == steps
    v = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for i, (t, delta) in enumerate(probe.calls):
        def bumped(h):
            calls = iter(range(len(steps)))

            def m(x, t_vec):
                return model(x, t_vec) + (h * v if next(calls) == i else 0)
            with torch.no_grad():
                return float(chain(m, x_T).sum())
        fd = (bumped(1e-5) - bumped(-1e-5)) / 2e-5
        assert delta.grad is not None, t
        assert abs(fd - float((delta.grad * v).sum())) <= 1e-6 * max(1.0, abs(fd)), (t, fd, float((delta.grad * v).sum()))
