"""The gradient study's decomposition (sftlib/gradstudy.py) against autograd through shortft.py's own
chains, and the straight-through clip (ddpm.clip) against its definition."""
import pytest
import torch
import torch.nn as nn

import ddpm
import tlora
from sftlib.gradstudy import cosine, full_decomposition, method_gradient
from baselines import draft_chain, full_chain
from shortft import FineTuned, segment_groups
from unet import UNet

STEPS = ddpm.ddim_timesteps(1000, 10)  # a 10-step chain keeps the test fast; the identities hold for any


def model_and_reward(clip=True, seed=0):
    torch.manual_seed(seed)
    unet = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(), dropout=0.0).eval()
    tlora.add_lora(unet, rank=2, alpha=2.0, k=1)
    with torch.no_grad():  # non-zero B so that A gets gradient too
        for m in tlora.lora_layers(unet):
            m.B[0].weight.normal_(0, 0.05)
    ft = FineTuned(unet, segment_groups(STEPS, [STEPS[-1]]), tlora=False)
    sched = ddpm.Schedule(clip_x0=clip)
    judge = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 30 * 30, 1))
    judge.requires_grad_(False)
    params = [p for p in unet.parameters() if p.requires_grad]
    return ft, sched, (lambda x: judge(x)[:, 0]), params


def autograd_grad(chain, params, reward, n):
    r = reward(chain())
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in
                      zip(torch.autograd.grad(r.sum() / n, params, allow_unused=True), params)])


@pytest.mark.parametrize("clip", [True, False, "straight_through"])
def test_per_call_gradients_sum_to_full_backprop_and_to_draft_k(clip):
    ft, sched, reward, params = model_and_reward(clip)
    x_T = torch.randn(3, 3, 32, 32)
    d = full_decomposition(ft, sched, x_T, STEPS, reward, params)
    full = autograd_grad(lambda: full_chain(ft, sched, x_T, STEPS), params, reward, 3)
    assert d["calls"].shape == (len(STEPS), len(full))
    torch.testing.assert_close(d["calls"].sum(0), full, rtol=1e-4, atol=1e-7)
    for K in (1, 4, len(STEPS)):  # DRaFT-K: exactly the last K calls' share
        draft = autograd_grad(lambda: draft_chain(ft, sched, x_T, STEPS, K), params, reward, 3)
        torch.testing.assert_close(d["calls"][-K:].sum(0), draft, rtol=1e-4, atol=1e-7)
        assert K == len(STEPS) or (draft - full).norm() > 1e-3 * full.norm()  # a real cut, not the full gradient
    # method_gradient runs the same chains: full equals the decomposition's sum
    torch.testing.assert_close(method_gradient("full", ft, None, sched, x_T, STEPS, reward, params), full,
                               rtol=1e-4, atol=1e-7)


def test_adjoint_is_the_per_sample_gradient_norm_wrt_each_state():
    ft, sched, reward, params = model_and_reward()
    x_T = torch.randn(2, 3, 32, 32)
    d = full_decomposition(ft, sched, x_T, STEPS, reward, params)
    x = x_T.clone().requires_grad_(True)
    g, = torch.autograd.grad(reward(full_chain(ft, sched, x, STEPS)).sum(), x)  # dr_b/dx_T, per sample
    assert d["adjoint"].shape == (len(STEPS) + 1,)
    assert abs(d["adjoint"][0].item() - g.flatten(1).norm(dim=1).mean().item()) < 1e-4 * g.norm().item()
    x0 = full_chain(ft, sched, x_T, STEPS).detach().requires_grad_(True)
    g0, = torch.autograd.grad(reward(x0).sum(), x0)
    assert abs(d["adjoint"][-1].item() - g0.flatten(1).norm(dim=1).mean().item()) < 1e-5


def test_clipped_fraction_counts_pixels_outside_the_box():
    ft, sched, reward, params = model_and_reward()
    x_T = torch.randn(2, 3, 32, 32)
    d = full_decomposition(ft, sched, x_T, STEPS, reward, params)
    t = STEPS[0]  # at the first call, by hand
    with torch.no_grad():
        eps = ft(x_T, torch.full((2,), t))
        frac = (ddpm.predict_x0(sched, x_T, t, eps).abs() > 1).float().mean().item()
    assert abs(d["clipped"][0].item() - frac) < 1e-7 and 0 < frac < 1


def test_straight_through_clip_keeps_values_and_passes_gradient():
    x = torch.tensor([-3.0, -0.5, 0.2, 1.7], requires_grad=True)
    hard, st = ddpm.clip(x, True), ddpm.clip(x, "straight_through")
    assert torch.equal(hard, st) and torch.equal(hard, torch.tensor([-1.0, -0.5, 0.2, 1.0]))
    g_hard, = torch.autograd.grad(hard.sum(), x)
    g_st, = torch.autograd.grad(st.sum(), x)
    assert torch.equal(g_hard, torch.tensor([0.0, 1.0, 1.0, 0.0])) and torch.equal(g_st, torch.ones(4))


def test_straight_through_chain_samples_equal_hard_clip_samples_but_gradients_differ():
    ft, sched, reward, params = model_and_reward(True)
    x_T = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hard = full_chain(ft, sched, x_T, STEPS)
        sched.clip_x0 = "straight_through"
        st = full_chain(ft, sched, x_T, STEPS)
    assert torch.equal(hard, st)
    g_st = autograd_grad(lambda: full_chain(ft, sched, x_T, STEPS), params, reward, 2)
    sched.clip_x0 = True
    g_hard = autograd_grad(lambda: full_chain(ft, sched, x_T, STEPS), params, reward, 2)
    assert cosine(g_st, g_hard) < 0.999  # the clip's zero gradient matters on this chain


def test_cosine_oracle():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert abs(cosine(a, b) - 2 ** -0.5) < 1e-7 and abs(cosine(a, -a) + 1) < 1e-7


@pytest.mark.parametrize("args,needle", [(["--methods=shortft,sgd"], "unknown method 'sgd'"),
                                         (["--clips=soft"], "unknown clip mode 'soft'"),
                                         (["--inits=0"], "at least 1"), (["--n=x"], "--n")])
def test_bench_gradients_bad_input(args, needle, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_gradients.py"), f"--out={tmp_path}",
                        "--models=/nonexistent", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
