"""Check for exercise 2 (the shortcut's boundary parameterisation), against consistency.py and closed forms."""
import torch

import checklib
import consistency
import ddpm

ex = checklib.load("ex2_boundary", disable=("consistency.edge_of", "consistency.jump"))
EDGES = [761, 501, 261, 1]


def test_edge_of_by_hand():
    """Segment j is (s_{j+1}, s_j]: an edge belongs to the segment below it."""
    cases = {999: 761, 981: 761, 762: 761, 761: 501, 760: 501, 502: 501, 501: 261, 262: 261, 261: 1, 2: 1, 1: -1, 0: -1}
    assert {t: ex.edge_of(t, EDGES) for t in cases} == cases


def test_edge_of_matches_the_project_everywhere():
    for edges in (EDGES, [501, 1], [901, 1], [1]):
        ours = [ex.edge_of(t, edges) for t in range(1000)]
        assert ours == consistency.edge_of(torch.arange(1000), edges).tolist(), edges


def test_boundary_condition_is_exact():
    """S(x_s, s -> s) = x_s bit for bit. A DDIM step from s to s is the identity only in exact
    arithmetic: with a large eps, x0_hat is huge and sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps cancels
    back to x_s with a visible float32 rounding error. The parameterisation must not depend on that."""
    sched = ddpm.Schedule()
    big_eps = lambda x, t: 1e5 * torch.ones_like(x)  # (B, C, H, W)
    x = torch.randn(4, 3, 8, 8)
    for s in EDGES:
        assert not torch.equal(ddpm.ddim_step(sched, x, big_eps(x, s), s, s), x)  # the naive jump moves x
        assert torch.equal(ex.jump(big_eps, sched, x, s, s), x), s


def test_matches_the_project_jump_per_sample():
    """t and s per sample, some with t == s, as in the consistency-distillation batch (cd_loss)."""
    sched, student = checklib.schedule64(), checklib.TinyEps(0).requires_grad_(False)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([981, 761, 741, 501, 30, 1])  # (6,)
    s = torch.tensor([761, 761, 501, 261, 1, -1])  # (6,) two on the boundary (981 -> 761 is a real jump)
    ours = ex.jump(student, sched, x, t, s)
    assert torch.allclose(ours, consistency.jump(student, sched, x, t, s), atol=1e-10)
    assert torch.equal(ours[1], x[1])
    ours_int = ex.jump(student, sched, x, 741, 501)  # t, s as ints
    assert torch.allclose(ours_int, consistency.jump(student, sched, x, 741, 501), atol=1e-10)


def test_oracle_student_lands_on_the_trajectory():
    """With the true eps (eps* of one x_0) the jump t -> s lands on q(x_s | x_0) with the same eps, and
    s = -1 on x_0 itself: a perfect shortcut is trajectory-preserving."""
    sched = checklib.schedule64()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1  # (2, 3, 8, 8)
    eps = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    oracle = checklib.true_eps(sched, x0)
    for t in (981, 741, 481, 241):
        s = ex.edge_of(t, EDGES)
        got = ex.jump(oracle, sched, ddpm.q_sample(sched, x0, t, eps), t, s)
        assert torch.allclose(got, ddpm.q_sample(sched, x0, s, eps), atol=1e-9), (t, s)
    assert torch.allclose(ex.jump(oracle, sched, ddpm.q_sample(sched, x0, 1, eps), 1, -1), x0, atol=1e-9)


def test_gradient_through_the_input_only():
    """A frozen student passes the gradient to x_t (ShortFT's backward path) and takes none itself;
    at the boundary dS/dx_t is exactly the identity."""
    sched, student = checklib.schedule64(), checklib.TinyEps(1).requires_grad_(False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    t, s = torch.tensor([741, 501]), torch.tensor([501, 501])  # (2,), (2,): a real jump, then the boundary
    w = torch.randn(2, 3, 8, 8, dtype=torch.float64)  # a random "reward" direction
    (ex.jump(student, sched, x, t, s) * w).sum().backward()
    assert torch.equal(x.grad[1], w[1])  # d x_t / d x_t = I at the boundary
    assert all(p.grad is None for p in student.parameters())
    (grad_ref,) = torch.autograd.grad((consistency.jump(student, sched, x, t, s) * w).sum(), x)
    assert torch.allclose(x.grad, grad_ref, atol=1e-10)  # through the DDIM formula and through the student
