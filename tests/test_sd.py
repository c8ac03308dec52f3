"""The Stable Diffusion path (sftlib/sd.py, sftlib/sd_rewards.py, train_sd.py, train_toy.py --model=sd15) on tiny
random SD components built from configs, offline.

Oracles: SD's schedule from its formula, the DDIM step from diffusers' DDIMScheduler, the ShortFT chain
from the hops of PAPER.md Sec. 3 written out with plain UNet calls, the saved LoRA through a stock
pipeline's load_lora_weights against the training UNet.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ddpm
import train_sd
from sd_fixtures import random_lora, random_pipeline, tiny_tokenizer
from sftlib import sd, sd_rewards
from sftlib.common import UserError
from shortft import shortft_chain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 16  # images 16x16 -> latents (4, 8, 8) with the tiny VAE (x2)
sd.quiet()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random SD pipeline saved as a diffusers folder, and a random few-step 'shortcut' LoRA file."""
    d = tmp_path_factory.mktemp("sd")
    pipe = random_pipeline("tiny")
    pipe.save_pretrained(d / "pipe")
    save_file(random_lora(pipe.unet, 4, seed=1), str(d / "shortcut.safetensors"))
    return d


def cfg(tiny, **kw):
    return {**train_sd.DEFAULTS, "sd_path": str(tiny / "pipe"), "shortcut": str(tiny / "shortcut.safetensors"),
            "resolution": RES, "lora_rank": 4, "lora_alpha": 8.0, "guidance": 3.0, "device": "cpu", **kw}


def build(tiny, seed=0, **kw):
    """The training setup of train_sd.train: pipeline, T-LoRA, shortcut; every LoRA B randomised (B = 0 at
    the start would make all stacks equal to the base model, and the tests blind)."""
    torch.manual_seed(seed)
    c = cfg(tiny, **kw)
    pipe, ft, sched = train_sd.build(c, torch.device("cpu"), False, c["k_segments"])
    sd.load_lora(pipe, c["shortcut"], "shortcut")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if ".lora_B." in n and "shortcut" not in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    ft.set_prompts(*sd.encode(pipe, ["a red cat"]))
    return pipe, ft, sched


def test_schedule_and_ddim_step_match_sd_and_diffusers(tiny):
    pipe, ft, sched = build(tiny)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # SD 1.5's "scaled_linear" betas
    assert np.allclose(sched.alpha_bar.numpy(), np.cumprod(1 - betas), rtol=1e-5)
    assert sched.T == 1000 and sched.clip_x0 is False
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(50)
    assert ddim.timesteps.tolist() == ddpm.ddim_timesteps(1000, 50)  # 981, 961, ..., 1: the paper's chain
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    ours = ddpm.ddim_step(sched, x, eps, 501, 481)
    assert torch.allclose(ours, ddim.step(eps, 501, x).prev_sample, atol=1e-5)


def explicit_chain(pipe, ft, x_T):
    """PAPER.md Sec. 3 by hand: plain UNet calls with the adapters switched on directly, CFG and the DDIM
    formula written out with diffusers' alphas_cumprod (not ddpm.py, not consistency.jump)."""
    unet, ac = pipe.unet, pipe.scheduler.alphas_cumprod.double()
    a = lambda t: 1.0 if t < 0 else ac[t].item()

    def eps(x, t, adapters, w):
        unet.set_adapters(adapters)
        for n, p in unet.named_parameters():  # set_adapters makes the active ones trainable: not the shortcut
            if ".lora_" in n:
                p.requires_grad_("shortcut" not in n)
        tt = torch.full((2,), t)
        e_u, e_c = unet(torch.cat([x, x]), tt, encoder_hidden_states=torch.cat([ft.uncond, ft.cond])).sample.chunk(2)
        return e_c if w == 1 else e_u + w * (e_c - e_u)

    def ddim(x, e, t, s):
        x0 = (x - (1 - a(t)) ** 0.5 * e) / a(t) ** 0.5
        return a(s) ** 0.5 * x0 + (1 - a(s)) ** 0.5 * e

    x = x_T
    with torch.no_grad():  # 981 .. 781 carry no gradient (truncated backprop)
        for t in range(981, 761, -20):
            x = ddim(x, eps(x, t, ["lora1"], 3.0), t, t - 20)
    x = ddim(x, eps(x, 761, ["lora1"], 3.0), 761, 741)
    x = ddim(x, eps(x, 741, ["shortcut"], 1.0), 741, 501)  # shortcut 741 -> 501
    x = ddim(x, eps(x, 501, ["lora1", "lora2"], 3.0), 501, 481)
    x = ddim(x, eps(x, 481, ["shortcut"], 1.0), 481, 261)
    x = ddim(x, eps(x, 261, ["lora1", "lora2", "lora3"], 3.0), 261, 241)
    x = ddim(x, eps(x, 241, ["shortcut"], 1.0), 241, 1)
    return ddim(x, eps(x, 1, ["lora1", "lora2", "lora3", "lora4"], 3.0), 1, -1)


