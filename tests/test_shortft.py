"""ShortFT and LoRA, checked against explicit computations on tiny random networks."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddpm
import tlora
from consistency import jump
from shortft import FineTuned, merge_for_sampling, segment_groups, set_phase, shortft_chain
from unet import UNet

EDGES = [761, 501, 261, 1]


def tiny_unet(seed):
    torch.manual_seed(seed)
    return UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(16,), dropout=0.0).eval()


def randomise_lora(unet, seed):
    """LoRA B starts at zero (delta W = 0); give every LoRA non-zero weights so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in tlora.lora_layers(unet):
            for B in m.B:
                B.weight.copy_(0.05 * torch.randn(B.weight.shape, generator=g))


def setup(k=4, dtype=torch.float32):
    unet, student = tiny_unet(0).to(dtype), tiny_unet(1).to(dtype).requires_grad_(False)
    tlora.add_lora(unet, rank=2, alpha=2.0, k=k)
    randomise_lora(unet, 2)
    unet.to(dtype)
    groups = segment_groups(ddpm.ddim_timesteps(1000, 50), EDGES if k == 4 else EDGES[-k:])
    sched = ddpm.Schedule()
    if dtype == torch.float64:
        sched.alpha_bar = sched.alpha_bar.double()
    return FineTuned(unet, groups), student, sched


def test_segment_groups_follow_the_paper():
    groups = segment_groups(ddpm.ddim_timesteps(1000, 50), EDGES)
    assert [(g[0], g[-1], len(g)) for g in groups] == [(981, 761, 12), (741, 501, 13), (481, 261, 12), (241, 1, 13)]


