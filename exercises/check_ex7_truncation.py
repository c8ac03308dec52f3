"""Check for exercise 7 (truncation depth vs gradient fidelity): the measurement, not its outcome. The
DRaFT-K gradient against an independent reverse pass written call by call (sftlib/gradstudy.py's
full_decomposition: DRaFT-K is exactly the sum of the last K calls' parameter gradients), and the cosine
against torch's, on a tiny random UNet with LoRA over a 10-step chain."""
import pytest
import torch

import checklib
import ddpm
import tlora
from sftlib import gradstudy

ex = checklib.load("ex7_truncation", disable=("baselines.draft_chain", "baselines.full_chain", "sftlib.gradstudy.method_gradient",
                                              "sftlib.gradstudy.full_decomposition", "sftlib.gradstudy.cosine"))
STEPS = ddpm.ddim_timesteps(1000, 10)  # 901, 801, ..., 1: a short chain, so the check runs in seconds


def setup(B=2):
    sched = checklib.schedule64()
    sched.clip_x0 = False  # no clip: every call's gradient is nonzero, so an off-by-one cannot hide
    model = checklib.tiny_lora_unet(0, k=1)
    params = [p for p in tlora.lora_params(model, 0)]
    x_T = torch.randn(B, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reward = lambda x0: (torch.tanh(x0) * w).flatten(1).sum(1)  # (B,) a nonlinear per-image "reward"
    return sched, model, params, x_T, reward


@pytest.mark.parametrize("K", [1, 3, 10])
def test_draft_k_is_the_sum_of_the_last_k_calls(K):
    sched, model, params, x_T, reward = setup()
    ref = gradstudy.full_decomposition(model, sched, x_T, STEPS, reward, params)["calls"]  # (10, P), mean over b
    g = ex.truncated_gradient(model, sched, x_T, STEPS, K, reward, params)
    assert g.shape == ref[0].shape, "one flat vector over all the parameters"
    assert torch.allclose(g, ref[-K:].sum(0), rtol=1e-8, atol=1e-12), K


def test_the_full_gradient_is_autograd_through_the_whole_chain():
    sched, model, params, x_T, reward = setup(B=3)
    r = reward(ddpm.ddim_sample(model, sched, x_T, STEPS)).mean()
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(r, params)])
    assert torch.allclose(ex.truncated_gradient(model, sched, x_T, STEPS, len(STEPS), reward, params), ref, rtol=1e-8)


def test_no_graph_before_the_cut():
    """The first len(steps) - K calls run without a graph: a spy sees grad mode off in them."""
    sched, model, params, x_T, reward = setup()
    modes = []
    spy = lambda x, t: (modes.append(torch.is_grad_enabled()), model(x, t))[1]
    ex.truncated_gradient(spy, sched, x_T, STEPS, 4, reward, params)
    assert modes == [False] * 6 + [True] * 4


def test_cosine():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    ref = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert abs(ex.cosine(a, b) - ref) < 1e-12
    assert abs(ex.cosine(3 * a, b) - ref) < 1e-12 and abs(ex.cosine(a, a) - 1) < 1e-12  # scale-free, cos(a, a) = 1
    assert abs(ex.cosine(a, -a) + 1) < 1e-12
    assert ex.cosine(torch.zeros_like(a), b) == 0.0  # a method that gets no gradient at all: 0, not NaN
    for u, v in ((a, b), (a, -3 * a), (torch.zeros_like(a), b)):  # the project's metric (sftlib/gradstudy.py)
        assert abs(ex.cosine(u, v) - gradstudy.cosine(u, v)) < 1e-12
