"""Check for exercise 6 (k segments): against consistency.segment_edges / shortft.segment_groups, the
partition's invariants, and the two ends of the scale: k = 1 is DRaFT-1, k = 50 is full backprop."""
import pytest
import torch

import checklib
import consistency
import ddpm
import baselines
import shortft

ex = checklib.load("ex6_segments", disable=("consistency.segment_edges", "shortft.segment_groups"))
STEPS = ddpm.ddim_timesteps(1000, 50)  # 981, 961, ..., 1


def test_k4_is_the_paper():
    assert ex.segment_edges(1000, 50, 4) == [761, 501, 261, 1]


def test_edges_match_the_project_for_every_k():
    assert ex.segment_edges(1000, 50, 2) == consistency.segment_edges(1000, 50, 2) == [501, 1]
    assert ex.segment_edges(1000, 50, 8) == consistency.segment_edges(1000, 50, 8)
    for k in range(1, 51):
        assert ex.segment_edges(1000, 50, k) == consistency.segment_edges(1000, 50, k), k
    assert ex.segment_edges(1000, 10, 3) == consistency.segment_edges(1000, 10, 3)  # another chain


@pytest.mark.parametrize("k", [0, 51])
def test_bad_k(k):
    with pytest.raises(ValueError):
        ex.segment_edges(1000, 50, k)


@pytest.mark.parametrize("edges", [[761, 501, 261], [760, 501, 261, 1], []])
def test_bad_edges(edges):
    """Edges off the chain, or not ending at its last timestep, would leave steps outside every segment."""
    with pytest.raises(ValueError):
        ex.segment_groups(STEPS, edges)


@pytest.mark.parametrize("k", [1, 2, 4, 8, 50])
def test_groups_partition_the_chain(k):
    edges = ex.segment_edges(1000, 50, k)
    groups = ex.segment_groups(STEPS, edges)
    assert groups == shortft.segment_groups(STEPS, edges)
    assert len(groups) == k and sum(groups, []) == STEPS  # k consecutive pieces, nothing lost or repeated
    assert [g[-1] for g in groups] == edges  # each ends at its edge
    assert max(map(len, groups)) - min(map(len, groups)) <= 1  # as even as 50 / k allows


def grads_of(chain, unet):
    unet.zero_grad(set_to_none=True)
    x0 = chain()
    x0.pow(2).mean().backward()
    return x0, torch.cat([p.grad.flatten() for p in unet.parameters()])


def test_k1_is_draft1_and_k50_is_full_backprop():
    """The ShortFT chain (shortft.shortft_chain, phase 0) on your groups: with one segment there is no
    shortcut and only the last step keeps a graph, DRaFT-1; with 50 every jump is the identity t -> t
    and every base step keeps a graph, full backprop. k trades gradient reach against path length."""
    sched, student = checklib.schedule64(), checklib.tiny_unet(1).requires_grad_(False)
    unet = checklib.tiny_unet(0)
    x_T = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for k, baseline in ((1, lambda: baselines.draft_chain(unet, sched, x_T, STEPS, K=1)),
                        (50, lambda: baselines.full_chain(unet, sched, x_T, STEPS))):
        groups = ex.segment_groups(STEPS, ex.segment_edges(1000, 50, k))
        x0, g = grads_of(lambda: shortft.shortft_chain(unet, student, sched, x_T, groups), unet)
        x0_ref, g_ref = grads_of(baseline, unet)
        assert torch.allclose(x0, x0_ref, atol=1e-12) and torch.allclose(g, g_ref, rtol=1e-9, atol=1e-12), k