def lora_grads(unet):
    return {n: p.grad.clone() for n, p in unet.named_parameters() if ".lora_" in n and p.grad is not None}


def test_chain_equals_paper_hops_with_checkpointing(tiny):
    """shortft_chain through the SD adapter, with per-call checkpointing, gives the x_0 and the LoRA gradient
    of the hand-written chain without checkpointing. (Recomputing with whatever adapter is on at backward
    time, as diffusers' own block checkpointing would, fails this.)"""
    pipe, ft, sched = build(tiny, ft_grad_checkpoint=True)
    sd.set_phase(ft, 0)
    x_T = torch.randn(1, 4, 8, 8)
    z = shortft_chain(ft, ft.shortcut, sched, x_T, ft.groups, phase=0)  # (1, 4, 8, 8)
    w = torch.linspace(-1, 1, z.numel()).view_as(z)
    (w * z).sum().backward()
    auto = lora_grads(pipe.unet)
    pipe.unet.zero_grad(set_to_none=True)
    z_ref = explicit_chain(pipe, ft, x_T)
    (w * z_ref).sum().backward()
    ref = lora_grads(pipe.unet)
    assert torch.allclose(z, z_ref, rtol=1e-4, atol=1e-4), (z - z_ref).abs().max()
    assert auto.keys() == ref.keys() and len(auto) > 0
    assert not any("shortcut" in n for n in auto)  # the frozen shortcut: no gradient
    for n in ref:
        assert torch.allclose(auto[n], ref[n], rtol=1e-3, atol=1e-3 * ref[n].abs().max()), n
    assert any(ref[n].abs().max() > 0 for n in ref if ".lora4." in n)


