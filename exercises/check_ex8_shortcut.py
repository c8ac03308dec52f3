"""Check for exercise 8 (distilled vs naive shortcut): the measurement, not its outcome. The real chain
against a loop written here and against a closed form (with the true eps, DDIM keeps one eps all the
way down, so the chain lands exactly on q(x_s | x_0)), and the span error against both."""
import pytest
import torch

import checklib
import ddpm
from consistency import jump

ex = checklib.load("ex8_shortcut")
STEPS = ddpm.ddim_timesteps(1000, 50)  # 981, 961, ..., 1
SPANS = [(981, 761), (741, 501), (481, 261), (241, 1), (21, -1)]


def data(seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1  # (B, 3, 8, 8) in [-1, 1]
    return x0, torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("t, s", SPANS)
def test_real_chain_with_the_true_eps_lands_on_q_sample(t, s):
    sched, (x0, eps) = checklib.schedule64(), data()
    got = ex.real_chain(checklib.true_eps(sched, x0), sched, ddpm.q_sample(sched, x0, t, eps), t, s, STEPS)
    assert torch.allclose(got, ddpm.q_sample(sched, x0, s, eps) if s >= 0 else x0, atol=1e-9), (t, s)


def test_real_chain_calls_the_base_once_per_step_at_the_right_timesteps():
    sched, (x, _) = checklib.schedule64(), data(1)
    net, calls = checklib.TinyEps(0), []
    spy = lambda x, t: (calls.append(t.tolist()), net(x, t))[1]
    got = ex.real_chain(spy, sched, x, 481, 261, STEPS)
    assert calls == [[t] * 3 for t in range(481, 261, -20)]  # 481, 461, ..., 281: 11 calls, landing on 261
    ref = x
    for t in range(481, 261, -20):
        ref = ddpm.ddim_step(sched, ref, net(ref, torch.full((3,), t)), t, t - 20)
    assert torch.allclose(got, ref, atol=1e-12)


def test_span_error_per_sample():
    """jumper and base differ, so a jump with the wrong network, or a mean over the batch, shows."""
    sched, (x, _) = checklib.schedule64(), data(2, B=4)
    base, jumper = checklib.TinyEps(0), checklib.TinyEps(1)
    err = ex.span_error(jumper, base, sched, x, 741, 501, STEPS)
    target = x
    for t in range(741, 501, -20):
        target = ddpm.ddim_step(sched, target, base(target, torch.full((4,), t)), t, t - 20)
    ref = (jump(jumper, sched, x, 741, 501) - target).pow(2).flatten(1).mean(1)  # (4,)
    assert err.shape == (4,) and torch.allclose(err, ref, rtol=1e-9)


def test_a_perfect_jumper_has_no_error_and_the_naive_one_has_some():
    sched, (x0, eps) = checklib.schedule64(), data(3)
    oracle = checklib.true_eps(sched, x0)
    x_t = ddpm.q_sample(sched, x0, 741, eps)
    assert ex.span_error(oracle, oracle, sched, x_t, 741, 501, STEPS).abs().max() < 1e-18
    net = checklib.TinyEps(2)
    assert (ex.span_error(net, net, sched, x_t, 741, 501, STEPS) > 1e-8).all()  # one step over 12 is not 12 steps
