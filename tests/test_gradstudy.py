"""The gradient study (sftlib/gradstudy.py) against independent computations: the decomposition and each
method's gradient against autograd through baselines.method_chain, the held-out gain against a finite
difference of the held-out mean reward, the signal/noise fit against synthetic gradients of known signal and
noise; the straight-through clip (ddpm.clip) against its definition."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import ddpm
import tlora
from sftlib import gradstudy
from sftlib.gradstudy import cosine, full_decomposition, method_gradient
from baselines import draft_chain, full_chain, method_chain
from shortft import FineTuned, segment_groups
from unet import UNet

STEPS = ddpm.ddim_timesteps(1000, 10)  # a 10-step chain keeps the test fast; the identities hold for any


def model_and_reward(clip=True, seed=0, edges=None, dtype=torch.float32):
    torch.manual_seed(seed)
    unet = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(), dropout=0.0).eval().to(dtype)
    base = copy.deepcopy(unet).requires_grad_(False)  # the frozen base (the controls' student)
    tlora.add_lora(unet, rank=2, alpha=2.0, k=1)
    unet.to(dtype)
    with torch.no_grad():  # non-zero B so that A gets gradient too
        for m in tlora.lora_layers(unet):
            m.B[0].weight.normal_(0, 0.05)
    ft = FineTuned(unet, segment_groups(STEPS, edges or [STEPS[-1]]), tlora=False)
    sched = ddpm.Schedule(clip_x0=clip)
    judge = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 30 * 30, 1)).to(dtype)
    judge.requires_grad_(False)
    params = [p for p in unet.parameters() if p.requires_grad]
    ft.base = base
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


EDGES2 = [STEPS[4], STEPS[-1]]  # two segments on the 10-step chain: a real short chain with one jump


def flat_grad(reward, x0, params):
    """Autograd: the gradient of the mean reward over x0's rows w.r.t. params, one vector."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in
                      zip(torch.autograd.grad(reward(x0).mean(), params, allow_unused=True), params)])


def test_each_method_gradient_is_autograd_through_method_chain():
    """batch_gradients against autograd through baselines.method_chain itself, the same random draws."""
    ft, sched, reward, params = model_and_reward(edges=EDGES2)
    student = copy.deepcopy(ft.base)  # any frozen network stands in for the distilled shortcut
    students = {"shortft": (ft, student, "shortft"), "shortft_naive": (ft, ft.base, "shortft_naive"),
                "shortft_perfect": (ft, ft.base, "shortft_perfect"), "other_shortcut": (ft, ft.base, "shortft")}
    x_T = torch.randn(2, 3, 32, 32)
    methods = ["full", "draft", "draft_lv", "alignprop", "drtune", "shortft", "shortft_naive", "shortft_perfect",
               "other_shortcut"]
    torch.manual_seed(7)
    got, dec = gradstudy.batch_gradients(methods, ft, sched, x_T, STEPS, reward, params, students,
                                         torch.Generator().manual_seed(3), draft_k=2, window=(0, 10), drtune_k=3)
    torch.manual_seed(7)  # DRaFT-LV's re-noising draws from torch's global RNG, in the order the methods run
    gen = torch.Generator().manual_seed(3)  # AlignProp's and DRTune's draws
    for m in methods:
        model, stu, kind = students.get(m, (ft, None, m))
        x0 = method_chain(kind, model, stu, sched, x_T, ft.groups, STEPS, draft_k=2, window=(0, 10), drtune_k=3,
                          generator=gen)
        want = flat_grad(reward, x0, params)  # DRaFT-LV: the mean over its n B copies
        torch.testing.assert_close(got[m], want, rtol=1e-4, atol=1e-7, msg=m)
    assert cosine(got["shortft"], got["shortft_perfect"]) < 0.999  # the controls are other chains
    torch.testing.assert_close(got["other_shortcut"], got["shortft_naive"])  # the same chain under another name
    torch.testing.assert_close(dec["calls"].sum(0), got["full"])


def test_heldout_full_gradient_is_autograd_of_the_mean_reward_and_its_own_cosine_is_one():
    ft, sched, reward, params = model_and_reward(dtype=torch.float64)  # float32: batch-size-dependent conv rounding
    x_H = torch.randn(5, 3, 32, 32, dtype=torch.float64)                # can flip a pixel across the hard clip
    G, r = gradstudy.full_gradient(ft, sched, x_H, STEPS, reward, params, batch=2)  # batches of 2, 2, 1
    torch.testing.assert_close(G, flat_grad(reward, full_chain(ft, sched, x_H, STEPS), params), rtol=1e-4, atol=1e-7)
    assert r.shape == (5,)
    again = method_gradient("full", ft, None, sched, x_H, STEPS, reward, params)  # all 5 at once
    m = gradstudy.step_measures(again, G, G)
    assert abs(m["cos_heldout"] - 1) < 1e-5 and abs(m["cos_same"] - 1) < 1e-5
    assert abs(m["gain"] - float(G.norm())) < 1e-4 * float(G.norm())  # along G_H itself: the gain is |G_H|


