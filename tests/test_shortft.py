"""ShortFT and LoRA, checked against explicit computations on tiny random networks."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddpm
from sftlib import lora
from sftlib.common import UserError
from consistency import jump
from shortft import FineTuned, merge_for_sampling, segment_groups, set_stage, shortft_chain
from unet import UNet

EDGES = [761, 501, 261, 1]


def tiny_unet(seed):
    torch.manual_seed(seed)
    return UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(16,), dropout=0.0).eval()


def randomise_lora(unet, seed):
    """LoRA B starts at zero (delta W = 0); give every LoRA non-zero weights so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(unet):
            for B in m.B:
                B.weight.copy_(0.05 * torch.randn(B.weight.shape, generator=g))


def setup(k=4, dtype=torch.float32):
    unet, student = tiny_unet(0).to(dtype), tiny_unet(1).to(dtype).requires_grad_(False)
    lora.add_lora(unet, rank=2, alpha=2.0, k=k)
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
    lora.add_lora(holder, rank=2, alpha=4.0, k=3)
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
    got = {j: any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.lora_params(ft.unet, j))
           for j in range(len(ft.groups))}
    base = [p for n, p in ft.unet.named_parameters() if ".A." not in n and ".B." not in n]
    got["base"] = any(p.grad is not None for p in base)
    got["student"] = any(p.grad is not None for p in student.parameters())
    return got


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_gradient_reaches_exactly_the_stage_loras(stage):
    ft, student, sched = setup()
    set_stage(ft, stage)
    x0 = shortft_chain(ft, student, sched, torch.randn(2, 3, 32, 32), ft.groups, stage)
    x0.mean().backward()
    got = grads(ft, student)
    assert got == {**{j: j >= stage for j in range(4)}, "base": False, "student": False}


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
        lora.set_active(ft.unet, n)
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


def test_bad_stage_and_rank():
    ft, student, sched = setup()
    with pytest.raises(UserError):
        shortft_chain(ft, student, sched, torch.randn(1, 3, 32, 32), ft.groups, stage=4)
    with pytest.raises(UserError):
        lora.add_lora(tiny_unet(0), rank=0, alpha=1.0, k=1)
    with pytest.raises(UserError):
        lora.add_lora(tiny_unet(0), rank=2, alpha=1.0, k=1, targets="no_such_layer")


# --- the baselines --------------------------------------------------------------------------------

def plain_setup(steps=10):
    """A tiny UNet with one plain LoRA (what the baselines train), a short DDIM chain, float64."""
    unet = tiny_unet(0).double()
    lora.add_lora(unet, rank=2, alpha=2.0, k=1)
    randomise_lora(unet, 3)
    unet.double()
    sched = ddpm.Schedule()
    sched.alpha_bar = sched.alpha_bar.double()
    return unet, sched, ddpm.ddim_timesteps(1000, steps), torch.randn(1, 3, 32, 32, dtype=torch.float64)


def lora_grad(unet, fn):
    unet.zero_grad(set_to_none=True)
    fn().pow(2).mean().backward()
    return torch.cat([p.grad.flatten() for p in lora.lora_params(unet, 0)])


def test_draft_k_gradient_equals_explicit_k_step_graph():
    from shortft import draft_chain

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
    from shortft import full_chain

    unet, sched, steps, x_T = plain_setup()
    a = lora_grad(unet, lambda: full_chain(unet, sched, x_T, steps, checkpoint=False))
    b = lora_grad(unet, lambda: full_chain(unet, sched, x_T, steps, checkpoint=True))
    assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_alignprop_cut_never_detaches_x_t():
    from shortft import alignprop_chain

    unet, sched, steps, x_T = plain_setup()
    x_T.requires_grad_(True)
    alignprop_chain(unet, sched, x_T, steps, cut=len(steps) - 1).pow(2).mean().backward()
    assert x_T.grad is not None and x_T.grad.abs().sum() > 0  # the gradient reached x_T through every x_t
    assert all(p.grad is not None for p in lora.lora_params(unet, 0))  # and the last step's eps carries one


def test_draft_lv_with_one_copy_is_draft_1():
    from shortft import draft_chain, draft_lv_chain

    unet, sched, steps, x_T = plain_setup()
    assert torch.equal(draft_lv_chain(unet, sched, x_T, steps, n=1), draft_chain(unet, sched, x_T, steps, K=1))
    assert torch.allclose(lora_grad(unet, lambda: draft_lv_chain(unet, sched, x_T, steps, n=1)),
                          lora_grad(unet, lambda: draft_chain(unet, sched, x_T, steps, K=1)))
    assert draft_lv_chain(unet, sched, x_T, steps, n=3).shape[0] == 3


def test_baselines_bad_input():
    from shortft import alignprop_chain, draft_chain, draft_lv_chain

    unet, sched, steps, x_T = plain_setup()
    for bad in (lambda: draft_chain(unet, sched, x_T, steps, K=11), lambda: draft_lv_chain(unet, sched, x_T, steps, n=0),
                lambda: alignprop_chain(unet, sched, x_T, steps, cut=10)):
        with pytest.raises(UserError):
            bad()