@pytest.mark.parametrize("layer", [nn.Conv2d(4, 6, 3, padding=1), nn.Linear(5, 7)])
def test_lora_layer_equals_explicit_low_rank_update(layer):
    holder = nn.Sequential(layer)
    tlora.add_lora(holder, rank=2, alpha=4.0, k=3)
    m = holder[0]
    x = torch.randn(2, 4, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(2, 5)
    assert torch.equal(m(x), layer(x))  # B = 0 at the start: exactly the base layer
    randomise_lora(holder, 0)
    for n in (1, 2, 3):
        m.active = n
        if isinstance(layer, nn.Conv2d):  # x -> A_j (a conv) -> B_j (a 1x1 conv), summed, scaled by alpha / r
            upd = sum(F.conv2d(F.conv2d(x, m.A[j].weight, padding=1), m.B[j].weight) for j in range(n))
        else:
            upd = sum(x @ m.A[j].weight.T @ m.B[j].weight.T for j in range(n))
        assert torch.allclose(m(x), layer(x) + 2.0 * upd, atol=1e-5)
        merged_w = layer.weight + m.delta(n)  # and the merged weight gives the same output
        out = F.conv2d(x, merged_w, layer.bias, padding=1) if isinstance(layer, nn.Conv2d) else F.linear(x, merged_w, layer.bias)
        assert torch.allclose(out, m(x), atol=1e-5)


def test_merged_lora_sampling_equals_unmerged():
    ft, _, sched = setup()
    x_T = torch.randn(2, 3, 32, 32)
    steps = ddpm.ddim_timesteps(1000, 50)
    with torch.no_grad():
        a = ddpm.ddim_sample(ft, sched, x_T, steps)
        b = ddpm.ddim_sample(merge_for_sampling(ft), sched, x_T, steps)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def grads(ft, student):
    """Which parameter groups received a gradient: LoRA j (0..k-1), the base weights, the student."""
    got = {j: any(p.grad is not None and p.grad.abs().sum() > 0 for p in tlora.lora_params(ft.unet, j))
           for j in range(len(ft.groups))}
    base = [p for n, p in ft.unet.named_parameters() if ".A." not in n and ".B." not in n]
    got["base"] = any(p.grad is not None for p in base)
    got["student"] = any(p.grad is not None for p in student.parameters())
    return got


@pytest.mark.parametrize("phase", [0, 1, 3])
def test_gradient_reaches_exactly_the_phase_loras(phase):
    ft, student, sched = setup()
    set_phase(ft, phase)
    x0 = shortft_chain(ft, student, sched, torch.randn(2, 3, 32, 32), ft.groups, phase)
    x0.mean().backward()
    got = grads(ft, student)
    assert got == {**{j: j >= phase for j in range(4)}, "base": False, "student": False}


def test_chain_gradient_equals_explicitly_built_graph():
    """Stage 0: the gradient of shortft_chain equals that of the 7-call graph written out by hand,
    and (for one LoRA weight) central finite differences of that graph."""
    ft, student, sched = setup(dtype=torch.float64)
    x_T = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    f = lambda x0: (x0 * torch.linspace(-1, 1, x0.numel(), dtype=x0.dtype).view_as(x0)).sum()
    f(shortft_chain(ft, student, sched, x_T, ft.groups, 0)).backward()
    p = ft.unet.get_submodule("mid_res1.conv1").B[0].weight
    auto = p.grad[3, 1, 0, 0].item()

    def eps(x, t, n):
        tlora.set_active(ft.unet, n)
        return ft.unet(x, torch.full((1,), t))

    x = x_T
    with torch.no_grad():  # 981 .. 781 carry no gradient (truncated backprop): computed once, held fixed
        for t, s in zip(range(981, 761, -20), range(961, 741, -20)):
            x = ddpm.ddim_step(sched, x, eps(x, t, 1), t, s)
    x_761 = x

    def explicit():  # PAPER.md Sec. 3, one line per hop, from the definitions in ddpm.py / consistency.py
        x = ddpm.ddim_step(sched, x_761, eps(x_761, 761, 1), 761, 741)
        x = jump(student, sched, x, 741, 501)
        x = ddpm.ddim_step(sched, x, eps(x, 501, 2), 501, 481)
        x = jump(student, sched, x, 481, 261)
        x = ddpm.ddim_step(sched, x, eps(x, 261, 3), 261, 241)
        x = jump(student, sched, x, 241, 1)
        return f(ddpm.ddim_step(sched, x, eps(x, 1, 4), 1, -1))

    ft.unet.zero_grad(set_to_none=True)
    explicit().backward()
    assert abs(p.grad[3, 1, 0, 0].item() - auto) < 1e-9 * max(1, abs(auto))
    h = 1e-5
    with torch.no_grad():
        p[3, 1, 0, 0] += h
        up = explicit().item()
        p[3, 1, 0, 0] -= 2 * h
        down = explicit().item()
        p[3, 1, 0, 0] += h
    assert abs(auto) > 1e-6  # a gradient that is there, not a trivially matching zero
    assert abs((up - down) / (2 * h) - auto) < 1e-5 * max(1, abs(auto))


def test_one_optimiser_step_raises_the_reward():
    from rewards import brightness

    ft, student, sched = setup()
    params = [p for p in ft.unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    x_T = torch.randn(4, 3, 32, 32)
    r0 = brightness(shortft_chain(ft, student, sched, x_T, ft.groups)).mean()
    (-r0).backward()
    opt.step()
    with torch.no_grad():
        r1 = brightness(shortft_chain(ft, student, sched, x_T, ft.groups)).mean()
    assert r1 > r0 + 1e-3, (r0.item(), r1.item())


def test_bad_phase_and_rank():
    ft, student, sched = setup()
    with pytest.raises(ValueError):
        shortft_chain(ft, student, sched, torch.randn(1, 3, 32, 32), ft.groups, phase=4)
    with pytest.raises(ValueError):
        tlora.add_lora(tiny_unet(0), rank=0, alpha=1.0, k=1)
    with pytest.raises(ValueError):
        tlora.add_lora(tiny_unet(0), rank=2, alpha=1.0, k=1, targets="no_such_layer")


# --- the baselines --------------------------------------------------------------------------------

def plain_setup(steps=10):
    """A tiny UNet with one plain LoRA (what the baselines train), a short DDIM chain, float64."""
    unet = tiny_unet(0).double()
    tlora.add_lora(unet, rank=2, alpha=2.0, k=1)
    randomise_lora(unet, 3)
    unet.double()
    sched = ddpm.Schedule()
    sched.alpha_bar = sched.alpha_bar.double()
    return unet, sched, ddpm.ddim_timesteps(1000, steps), torch.randn(1, 3, 32, 32, dtype=torch.float64)


def lora_grad(unet, fn):
    unet.zero_grad(set_to_none=True)
    fn().pow(2).mean().backward()
    return torch.cat([p.grad.flatten() for p in tlora.lora_params(unet, 0)])


def test_draft_k_gradient_equals_explicit_k_step_graph():
    from baselines import draft_chain

    unet, sched, steps, x_T = plain_setup()
    K = 3

    def explicit():
        x = x_T
        with torch.no_grad():  # the first len - K steps, with no graph
            for t, s in zip(steps[:-K], steps[1:-K + 1]):
                x = ddpm.ddim_step(sched, x, unet(x, torch.full((1,), t)), t, s)
        for t, s in zip(steps[-K:], steps[-K + 1:] + [-1]):
            x = ddpm.ddim_step(sched, x, unet(x, torch.full((1,), t)), t, s)
        return x

    g = lora_grad(unet, lambda: draft_chain(unet, sched, x_T, steps, K))
    assert g.abs().sum() > 0 and torch.allclose(g, lora_grad(unet, explicit), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(g, lora_grad(unet, lambda: draft_chain(unet, sched, x_T, steps, 1)))


def test_full_backprop_same_gradient_with_and_without_checkpointing():
    from baselines import full_chain

    unet, sched, steps, x_T = plain_setup()
    a = lora_grad(unet, lambda: full_chain(unet, sched, x_T, steps, checkpoint=False))
    b = lora_grad(unet, lambda: full_chain(unet, sched, x_T, steps, checkpoint=True))
    assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-9, atol=1e-12)


# a deterministic mock eps-model, eps_theta(x, t) = theta x, whose chain gradients have a closed form

class LinearEps(nn.Module):
    """Records every call: (t, does its input require grad, is grad on, i.e. will its eps carry gradient,
    theta requiring it). First thing in forward, not in a module hook: a checkpoint's recomputation in
    backward runs without the module's hooks and stops as soon as it has what backward needs."""

    def __init__(self, theta=0.3):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))
        self.calls = []

    def forward(self, x, t):
        self.calls.append((int(t[0]), x.requires_grad, torch.is_grad_enabled()))
        return self.theta * x


