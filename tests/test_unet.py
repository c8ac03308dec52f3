"""The UNet: output shape for any channel count, time conditioning, sizes, layers reachable by name."""
import pytest
import torch
import torch.nn as nn

from sftlib import config
from unet import UNet, build_unet


@pytest.mark.parametrize("in_ch", [1, 3, 4])
def test_output_shape_any_channel_count(in_ch):
    net = UNet(in_ch=in_ch, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(16,))
    x = torch.randn(2, in_ch, 32, 32)
    assert net(x, torch.tensor([0, 999])).shape == x.shape


def test_time_conditioning_changes_output():
    torch.manual_seed(0)
    net = build_unet(config.DEFAULTS).eval()
    x = torch.randn(1, 3, 32, 32).expand(3, 3, 32, 32)  # the same image three times
    out = net(x, torch.tensor([0, 500, 999]))
    assert not torch.allclose(out[0], out[1], atol=1e-4) and not torch.allclose(out[1], out[2], atol=1e-4)
    assert torch.allclose(net(x[:1], torch.tensor([500])), out[1:2], atol=1e-5)  # same t -> same output


def test_preset_sizes():
    n = lambda cfg: sum(p.numel() for p in build_unet(cfg).parameters())
    assert 0.5e6 <= n(config.DEFAULTS) <= 2e6  # the CPU / test model
    gpu = dict(config.DEFAULTS, **config.PRESETS["gpu"])
    assert abs(n(gpu) - 8.95e6) < 0.05e6  # the 8-minute preset: Ho et al.'s layout at half the width
    long = dict(config.DEFAULTS, **config.PRESETS["gpu_long"])
    assert abs(n(long) - 35.7e6) < 0.2e6  # Ho et al. 2020's CIFAR-10 model: 35.7M


def test_weight_layers_are_named_conv_and_linear():
    net = build_unet(config.DEFAULTS)
    names = {name for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {"conv_in", "conv_out", "temb.0", "mid_attn.qkv", "down.0.res.0.conv1", "up.0.res.0.temb"} <= names
    # every parameter lives in a Conv2d, a Linear or a GroupNorm: nothing hidden for LoRA to miss
    kinds = {type(m) for m in net.modules() if any(True for _ in m.parameters(recurse=False))}
    assert kinds <= {nn.Conv2d, nn.Linear, nn.GroupNorm}


def test_eps_skip_adds_the_linear_guess_of_eps_and_keeps_the_state_dict():
    """eps_skip: out = UNet(x, t) + c_skip(t) x with c_skip = sqrt(1 - abar) / (abar sigma^2 + 1 - abar),
    checked against the plain UNet with the same weights; the state dict is the plain one's (old
    checkpoints load) and a config without the key builds the plain UNet."""
    import ddpm
    from sftlib import config
    from unet import SIGMA_DATA, build_unet

    cfg = dict(config.DEFAULTS, ch=8, ch_mult="1,2", attn_res="", eps_skip=False)
    torch.manual_seed(0)
    plain = build_unet(cfg).eval()
    skip = build_unet(dict(cfg, eps_skip=True)).eval()
    assert skip.state_dict().keys() == plain.state_dict().keys()
    skip.load_state_dict(plain.state_dict())
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0, 500, 981])
    abar = ddpm.Schedule().alpha_bar[t].view(-1, 1, 1, 1)
    c = (1 - abar).sqrt() / (abar * SIGMA_DATA**2 + 1 - abar)
    with torch.no_grad():
        torch.testing.assert_close(skip(x, t), plain(x, t) + c * x)
    assert c[2].item() > 0.99 and c[0].item() < 0.05  # ~x_t at the top of the chain, ~0 at the bottom
    legacy = {k: v for k, v in cfg.items() if k != "eps_skip"}
    assert build_unet(legacy).skip_alpha_bar is None
