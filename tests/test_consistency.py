"""The shortcut (consistency.py), each piece checked against an independent computation: DDIM written
out from alpha_bar, finite differences, closed-form ODE solutions for a point mass and a Gaussian."""
import copy
import os

import numpy as np
import pytest
import torch

from sftlib import config
import consistency as C
import ddpm
import train_shortcut
from sftlib.common import UserError, export_safetensors, file_sha256, load_checkpoint, read_safetensors, save_atomic
from conftest import TINY, run_cli
from unet import UNet, build_unet

SCHED = ddpm.Schedule()  # T = 1000, beta 1e-4 .. 0.02
E4 = [761, 501, 261, 1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def tiny_unet(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(), dropout=0.0).to(dtype).eval()


def alpha_bar_f64(t):
    """alpha_bar written out again (Ho et al. 2020, linear betas), independent of ddpm.Schedule."""
    return 1.0 if t < 0 else float(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t])


class PointMassEps(torch.nn.Module):
    """The exact eps for data that is one image x0*: eps = (x_t - sqrt(abar_t) x0*) / sqrt(1 - abar_t).
    Its DDIM steps solve the probability-flow ODE exactly, so every jump lands on the trajectory."""

    def __init__(self, x0_star):
        super().__init__()
        self.register_buffer("x0", x0_star)

    def forward(self, x, t):
        abar = SCHED.abar(t).view(-1, 1, 1, 1)
        return (x - abar.sqrt() * self.x0) / (1 - abar).sqrt()


def test_segment_edges():
    grid = ddpm.ddim_timesteps(1000, 50)
    assert C.segment_edges(1000, 50, 4) == [761, 501, 261, 1]  # PAPER.md Sec. 3
    assert C.segment_edges(1000, 50, 1) == [1]
    assert C.segment_edges(1000, 50, 2) == [501, 1]
    e8 = C.segment_edges(1000, 50, 8)
    assert len(e8) == 8 and e8 == sorted(e8, reverse=True) and e8[-1] == 1 and set(e8) <= set(grid)
    assert C.segment_edges(1000, 50, 50) == grid  # every DDIM step its own segment
    for bad in (0, -1, 51):
        with pytest.raises(ValueError):
            C.segment_edges(1000, 50, bad)


def test_edge_of():
    table = {999: 761, 981: 761, 762: 761, 761: 501, 741: 501, 502: 501, 501: 261, 481: 261, 261: 1,
             241: 1, 2: 1, 1: -1, 0: -1}
    for t, e in table.items():
        assert C.edge_of(t, E4) == e
    t = torch.tensor(list(table))
    assert C.edge_of(t, E4).tolist() == list(table.values())
    assert C.edge_of(741, E4) == 501 and C.edge_of(481, E4) == 261 and C.edge_of(241, E4) == 1  # the shortcuts


def test_jump_boundary_condition_is_exact():
    student, x = tiny_unet(), torch.randn(3, 3, 8, 8)
    y = C.jump(student, SCHED, x, torch.tensor([761, 501, 300]), torch.tensor([761, 261, 300]))
    assert torch.equal(y[0], x[0]) and torch.equal(y[2], x[2])  # t == s: the identity, bit for bit
    assert not torch.allclose(y[1], x[1])
    assert torch.equal(C.jump(student, SCHED, x, 1, 1), x)


def test_jump_with_teacher_weights_is_one_ddim_step():
    teacher = tiny_unet(1)
    student = copy.deepcopy(teacher)  # the student starts as the teacher, as in train_shortcut.train
    edges = C.segment_edges(1000, 50, 50)  # segments of one DDIM step each
    x = torch.randn(2, 3, 8, 8)
    for clip in (False, True):  # with x0-clipping (ddpm.py): x0_hat into [-1, 1], eps re-derived from it
        for t in (981, 501, 21, 1):
            s = C.edge_of(t, edges)
            assert s == (t - 20 if t > 1 else -1)
            eps = teacher(x, torch.full((2,), t)).double()
            a_t, a_s = alpha_bar_f64(t), alpha_bar_f64(s)
            x0_hat = (x.double() - (1 - a_t) ** 0.5 * eps) / a_t**0.5  # Song et al. 2021, Eq. 12
            if clip:
                x0_hat = x0_hat.clamp(-1, 1)
                eps = (x.double() - a_t**0.5 * x0_hat) / (1 - a_t) ** 0.5
            want = a_s**0.5 * x0_hat + (1 - a_s) ** 0.5 * eps
            got = C.jump(student, ddpm.Schedule(clip_x0=clip), x, t, s)
            assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4), (t, (got.double() - want).abs().max())