def mock_setup(n=10):
    """The mock, an unclipped float64 schedule with abar from its definition (Ho et al. 2020), an n-step
    chain, x_T that requires grad, a fixed weighting w of the loss L = sum(w x_0), and the coefficients
    of x_s = c x_t + d eps (DDIM, Song et al. 2021, Eq. 12) at each step, from abar alone."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)  # (T,)
    sched = ddpm.Schedule()
    sched.alpha_bar = abar
    steps = ddpm.ddim_timesteps(1000, n)
    a_t = abar[steps]  # (n,)
    a_s = torch.cat([abar[steps[1:]], torch.ones(1, dtype=torch.float64)])  # (n,) abar of the next t; x_0: 1
    c = (a_s / a_t).sqrt()  # (n,) d x_s / d x_t at fixed eps
    d = (1 - a_s).sqrt() - (a_s * (1 - a_t) / a_t).sqrt()  # (n,) d x_s / d eps
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    w = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g)
    return LinearEps(), sched, steps, x_T, w, c, d


def closed_form(theta, x_T, w, c, d, trained, eps_path):
    """dL/dtheta and dL/dx_T for L = sum(w x_0): with eps = theta x_t every state is a scalar multiple of
    x_T, x_i = prod_{j<i} (c_j + d_j theta) x_T. Step j passes gradient on to x_t with J_j = c_j + d_j theta
    when eps is differentiable in x_t there (eps_path[j]), else with c_j; theta gets d_i <w, x_i> from
    each trained step i, carried down by the J's of the later steps."""
    a = c + d * theta  # (n,)
    J = torch.where(torch.tensor(eps_path), a, c)  # (n,)
    S = (w * x_T.detach()).sum()
    n = len(c)
    d_theta = sum(J[i + 1:].prod() * d[i] * a[:i].prod() for i in range(n) if i in trained) * S
    return d_theta, J.prod() * w


