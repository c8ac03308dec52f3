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
import tlora
from benchmarks import ft_probe

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
    # the project's metric (benchmarks/ft_probe.py, one number for the batch) is the mean of these
    assert abs(float(gap.mean()) - ft_probe.chain_gap(dict(method="shortft"), ft, student, sched, x_T, real, phase)) \
        <= 1e-9 * float(gap.mean())


def test_gap_is_zero_when_the_short_chain_is_the_real_chain():
    ft, student, sched, x_T = setup(k=50)
    assert ex.chain_gap(ft, student, sched, x_T, STEPS, 0).abs().max() < 1e-20


def test_a_measurement_leaves_no_graph():
    """Taken between two optimizer steps, on a model whose LoRAs train: not one network call builds a graph
    (a spy sees grad mode off in every call, although the caller has it on), the result holds none, and no
    LoRA receives a gradient; the values are those of the same measurement made under torch.no_grad()."""
    ft, student, sched, x_T = setup()
    params = [p for j in range(4) for p in tlora.lora_params(ft.unet, j)]
    assert params and all(p.requires_grad for p in params)
    modes = []

    class Spied(shortft.FineTuned):  # the same fine-tuned model, noting the grad mode of every call
        def __call__(self, x, t):
            modes.append(torch.is_grad_enabled())
            return super().__call__(x, t)
    spy_student = lambda x, t: (modes.append(torch.is_grad_enabled()), student(x, t))[1]
    with torch.enable_grad():
        gap = ex.chain_gap(Spied(ft.unet, ft.groups), spy_student, sched, x_T, STEPS, 1)
    assert len(modes) > 50 and not any(modes), f"{sum(modes)} of {len(modes)} network calls built a graph"
    assert not gap.requires_grad and gap.grad_fn is None
    assert all(p.grad is None for p in params), "the measurement left a gradient in the LoRAs"
    with torch.no_grad():
        assert torch.allclose(gap, ex.chain_gap(ft, student, sched, x_T, STEPS, 1), rtol=1e-12)
