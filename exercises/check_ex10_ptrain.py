"""Check for exercise 10 (P-Training's chain gap): the measurement, not its outcome. Against the two chains
written out here (shortft.shortft_chain at the phase, and the fine-tuned model's DDIM-50 chain called as the
sampler calls it, with its T-LoRA stack per timestep), and against a closed case: with k = 50 segments every
jump is the identity, the short chain is the real one, and the gap is exactly zero."""
import pytest
import torch

import checklib
import consistency
import ddpm
import shortft

ex = checklib.load("ex10_ptrain", disable=("benchmarks.ft_probe.chain_gap",))
STEPS = ddpm.ddim_timesteps(1000, 50)


def setup(k=4, seed=0):
    groups = shortft.segment_groups(STEPS, consistency.segment_edges(1000, 50, k))
    ft = shortft.FineTuned(checklib.tiny_lora_unet(seed, k=k), groups)  # random LoRAs: ft is not the base
    student = checklib.tiny_unet(seed + 1).requires_grad_(False)
    x_T = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return ft, student, checklib.schedule64(), x_T


@pytest.mark.parametrize("phase", [0, 2])
def test_gap_against_both_chains_written_here(phase):
    ft, student, sched, x_T = setup()
    with torch.no_grad():
        short = shortft.shortft_chain(ft, student, sched, x_T, ft.groups, phase)
        real = ddpm.ddim_sample(ft, sched, x_T, STEPS)
    gap = ex.chain_gap(ft, student, sched, x_T, STEPS, phase)
    assert gap.shape == (3,), "one value per sample"
    assert torch.allclose(gap, (short - real).pow(2).flatten(1).mean(1), rtol=1e-9)


def test_gap_is_zero_when_the_short_chain_is_the_real_chain():
    ft, student, sched, x_T = setup(k=50)
    assert ex.chain_gap(ft, student, sched, x_T, STEPS, 0).abs().max() < 1e-20


def test_a_measurement_leaves_no_graph():
    ft, student, sched, x_T = setup()
    assert not ex.chain_gap(ft, student, sched, x_T, STEPS, 1).requires_grad