def test_alignprop_draws_the_cut_anew_at_every_step():
    """AlignProp's code: at every step i, c_i = randint(min, max), eps detached when i < c_i. The steps
    whose eps carries gradient are exactly those the draws allow, each of those UNet calls is recomputed
    in backward (checkpointed), and the gradients equal the closed form."""
    from baselines import alignprop_chain

    model, sched, steps, x_T, w, c, d = mock_setup()
    calls = model.calls
    n = len(steps)
    x0 = alignprop_chain(model, sched, x_T, steps, window=(0, n), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    cuts = [int(torch.randint(0, n + 1, (), generator=g)) for _ in range(n)]  # the draws, one per step
    allowed = [i for i in range(n) if i >= cuts[i]]
    assert 0 < len(allowed) and allowed != list(range(allowed[0], n))  # per-step draws: not one cut's suffix
    assert [i for i, (_, _, rg) in enumerate(calls) if rg] == allowed
    (x0 * w).sum().backward()
    assert len(calls) == n + len(allowed)  # backward recomputed exactly the grad-carrying calls
    d_theta, d_x_T = closed_form(model.theta.item(), x_T, w, c, d, allowed, [i in allowed for i in range(n)])
    assert abs(d_theta) > 1e-3 and torch.allclose(model.theta.grad, d_theta, rtol=1e-10)
    assert torch.allclose(x_T.grad, d_x_T, rtol=1e-10)


def test_alignprop_never_detaches_x_t():
    """A window (n, n) detaches every eps: theta gets nothing, yet x_T's gradient flows through every
    x_t: the DDIM update's own coefficients, prod c = 1 / sqrt(abar_{t_0})."""
    from baselines import alignprop_chain

    model, sched, steps, x_T, w, c, d = mock_setup()
    (alignprop_chain(model, sched, x_T, steps, window=(len(steps), len(steps))) * w).sum().backward()
    assert model.theta.grad is None
    assert torch.allclose(x_T.grad, w / sched.alpha_bar[steps[0]].sqrt(), rtol=1e-10)


@pytest.mark.parametrize("K", [1, 3, 10])
def test_drtune_stops_the_input_gradient_and_trains_k_evenly_spaced_steps(K):
    """DRTune: the UNet's input never requires grad; K calls carry gradient, evenly spaced; theta's
    gradient is the closed form with no path through eps's input; x_T's is prod c."""
    from baselines import drtune_chain

    model, sched, steps, x_T, w, c, d = mock_setup()
    calls = model.calls
    n = len(steps)
    x0 = drtune_chain(model, sched, x_T, steps, K, generator=torch.Generator().manual_seed(K))
    assert len(calls) == n and not any(inp_rg for _, inp_rg, _ in calls)
    trained = [i for i, (_, _, rg) in enumerate(calls) if rg]
    assert len(trained) == K and trained[0] < n // K and all(b - a == n // K for a, b in zip(trained, trained[1:]))
    (x0 * w).sum().backward()
    d_theta, d_x_T = closed_form(model.theta.item(), x_T, w, c, d, trained, [False] * n)
    assert abs(d_theta) > 1e-3 and torch.allclose(model.theta.grad, d_theta, rtol=1e-10)
    assert torch.allclose(x_T.grad, d_x_T, rtol=1e-10) and torch.allclose(d_x_T, w / sched.alpha_bar[steps[0]].sqrt())


def test_drtune_offset_is_random_below_the_stride():
    from baselines import drtune_train_steps

    firsts = {drtune_train_steps(50, 5, torch.Generator().manual_seed(s))[0] for s in range(60)}
    assert firsts == set(range(10))  # every offset 0..9 occurs, none beyond the stride


def test_draft_lv_renoises_the_stop_gradient_x0_for_every_copy():
    """Clark et al.: all n copies are q(x_1 | sg(x_0)) (Ho et al. 2020, Eq. 4), each then takes the last
    step with gradient. Checked on the UNet's input at that step, with the noise fixed by the seed."""
    from baselines import draft_lv_chain

    unet, sched, steps, _ = plain_setup()
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)  # (T,) by definition
    sched.alpha_bar = abar
    x_T = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    inputs = []
    unet.register_forward_pre_hook(lambda m, a: inputs.append((int(a[1][0]), a[0])))
    torch.manual_seed(11)
    out = draft_lv_chain(unet, sched, x_T, steps, n=3)
    t_last, x_last = inputs[-1]
    with torch.no_grad():  # the oracle's own x_0: the DDIM chain with no graph
        x0 = ddpm.ddim_sample(unet, sched, x_T, steps)
    torch.manual_seed(11)
    expected = torch.cat([abar[t_last].sqrt() * x0 + (1 - abar[t_last]).sqrt() * torch.randn(x0.shape, dtype=torch.float64)
                          for _ in range(3)])  # (3 B, C, H, W)
    assert t_last == steps[-1] and x_last.shape == (6, 3, 32, 32) and not x_last.requires_grad
    assert torch.allclose(x_last, expected, rtol=1e-12, atol=1e-12), (x_last - expected).abs().max()
    last = lambda x: ddpm.ddim_step(sched, x, unet(x, torch.full((6,), t_last)), t_last, -1)
    assert torch.allclose(out, last(x_last), rtol=1e-12, atol=1e-12)

    def chain():
        torch.manual_seed(11)
        return draft_lv_chain(unet, sched, x_T, steps, n=3)

    g = lora_grad(unet, chain)
    assert g.abs().sum() > 0 and torch.allclose(g, lora_grad(unet, lambda: last(x_last)), rtol=1e-9, atol=1e-12)
    out.sum().backward()
    assert x_T.grad is None  # sg(x_0): no path back to x_T either