def test_heldout_gain_is_the_derivative_of_the_heldout_mean_reward_along_the_step():
    """The first-order gain G_H . d against a central finite difference of the held-out mean reward of DDIM
    samples, and realised_gain / eta for a small eta against it (float64, no clip: a smooth chain)."""
    ft, sched, reward, params = model_and_reward(clip=False, dtype=torch.float64)
    x_H = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    x_B = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    G, _ = gradstudy.full_gradient(ft, sched, x_H, STEPS, reward, params, batch=2)
    g, _ = gradstudy.batch_gradients(["draft"], ft, sched, x_B, STEPS, reward, params, draft_k=3)
    d = g["draft"] / g["draft"].norm()
    gain = gradstudy.step_measures(g["draft"], g["draft"], G)["gain"]
    before = [p.detach().clone() for p in params]
    R = lambda: gradstudy.mean_reward(ft, sched, x_H, STEPS, reward)  # noqa: E731
    h = 1e-4
    with gradstudy.moved(params, h * d):
        up = R()
    with gradstudy.moved(params, -h * d):
        down = R()
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # moved restores the parameters exactly
    fd = (up - down) / (2 * h)
    assert abs(gain) > 1e-6 and abs(fd - gain) < 1e-4 * abs(gain), (fd, gain)
    eta = 1e-4  # one-sided: off by eta / 2 times the curvature
    real = gradstudy.realised_gain(ft, sched, x_H, STEPS, reward, params, g["draft"], eta)
    assert abs(real / eta - gain) < 1e-2 * abs(gain), (real / eta, gain)


def test_snr_fit_and_signal_cosine_recover_known_signal_and_noise():
    """Synthetic gradients g_i = mu + noise / sqrt(n) with |mu|^2 = 1 and per-sample noise trace 4 (snr 0.25)."""
    P, n, m, gen = 40000, 8, 6, torch.Generator().manual_seed(0)
    mu = torch.randn(P, generator=gen, dtype=torch.float64)
    mu /= mu.norm()
    noisy = lambda v, k: v + torch.randn(P, generator=gen, dtype=torch.float64) * math.sqrt(4 / P / k)  # noqa: E731
    full = [noisy(mu, n) for _ in range(m)]
    fit = gradstudy.snr_fit(full, [n] * m)
    assert abs(fit["mu2"] - 1) < 0.15 and abs(fit["noise"] - 4) < 0.4 and abs(fit["snr"] - 0.25) < 0.06
    want = gradstudy.cosine_with_truth(0.25, n)  # sqrt(2 / 3)
    assert abs(want - math.sqrt(2 / 3)) < 1e-12
    assert abs(sum(cosine(g, mu) for g in full) / m - want) < 0.03
    assert abs(gradstudy.batch_for_cosine(0.25, want) - n) < 1e-9 and gradstudy.cosine_with_truth(0.25, math.inf) == 1
    other = torch.randn(P, generator=gen, dtype=torch.float64)
    other -= (other @ mu) * mu
    biased = 0.6 * mu + 0.8 * other / other.norm()  # cos(E g, mu) = 0.6
    heldout = noisy(mu, 32)
    est = gradstudy.signal_cosine([noisy(biased, n) for _ in range(m)], heldout, fit["mu2"])
    assert abs(est - 0.6) < 0.15, est
    with pytest.raises(ValueError, match="two"):
        gradstudy.snr_fit(full[:1], [n])


def test_growth_sums_disjoint_consecutive_batches():
    g = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    H = torch.tensor([1.0, 0.0])
    got = gradstudy.growth(g, H)
    assert list(got) == [1, 2, 3]
    assert got[1] == [cosine(x, H) for x in g] and got[2] == [cosine(g[0] + g[1], H)]
    assert got[3] == [cosine(g[0] + g[1] + g[2], H)]


@pytest.mark.parametrize("args,needle", [(["--methods=shortft,sgd"], "unknown method 'sgd'"),
                                         (["--rewards=classifier:ship,loud"], "unknown reward 'loud'"),
                                         (["--batch=0"], "--batch must be positive"),
                                         (["--heldout=-1"], "--heldout must be positive"),
                                         (["--batches=1"], "--batches must be at least 2"),
                                         (["--eta=-1"], "--eta"), (["--batch=x"], "--batch")])
def test_bench_gradients_bad_input(args, needle, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_gradients.py"), f"--out={tmp_path}",
                        "--models=/nonexistent", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