def test_one_step_trains_only_the_stage_loras(tiny):
    """Stage 1 of P-Training: one full step (chain, VAE decode, reward, Adam) changes LoRAs 2..4 only."""
    pipe, ft, sched = build(tiny)
    params = [p for n in ft.names for p in sd.adapter_params(pipe.unet, n)]
    opt = torch.optim.Adam(params, lr=1e-2)
    snap = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    sd.set_phase(ft, 1)
    ft.set_prompts(*sd.encode(pipe, ["a red cat", "a dog"]))
    z = shortft_chain(ft, ft.shortcut, sched, torch.randn(2, 4, 8, 8), ft.groups, phase=1)
    x0 = sd.decode(pipe.vae, z, grad_checkpoint=True)  # (2, 3, 16, 16)
    assert x0.shape == (2, 3, RES, RES) and x0.min() >= -1 and x0.max() <= 1
    sd_rewards.build_reward("saturation+0.5*contrast", "cpu")(x0, ["a"] * 2).mean().neg().backward()
    got = {n for n, p in pipe.unet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and all(n.split(".")[-2] in ("lora2", "lora3", "lora4") for n in got)
    assert {n.split(".")[-2] for n in got} == {"lora2", "lora3", "lora4"}
    for m in (pipe.vae, pipe.text_encoder):
        assert all(p.grad is None for p in m.parameters())
    opt.step()
    for n, p in pipe.unet.named_parameters():
        changed = not torch.equal(p, snap[n])
        assert changed == (n in got), n  # the shortcut, LoRA 1 and the base weights stay bit-identical


def test_saved_tlora_on_a_stock_pipeline_reproduces_the_finetuned_chain(tiny, tmp_path):
    """The saved LoRAs, loaded with load_lora_weights into a stock pipeline and switched per step as the
    README shows, give the DDIM-50 sample of the training UNet; without them the sample differs."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe, ft, sched = build(tiny)
    train_sd.export(pipe.unet, ft, str(tmp_path))
    x_T = torch.randn(1, 4, 8, 8)
    with torch.no_grad():  # sampling only
        ours = ddpm.ddim_sample(ft, sched, x_T, ddpm.ddim_timesteps(1000, 50))  # (1, 4, 8, 8)
    stock = StableDiffusionPipeline.from_pretrained(str(tiny / "pipe"), safety_checker=None,
                                                    requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    # set_alpha_to_one: the last step lands on x_0 exactly, as ddpm.ddim_step does (SD's config stops at abar_0)
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config, set_alpha_to_one=True)
    run = lambda **kw: stock("a red cat", num_inference_steps=50, guidance_scale=3.0, latents=x_T.clone(),
                             height=RES, width=RES, output_type="latent", **kw).images
    plain = run()
    edges = ft.edges  # [761, 501, 261, 1]: from timestep t on, LoRAs 1..max(1, #edges >= t) are on
    for j in range(1, 5):
        stock.load_lora_weights(str(tmp_path / "lora" / f"lora{j}"), adapter_name=f"lora{j}")
    stack = lambda t: [f"lora{j}" for j in range(1, 1 + max(1, sum(e >= t for e in edges)))]

    def switch(p, i, t, kwargs):  # called after the step at t: the LoRAs of the next one, t - 20
        p.set_adapters(stack(int(t) - 20))
        return kwargs

    stock.set_adapters(stack(981))
    loaded = run(callback_on_step_end=switch)
    assert torch.allclose(loaded, ours, atol=1e-4), (loaded - ours).abs().max()  # rank, alpha, weights, stacks
    assert (plain - ours).abs().max() > 1e-3  # and the LoRA changes the output


def tiny_args(tiny, out, *more):
    """A run of the sd15 model on the tiny components: 3 steps, a checkpoint and a grid (DDIM-2) every 2 steps."""
    return [f"--sd_path={tiny / 'pipe'}", f"--shortcut={tiny / 'shortcut.safetensors'}", f"--resolution={RES}",
            "--ft_steps=3", "--ft_ckpt_every=2", "--sample_every=2", "--sample_steps=2", "--log_every=1", "--n_eval=2", "--lora_rank=2",
            "--lora_alpha=2", "--ft_lr=1e-2", "--guidance=3", "--device=cpu", f"--out_dir={out}", *more]


def log_rows(out):
    lines = (out / "sd15" / "log.csv").read_text().splitlines()
    header = lines[0].split(",")
    return header, [dict(zip(header, map(float, line.split(",")))) for line in lines[1:]]


def test_stage_bar_log_grids_and_resume_of_a_killed_run(tiny, tmp_path, capsys, monkeypatch):
    """The SD stage on the stage scaffold: a progress bar, log.csv, validation grids at steps 0, 2 and 3; a run
    killed in step 3 and resumed with --resume ends with the T-LoRA, Adam state and logged rewards of a run
    that was never interrupted."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train_sd.main(tiny_args(tiny, whole))
    assert "sd15: 100%" in capsys.readouterr().out.replace("|", "")  # tqdm's bar, desc sd15, at 3/3
    header, rows = log_rows(whole)
    assert header == ["step", *train_sd.COLUMNS, "img_per_s"] and [r["step"] for r in rows] == [1, 2, 3]
    assert [r["phase"] for r in rows] == [0, 1, 2]  # P-Training: k - 1 = 3 phases of one step (shortft.ptrain_phase)
    grids = sorted(f for f in os.listdir(whole / "sd15") if f.startswith("samples_"))
    assert grids == ["samples_0.png", "samples_2.png", "samples_3.png"]
    from PIL import Image

    assert Image.open(whole / "sd15" / "samples_2.png").size == (2 * (RES + 2) + 2, RES + 4)  # 2 prompts, 1 row
    assert (whole / "sd15" / "lora" / "lora4" / "pytorch_lora_weights.safetensors").is_file()

    calls = {"n": 0}
    chain = train_sd.shortft_chain

    def dies_in_step_3(*a, **kw):  # the run is killed in its third step, after the checkpoint of step 2
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return chain(*a, **kw)

    monkeypatch.setattr(train_sd, "shortft_chain", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_sd.main(tiny_args(tiny, killed))
    monkeypatch.setattr(train_sd, "shortft_chain", chain)
    ckpt = torch.load(killed / "sd15" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and not ckpt["done"]
    with pytest.raises(UserError, match="--resume"):  # an unfinished run is never silently started over
        train_sd.main(tiny_args(tiny, killed))
    capsys.readouterr()
    train_sd.main(tiny_args(tiny, killed, "--resume"))
    assert "from step 2" in capsys.readouterr().out  # "[sd15] resuming .../ckpt.pt from step 2"
    a = torch.load(whole / "sd15" / "ckpt.pt", weights_only=True)
    b = torch.load(killed / "sd15" / "ckpt.pt", weights_only=True)
    assert a["done"] and b["done"] and a["step"] == b["step"] == 3
    assert a["lora"].keys() == b["lora"].keys() and len(a["lora"]) > 0
    for n in a["lora"]:
        assert torch.allclose(a["lora"][n], b["lora"][n], rtol=1e-5, atol=1e-7), n
    assert any(a["lora"][n].abs().max() > 0 for n in a["lora"] if ".lora_B." in n)  # it did train
    for i, s in a["opt"]["state"].items():
        assert torch.allclose(s["exp_avg_sq"], b["opt"]["state"][i]["exp_avg_sq"], rtol=1e-5, atol=1e-12)
    _, rows_b = log_rows(killed)
    assert [r["step"] for r in rows_b] == [1, 2, 3]
    for ra, rb in zip(rows, rows_b):
        assert ra["reward"] == pytest.approx(rb["reward"], rel=1e-5) and ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    assert sorted(f for f in os.listdir(killed / "sd15") if f.startswith("samples_")) == grids
    train_sd.main(tiny_args(tiny, killed))  # complete: the stage is skipped
    assert "skipping the stage" in capsys.readouterr().out


def test_main_entry_runs_the_sd_model_then_sample(tiny, tmp_path):
    """`python train_toy.py --model=sd15 ...` end to end in a fresh process, then `sample` with its LoRA."""
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_toy.py"), "--model=sd15",
                        *tiny_args(tiny, out, "--ft_steps=1")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "sd15" / "lora" / "lora4" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "sd15" / "samples_1.png").is_file() and len(log_rows(out)[1]) == 1
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    train_sd.main(["sample", f"--sd_path={tiny / 'pipe'}", f"--lora_dir={out / 'sd15' / 'lora'}",
                   f"--prompts={prompts}", f"--resolution={RES}", "--device=cpu", f"--out={tmp_path / 's'}"])
    assert (tmp_path / "s" / "000_0.png").is_file() and (tmp_path / "s" / "grid.png").is_file()


def test_model_flag_help_errors_and_lazy_imports():
    run = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True, cwd=ROOT, timeout=300)
    p = run("train_toy.py", "--model=sd3")
    assert p.returncode == 2 and p.stderr.strip() == "error: --model must be one of toy, sd15; got 'sd3'", p.stderr
    p = run("train_toy.py", "--help")
    assert p.returncode == 0 and "--model=sd15" in p.stdout and "--model STR" in p.stdout, p.stdout[-2000:]
    p = run("train_toy.py", "--model=sd15", "--help")
    assert p.returncode == 0, p.stderr
    assert all(f"--{k} " in p.stdout.replace("\n", " ") for k in train_sd.DEFAULTS), p.stdout[-2000:]
    assert "--ddpm_lr" not in p.stdout  # the toy's keys are not the SD model's
    p = run("train_toy.py", "--model=sd15", "--ddpm_lr=1e-3")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--ddpm_lr" in p.stderr, p.stderr
    p = run("-c", "import sys, train_toy, train_sd; print(sorted({'diffusers', 'transformers', 'peft'} & set(sys.modules)))")
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_rewards_are_image_statistics():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    u = ((x + 1) / 2).numpy()
    sat = (u.max(1) - u.min(1)).mean(axis=(1, 2))
    luma = 0.299 * u[:, 0] + 0.587 * u[:, 1] + 0.114 * u[:, 2]
    assert np.allclose(sd_rewards.saturation(x).numpy(), sat, atol=1e-6)
    assert np.allclose(sd_rewards.contrast(x).numpy(), luma.reshape(3, -1).std(1, ddof=1), atol=1e-6)
    gray = torch.zeros(1, 3, 8, 8)
    assert sd_rewards.saturation(gray).item() == 0 and sd_rewards.contrast(gray).item() == 0
    r = sd_rewards.build_reward("2*brightness+saturation", "cpu")(x.requires_grad_(True), ["p"] * 3)
    assert r.shape == (3,) and torch.allclose(r, 2 * ((x + 1) / 2).mean((1, 2, 3)) + sd_rewards.saturation(x))
    for bad in ("sharpness", "x*contrast"):
        with pytest.raises(ValueError):
            sd_rewards.build_reward(bad, "cpu")
    with pytest.raises(UserError, match="aesthetic_path"):
        sd_rewards.build_reward("aesthetic", "cpu")
    with pytest.raises(UserError, match="clip_path"):
        sd_rewards.build_reward("clip", "cpu", clip_path=os.path.join(ROOT, "no_such_clip"))


def test_lora_of_another_base_is_a_clear_error(tiny, tmp_path):
    pipe = sd.load_pipeline(str(tiny / "pipe"), "cpu")
    other = random_pipeline("tiny", cross_attention_dim=48)  # another base: other attention shapes
    save_file(random_lora(other.unet, 4, seed=2), str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="another base model"):
        sd.load_lora(pipe, str(tmp_path / "other.safetensors"), "shortcut")
    save_file({"unet.no.such.layer.lora_A.weight": torch.zeros(4, 8),
               "unet.no.such.layer.lora_B.weight": torch.zeros(8, 4)}, str(tmp_path / "alien.safetensors"))
    with pytest.raises(UserError, match="another base model|SD 1.5"):
        sd.load_lora(pipe, str(tmp_path / "alien.safetensors"), "alien")
    with pytest.raises(UserError, match="no such file"):
        sd.load_lora(pipe, str(tmp_path / "missing.safetensors"), "shortcut")


def test_missing_weights_is_one_line_naming_sd_path(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache, no network
    for entry, where in (("train_sd.py", str(tmp_path / "no_such_dir")), ("train_toy.py", "someone/no-such-model")):
        p = subprocess.run([sys.executable, os.path.join(ROOT, entry), "--model=sd15", f"--sd_path={where}",
                            f"--out_dir={tmp_path / 'out'}"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert p.returncode == 2, p.stderr[-2000:]
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "--sd_path" in lines[0], p.stderr[-2000:]


def test_clip_and_aesthetic_rewards_from_local_weights(tmp_path):
    """CLIP score and the LAION aesthetic head on a tiny random CLIP saved locally, against CLIPModel's own
    forward (normalised image_embeds / text_embeds) and the head written out as five matrix products."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    conf = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                       vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=1),
                      vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                         num_hidden_layers=2, image_size=32, patch_size=8), projection_dim=768)
    CLIPModel(conf).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    dims = [768, 1024, 128, 64, 16, 1]
    head = {f"layers.{i}.{k}": 0.05 * torch.randn(*((dims[j + 1], dims[j]) if k == "weight" else (dims[j + 1],)))
            for j, i in enumerate([0, 2, 4, 6, 7]) for k in ("weight", "bias")}
    torch.save(head, tmp_path / "aesthetic.pth")
    x, prompts = torch.rand(2, 3, 16, 16) * 2 - 1, ["a red cat", "a dog"]
    clip = sd_rewards.build_reward("clip", "cpu", clip_path=str(tmp_path / "clip"))
    aes = sd_rewards.build_reward("aesthetic", "cpu", str(tmp_path / "clip"), str(tmp_path / "aesthetic.pth"))
    model = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    u = torch.nn.functional.interpolate((x + 1) / 2, size=(32, 32), mode="bicubic", antialias=True)
    mean, std = torch.tensor(sd_rewards.CLIPReward.MEAN).view(1, 3, 1, 1), torch.tensor(sd_rewards.CLIPReward.STD).view(1, 3, 1, 1)
    ids = tok(prompts, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=(u - mean) / std)
        h = out.image_embeds
        for i in (0, 2, 4, 6, 7):
            h = h @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
    xg = x.clone().requires_grad_(True)
    r = clip(xg, prompts)
    r.sum().backward()
    assert torch.allclose(r, 100 * (out.image_embeds * out.text_embeds).sum(-1), atol=1e-4)
    assert xg.grad is not None and xg.grad.abs().sum() > 0  # differentiable down to the image
    assert torch.allclose(aes(x, prompts), h.squeeze(1), atol=1e-5)