def test_naive_shortcut_jump_is_one_base_ddim_step(tmp_path):
    """shortft_naive: the jump t -> s_j is one DDIM step of the frozen base model (no LoRA) over the whole
    segment. The chain equals the 7-hop chain written out with explicit base DDIM steps as the shortcuts."""
    import copy

    from sftlib.config import DEFAULTS
    from sftlib.models import load_naive_shortcut

    base = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(16,), dropout=0.0).eval()
    cfg = {**DEFAULTS, "ch": 8, "ch_mult": "1,2", "num_res_blocks": 1, "attn_res": "16", "eps_skip": False}  # base's
    torch.save({"kind": "ddpm", "config": cfg, "ema": base.state_dict(), "model": base.state_dict()}, tmp_path / "ckpt.pt")
    naive = load_naive_shortcut(str(tmp_path / "ckpt.pt"), "cpu")
    assert not any(p.requires_grad for p in naive.parameters())
    unet = copy.deepcopy(base)
    tlora.add_lora(unet, rank=2, alpha=2.0, k=4)
    randomise_lora(unet, 2)  # the fine-tuned model now differs from the base
    ft = FineTuned(unet, segment_groups(ddpm.ddim_timesteps(1000, 50), EDGES))
    sched = ddpm.Schedule()
    x_T = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # values only: the oracle below has no graph either
        got = shortft_chain(ft, naive, sched, x_T, ft.groups, 0)

        def step(model, x, t, s):  # one DDIM step (Song et al. 2021, Eq. 12) with model's eps
            return ddpm.ddim_step(sched, x, model(x, torch.full((2,), t)), t, s)

        def lora_n(n):
            return lambda x, t: (tlora.set_active(unet, n), unet(x, t))[1]

        x = x_T
        for t in range(981, 741, -20):  # segment 1: the fine-tuned model (LoRA 1), 981 .. 761 -> 741
            x = step(lora_n(1), x, t, t - 20)
        x = step(base, step(lora_n(2), step(base, x, 741, 501), 501, 481), 481, 261)
        x = step(lora_n(4), step(base, step(lora_n(3), x, 261, 241), 241, 1), 1, -1)
    assert (got - x).abs().max() < 1e-5, (got - x).abs().max()
    with torch.no_grad():  # and it is not the distilled-style jump with the fine-tuned model
        assert not torch.allclose(got, shortft_chain(ft, unet, sched, x_T, ft.groups, 0), atol=1e-5)