class ConvEps(torch.nn.Module):
    """A small float64 eps-network with time input, for gradcheck (the UNet embeds t in float32)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t):
        return self.c2(torch.tanh(self.c1(x))) * (1 + t.to(x.dtype) / 1000).view(-1, 1, 1, 1)


def test_jump_gradient_wrt_input_and_none_to_frozen_student():
    net = ConvEps().double().requires_grad_(False)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    # autograd's gradient w.r.t. x_t against finite differences
    assert torch.autograd.gradcheck(lambda x: C.jump(net, SCHED, x, 741, 501), (x,), eps=1e-6, atol=1e-5)
    student, x = tiny_unet(2).requires_grad_(False), torch.randn(2, 3, 8, 8, requires_grad=True)
    C.jump(student, SCHED, x, 481, 261).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.parameters())


def test_heun_teacher_is_second_order_on_gaussian_data():
    """Gaussian data N(0, c^2 I): eps(x_t) = sqrt(1 - abar) x_t / (abar c^2 + 1 - abar), and the exact ODE
    map scales x by the ratio of the marginal stds. On a DDIM-50 grid step Heun must be much closer to
    it than DDIM (Euler); on the last step (to x_0) Heun falls back to DDIM."""
    c2 = 0.25
    std = lambda t: (SCHED.abar(t) * c2 + 1 - SCHED.abar(t)).sqrt()
    model = lambda x, t: (1 - SCHED.abar(t)).sqrt().view(-1, 1, 1, 1) * x / std(t).view(-1, 1, 1, 1) ** 2
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for t in (781, 481, 181, 21, 1):
        tv, sv = torch.full((4,), t), torch.full((4,), t - 20 if t > 1 else -1)
        exact = x * std(sv[0]) / std(t)
        err = {m: (C.teacher_step(model, SCHED, x, tv, sv, m) - exact).abs().max().item() for m in ("ddim", "heun")}
        assert err["heun"] < 0.2 * err["ddim"] if t > 1 else err["heun"] == err["ddim"], (t, err)


def test_cd_loss_is_zero_for_an_exactly_consistent_teacher():
    """Data = one image: the exact-eps teacher's DDIM trajectories are the true ODE trajectories, so the
    student = teacher = EMA has consistency loss ~0 at every t; a wrong student does not."""
    torch.manual_seed(0)
    x0_star = torch.rand(1, 3, 8, 8) * 2 - 1
    exact = PointMassEps(x0_star)
    x0 = x0_star.expand(64, -1, -1, -1)  # (64, 3, 8, 8) a batch of the one data point
    for loss in ("l2", "huber"):
        for solver in ("ddim", "heun"):
            assert C.cd_loss(exact, exact, exact, SCHED, x0, E4, loss, solver).item() < 1e-8
    wrong = PointMassEps(x0_star + 0.1)
    assert C.cd_loss(wrong, exact, exact, SCHED, x0, E4).item() > 1e-4
    # gradients: to the student only
    student, ema, teacher = tiny_unet(3), tiny_unet(4).requires_grad_(False), tiny_unet(5).requires_grad_(False)
    C.cd_loss(student, ema, teacher, SCHED, torch.rand(8, 3, 8, 8) * 2 - 1, E4, "huber", "heun").backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in [*ema.parameters(), *teacher.parameters()])


def test_teacher_chains_walk_the_teachers_ddim50_trajectories():
    """Each chain's state is the teacher's DDIM-50 point (DDIM steps run separately here) at its position;
    a chain that reaches x_0 restarts from noise at 981."""
    teacher, m = tiny_unet(6), 5
    torch.manual_seed(7)
    chains = C.TeacherChains(teacher, SCHED, m, torch.device("cpu"))
    torch.manual_seed(7)
    x_T = torch.randn(m, 3, 32, 32)
    grid = ddpm.ddim_timesteps(1000, 50)
    assert chains.n.tolist() == [0, 10, 20, 30, 40]
    x = x_T  # the teacher's DDIM-50 trajectories, step by step
    with torch.no_grad():
        for j, t in enumerate(grid[:41]):
            for i in range(m):
                if chains.n[i] == j:
                    assert torch.allclose(chains.x[i], x[i], atol=1e-5), (i, j)
            x = ddpm.ddim_step(SCHED, x, teacher(x, torch.full((m,), t)), t, grid[j + 1])
    chains.n[-1] = 49
    chains.advance(torch.zeros(m, 3, 32, 32))
    assert chains.n.tolist() == [1, 11, 21, 31, 0] and chains.x[-1].abs().sum() > 0 and chains.x[0].abs().sum() == 0


def test_shortcut_sample_visits_the_edges_with_k_plus_1_calls():
    torch.manual_seed(0)
    x0_star = torch.rand(1, 3, 8, 8) * 2 - 1
    calls = []

    class Spy(PointMassEps):
        def forward(self, x, t):
            calls.append(int(t[0]))
            return super().forward(x, t)

    x = C.shortcut_sample(Spy(x0_star), SCHED, torch.randn(5, 3, 8, 8), E4)
    assert calls == [981, 761, 501, 261, 1]  # k + 1 = 5 network calls
    assert torch.allclose(x, x0_star.expand(5, -1, -1, -1), atol=1e-4)  # exact teacher: lands on the data


def fake_teacher(out_dir, kind="ddpm", **changes):
    """A DDPM checkpoint with random weights of the tiny UNet (the shortcut stage only needs a teacher)."""
    cfg = config.resolve(TINY, False)
    model = build_unet(dict(cfg, **changes))
    save_atomic(dict(kind=kind, model=model.state_dict(), ema=model.state_dict(), step=1, config=dict(cfg)),
                os.path.join(out_dir, "ddpm", "ckpt.pt"))
    export_safetensors(model.state_dict(), dict(cfg), os.path.join(out_dir, "ddpm", "model.safetensors"), kind="ddpm")
    return cfg


def test_shortcut_stage_rejects_a_bad_teacher(tmp_path):
    cfg = dict(config.resolve(TINY, False), out_dir=str(tmp_path))
    with pytest.raises(UserError, match="ddpm stage"):
        train_shortcut.train(dict(cfg), torch.device("cpu"))
    fake_teacher(tmp_path, kind="classifier")
    with pytest.raises(UserError, match="expected 'ddpm'"):
        train_shortcut.train(dict(cfg), torch.device("cpu"))
    fake_teacher(tmp_path, ch=8)  # weights of another shape than its config says
    with pytest.raises(UserError, match="do not match"):
        train_shortcut.train(dict(cfg), torch.device("cpu"))
    fake_teacher(tmp_path)
    with pytest.raises(ValueError, match="k_segments"):
        train_shortcut.train(dict(cfg, k_segments=0), torch.device("cpu"))


def test_shortcut_stage_end_to_end(tmp_path, cifar_root, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny runs: one thread per process avoids contention
    out = str(tmp_path)
    fake_teacher(out)
    args = [f"--out_dir={out}", f"--data_root={cifar_root}", "--stages=shortcut", "--n_train=100",
            "--shortcut_batch=8", "--shortcut_ckpt_every=2", "--sample_every=1000", *TINY]
    run_cli(*args, "--shortcut_steps=2")
    assert run_cli(*args, "--shortcut_steps=3", check=False).returncode == 2  # unfinished: needs --resume
    assert "resuming" in run_cli(*args, "--shortcut_steps=3", "--resume").stdout
    assert "skipping" in run_cli(*args, "--shortcut_steps=3").stdout
    ckpt = load_checkpoint(os.path.join(out, "shortcut", "ckpt.pt"), "shortcut")
    assert ckpt["step"] == 3 and ckpt["edges"] == E4
    assert os.path.isfile(os.path.join(out, "shortcut", "samples_0.png"))
    assert os.path.isfile(os.path.join(out, "shortcut", "samples_3.png"))
    # the export for sharing: the EMA student as .safetensors, its config and edges in the metadata
    weights, meta = read_safetensors(os.path.join(out, "shortcut", "model.safetensors"))
    assert weights.keys() == ckpt["ema"].keys() and all(torch.equal(weights[k], ckpt["ema"][k]) for k in weights)
    assert meta["kind"] == "shortcut" and meta["edges"] == E4 and meta["config"]["shortcut_steps"] == 3
    npz = os.path.join(out, "s.npz")
    run_cli("sample", f"--ckpt={out}/shortcut/ckpt.pt", "--sampler=shortcut", "--n=10", f"--out={npz}", "--device=cpu")
    with np.load(npz) as f:
        assert f["images"].shape == (10, 32, 32, 3) and f["images"].dtype == np.uint8
    bad = run_cli("sample", f"--ckpt={out}/shortcut/ckpt.pt", "--sampler=shortcut", "--steps=3", check=False)
    assert bad.returncode == 2 and "k = 4" in bad.stderr


def test_shortcut_refuses_an_unfinished_or_changed_teacher(tmp_path, cifar_root, monkeypatch):
    """Provenance: a teacher without its model.safetensors (the ddpm stage was stopped) is refused before any
    distillation; a complete shortcut whose teacher has changed since is refused, not kept silently."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path)
    cfg = dict(config.resolve(TINY, False), out_dir=out, data_root=cifar_root, n_train=100, shortcut_batch=4,
               shortcut_steps=1, shortcut_ckpt_every=1, sample_every=1000)
    fake_teacher(out)
    os.remove(os.path.join(out, "ddpm", "model.safetensors"))  # a killed ddpm run has no export yet
    with pytest.raises(UserError, match="unfinished"):
        train_shortcut.train(dict(cfg), torch.device("cpu"))
    assert not os.path.exists(os.path.join(out, "shortcut", "ckpt.pt"))
    fake_teacher(out)
    train_shortcut.train(dict(cfg), torch.device("cpu"))
    ckpt = load_checkpoint(os.path.join(out, "shortcut", "ckpt.pt"), "shortcut")
    assert ckpt["teacher_sha256"] == file_sha256(os.path.join(out, "ddpm", "model.safetensors"))
    train_shortcut.train(dict(cfg), torch.device("cpu"))  # complete, same teacher: skipped, no error
    fake_teacher(out)  # new random weights: another teacher
    with pytest.raises(UserError, match="another teacher"):
        train_shortcut.train(dict(cfg), torch.device("cpu"))
