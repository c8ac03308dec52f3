"""Check for exercise 3 (the ShortFT chain): against a chain written out by hand, one line per hop of
PAPER.md Sec. 3, and against shortft.shortft_chain for the later progressive phases."""
import pytest
import torch

import checklib
import ddpm
import tlora
import shortft
from consistency import jump

ex = checklib.load("ex3_chain", disable=("shortft.shortft_chain", "shortft.real_segment"))
EDGES = [761, 501, 261, 1]


def setup():
    """A tiny base UNet with 4 random T-LoRAs (the fine-tuned model) and a frozen tiny student."""
    groups = shortft.segment_groups(ddpm.ddim_timesteps(1000, 50), EDGES)
    ft = shortft.FineTuned(checklib.tiny_lora_unet(0, k=4), groups)  # LoRAs 1..j on from edge s_j down
    student = checklib.tiny_unet(1).requires_grad_(False)
    x_T = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return ft, student, checklib.schedule64(), x_T, groups


def lora_grads(unet):
    return [p.grad.clone() if p.grad is not None else None for j in range(4) for p in tlora.lora_params(unet, j)]


def same_grads(a, b):
    return all((u is None and v is None) or (u is not None and v is not None and torch.allclose(u, v, atol=1e-12))
               for u, v in zip(a, b))


def test_phase0_equals_the_chain_written_out_by_hand():
    ft, student, sched, x_T, groups = setup()
    f = lambda x0: (x0 * torch.linspace(-1, 1, x0.numel(), dtype=x0.dtype).view_as(x0)).sum()  # a "reward"
    x_T.requires_grad_(True)
    ours = ex.shortft_chain(ft, student, sched, x_T, groups, phase=0)
    f(ours).backward()
    auto = lora_grads(ft.unet)
    assert x_T.grad is None, "the steps 981 .. 781 must keep no graph (truncated backprop): x_T gets no gradient"

    def eps(x, t, n):  # the base model with its first n LoRAs on
        tlora.set_active(ft.unet, n)
        return ft.unet(x, torch.full((x.shape[0],), t))

    x = x_T.detach()
    with torch.no_grad():  # 981 -> 961 -> ... -> 781 -> 761 with LoRA 1, no graph
        for t in range(981, 761, -20):
            x = ddpm.ddim_step(sched, x, eps(x, t, 1), t, t - 20)
    x = ddpm.ddim_step(sched, x, eps(x, 761, 1), 761, 741)  # the one real step with a graph
    x = jump(student, sched, x, 741, 501)
    x = ddpm.ddim_step(sched, x, eps(x, 501, 2), 501, 481)
    x = jump(student, sched, x, 481, 261)
    x = ddpm.ddim_step(sched, x, eps(x, 261, 3), 261, 241)
    x = jump(student, sched, x, 241, 1)
    x0 = ddpm.ddim_step(sched, x, eps(x, 1, 4), 1, -1)
    assert torch.allclose(ours, x0, atol=1e-12)
    ft.unet.zero_grad(set_to_none=True)
    f(x0).backward()
    assert all(g is not None and g.abs().sum() > 0 for g in auto[-2:])  # LoRA 4 got a gradient at all
    assert same_grads(auto, lora_grads(ft.unet)), "the LoRA gradients differ from the hand-built chain's"


def test_which_calls_and_where_the_graph_is():
    """Phase 0: 12 base calls in segment 1 (only the one at 761 with a graph), then per later segment one
    student call (the shortcut) and one base call at the edge: 7 calls on the gradient path, not 50."""
    ft, student, sched, x_T, groups = setup()
    calls = []

    def spy(name, net):
        def call(x, t):
            calls.append((name, int(t[0]), torch.is_grad_enabled()))
            return net(x, t)
        return call

    ex.shortft_chain(spy("base", ft), spy("shortcut", student), sched, x_T, groups, phase=0)
    expected = ([("base", t, False) for t in range(981, 761, -20)] + [("base", 761, True)] +
                [("shortcut", 741, True), ("base", 501, True), ("shortcut", 481, True), ("base", 261, True),
                 ("shortcut", 241, True), ("base", 1, True)])
    assert calls == expected


@pytest.mark.parametrize("phase", [1, 3])
def test_progressive_phases_match_the_project(phase):
    """P-Training: the real chain runs up to segment `phase`, only its last step keeps a graph."""
    ft, student, sched, x_T, groups = setup()
    shortft.set_phase(ft, phase)  # LoRAs < phase frozen, as in training
    ours = ex.shortft_chain(ft, student, sched, x_T, groups, phase)
    ours.pow(2).mean().backward()
    a = lora_grads(ft.unet)
    ft.unet.zero_grad(set_to_none=True)
    ref = shortft.shortft_chain(ft, student, sched, x_T, groups, phase)
    ref.pow(2).mean().backward()
    assert torch.allclose(ours, ref, atol=1e-12)
    assert any(g is not None and g.abs().sum() > 0 for g in a) and same_grads(a, lora_grads(ft.unet))