def test_perfect_shortcut_chain_gradient_equals_autograd_through_the_real_steps():
    """shortft_perfect: each jump is the frozen base model's real DDIM steps over its segment (checkpointed).
    Oracle: the same chain written out step by step without checkpointing; values, the LoRA gradient and
    the input gradient at x_741 agree. And the gradient differs from the distilled-style one-jump chain's."""
    import copy

    base = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(16,), dropout=0.0).eval().requires_grad_(False)
    unet = copy.deepcopy(base)
    tlora.add_lora(unet, rank=2, alpha=2.0, k=4)
    randomise_lora(unet, 3)
    ft = FineTuned(unet, segment_groups(ddpm.ddim_timesteps(1000, 50), EDGES))
    sched = ddpm.Schedule()
    params = [p for p in unet.parameters() if p.requires_grad]
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    w = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))  # a linear "reward"

    def step(model, x, t, s):
        return ddpm.ddim_step(sched, x, model(x, torch.full((2,), t)), t, s)

    def lora_n(n):
        return lambda x, t: (tlora.set_active(unet, n), unet(x, t))[1]

    got = shortft_chain(ft, base, sched, x_T, ft.groups, 0, perfect=True)
    g_got = torch.autograd.grad((got * w).sum(), params)
    x = x_T
    with torch.no_grad():
        for t in range(981, 761, -20):  # segment 1 up to its last step: no gradient (truncated)
            x = step(lora_n(1), x, t, t - 20)
    x = step(lora_n(1), x, 761, 741)
    for seg, lora in ((range(741, 501, -20), 2), (range(481, 261, -20), 3), (range(241, 1, -20), 4)):
        for t in seg:  # the frozen base's real steps: the gradient passes through x only
            x = step(base, x, t, t - 20)
        edge = seg[-1] - 20
        x = step(lora_n(lora), x, edge, edge - 20 if edge > 1 else -1)
    g_ref = torch.autograd.grad((x * w).sum(), params)
    assert (got - x).abs().max() < 1e-5, (got - x).abs().max()
    num = sum(float((a - b).abs().max()) for a, b in zip(g_got, g_ref))
    scale = max(float(b.abs().max()) for b in g_ref)
    assert scale > 0 and num < 1e-4 * scale, (num, scale)
    g_jump = torch.autograd.grad((shortft_chain(ft, base, sched, x_T, ft.groups, 0) * w).sum(), params)
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    assert not torch.allclose(flat(g_jump), flat(g_ref), rtol=1e-3, atol=1e-6)  # the one-jump chain is another chain


def test_baselines_bad_input():
    from baselines import alignprop_chain, draft_chain, draft_lv_chain, drtune_chain

    unet, sched, steps, x_T = plain_setup()
    for bad in (lambda: draft_chain(unet, sched, x_T, steps, K=11), lambda: draft_lv_chain(unet, sched, x_T, steps, n=0),
                lambda: alignprop_chain(unet, sched, x_T, steps, window=(5, 4)),
                lambda: alignprop_chain(unet, sched, x_T, steps, window=(-1, 5)),
                lambda: alignprop_chain(unet, sched, x_T, steps, window=(0, 11)),
                lambda: drtune_chain(unet, sched, x_T, steps, K=0), lambda: drtune_chain(unet, sched, x_T, steps, K=11)):
        with pytest.raises(ValueError):
            bad()


def test_every_method_the_config_accepts_has_its_chain():
    """--method's choices are baselines.METHODS (one list), and method_chain runs each of them to the chain
    it names: the ShortFT methods to shortft_chain's x_0, the baselines to theirs (same noise, same model)."""
    from baselines import METHODS, draft_chain, full_chain, method_chain
    from sftlib import config

    assert config.CHOICES["method"] is METHODS
    ft, student, sched = setup()
    steps, x_T = ddpm.ddim_timesteps(1000, 50), torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = {m: method_chain(m, ft, student, sched, x_T, ft.groups, steps) for m in METHODS}
        assert torch.equal(got["shortft"], shortft_chain(ft, student, sched, x_T, ft.groups))
        assert torch.equal(got["draft"], draft_chain(ft, sched, x_T, steps, 1))
        assert torch.allclose(got["full"], full_chain(ft, sched, x_T, steps))
    assert got["draft_lv"].shape == (2, 3, 32, 32) and all(got[m].shape == x_T.shape for m in METHODS if m != "draft_lv")
    with pytest.raises(ValueError, match="unknown method"):
        method_chain("draft_k", ft, student, sched, x_T, ft.groups, steps)


def test_ptrain_phase_splits_the_budget_into_equal_parts_and_skips_the_t1_phase():
    from shortft import ptrain_phase

    # k = 4: three phases of a third each; the fourth (LoRA 4 alone at t = 1) only on request
    assert [ptrain_phase(4, s / 12) for s in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    assert [ptrain_phase(4, s / 12, t1_phase=True) for s in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert ptrain_phase(4, 1.0) == 2 and ptrain_phase(1, 0.7) == 0  # the end of the budget; k = 1: one phase
    # why t = 1 is skipped: an eps change there moves x_0 by sqrt(1 - abar_1) / sqrt(abar_1) of itself
    sched = ddpm.Schedule()
    x1, eps, d = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    moved = (ddpm.predict_x0(sched, x1, 1, eps + d) - ddpm.predict_x0(sched, x1, 1, eps)).norm() / d.norm()
    assert 0.005 < moved.item() < 0.02
