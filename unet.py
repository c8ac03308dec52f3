"""A small UNet for 32x32 images that predicts the noise eps_theta(x_t, t).

The architecture of Ho et al. 2020 (Appendix B), the PixelCNN++-style UNet: sinusoidal time
embedding, residual blocks with GroupNorm + SiLU, self-attention at chosen resolutions, skip
connections between the down and up paths. Every weight layer is a plain nn.Conv2d or nn.Linear
with a readable name (`down.1.res.0.conv1`, `mid.attn.qkv`, ...), so LoRA can be attached by name.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, Sec. 3.5; Ho et al. 2020)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)  # (dim/2,)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([args.sin(), args.cos()], dim=1)  # (B, dim)


def norm(ch):
    return nn.GroupNorm(math.gcd(32, ch), ch)


class ResBlock(nn.Module):
    def __init__(self, in_ch, out_ch, temb_ch, dropout):
        super().__init__()
        self.norm1, self.conv1 = norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_ch, out_ch)
        self.norm2, self.conv2 = norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        h = h + self.temb(F.silu(temb))[:, :, None, None]  # time conditioning, (B, out_ch, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions."""

    def __init__(self, ch):
        super().__init__()
        self.norm = norm(ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = nn.Linear(ch, ch)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(h).chunk(3, dim=-1)  # each (B, HW, C)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj(h).transpose(1, 2).reshape(B, C, H, W)


class Level(nn.Module):
    """The residual blocks (and attention) of one resolution level."""

    def __init__(self, chans, temb_ch, dropout, attn):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(i, o, temb_ch, dropout) for i, o in chans)
        self.attn = nn.ModuleList(Attention(o) if attn else nn.Identity() for _, o in chans)


class UNet(nn.Module):
    def __init__(self, in_ch=3, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(16,),
                 dropout=0.1, img_size=32, skip_alpha_bar=None):
        super().__init__()
        self.ch = ch
        # the eps skip (see `forward`): alpha_bar_t of the schedule, or None for the plain UNet
        self.register_buffer("skip_alpha_bar", skip_alpha_bar, persistent=False)
        temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        # down path: remember every feature map's channel count for the skip connections
        skips, cur, res = [ch], ch, img_size
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, m in enumerate(ch_mult):
            chans = []
            for _ in range(num_res_blocks):
                chans.append((cur, ch * m))
                cur = ch * m
                skips.append(cur)
            self.down.append(Level(chans, temb_ch, dropout, res in attn_res))
            last = i == len(ch_mult) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(cur, cur, 3, 2, 1))
            if not last:
                skips.append(cur)
                res //= 2
        self.mid_res1 = ResBlock(cur, cur, temb_ch, dropout)
        self.mid_attn = Attention(cur)
        self.mid_res2 = ResBlock(cur, cur, temb_ch, dropout)
        # up path: num_res_blocks + 1 blocks per level, each eating one skip connection
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            chans = []
            for _ in range(num_res_blocks + 1):
                chans.append((cur + skips.pop(), ch * m))
                cur = ch * m
            self.up.append(Level(chans, temb_ch, dropout, res in attn_res))
            self.upsample.append(nn.Conv2d(cur, cur, 3, padding=1) if i > 0 else nn.Identity())
            if i > 0:
                res *= 2
        self.norm_out = norm(cur)
        self.conv_out = nn.Conv2d(cur, in_ch, 3, padding=1)

    def forward(self, x, t):
        """x: (B, C, H, W) noisy images x_t; t: (B,) integer timesteps in [0, T). Returns eps."""
        temb = self.temb(timestep_embedding(t, self.ch).to(x.dtype))  # (B, 4ch)
        h = self.conv_in(x)  # (B, ch, H, W)
        hs = [h]
        for level, down in zip(self.down, self.downsample):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, temb))
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)  # (B, c, H/2, W/2)
                hs.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, temb)), temb)
        for level, up in zip(self.up, self.upsample):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(torch.cat([h, hs.pop()], dim=1), temb))  # (B, c, H, W)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, c, 2H, 2W)
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)
        if self.skip_alpha_bar is None:
            return out
        # *choice* (--eps_skip): eps = c_skip(t) x_t + F(x_t, t), with c_skip = sqrt(1 - abar) /
        # (abar sigma_d^2 + 1 - abar), sigma_d = 0.5: the best *linear* guess of eps from x_t for data of
        # std sigma_d (E[eps | x_t] when x_0 ~ N(0, sigma_d^2 I)), the skip of Karras et al. 2022 (EDM,
        # Sec. 5) written for eps. At t = 981 it is ~1: eps is almost x_t itself, and x0_hat divides
        # eps's error by sqrt(abar) ~ 0.006. A plain UNet, whose GroupNorms remove each channel's mean,
        # learns to pass x_t's channel means through only slowly; their error, x 150 in x0_hat, is
        # what paints a briefly trained model's samples in one saturated colour.
        abar = self.skip_alpha_bar[t].to(x.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return out + (1 - abar).sqrt() / (abar * SIGMA_DATA**2 + 1 - abar) * x


SIGMA_DATA = 0.5  # the data's standard deviation assumed by the eps skip (EDM's value; CIFAR-10 in [-1, 1]: ~0.5)


def build_unet(cfg):
    """The UNet a config describes (keys: ch, ch_mult, num_res_blocks, attn_res, dropout, and eps_skip
    with the schedule's T, beta_1, beta_T; a config without eps_skip, as older checkpoints have, is a
    plain UNet)."""
    skip = None
    if cfg.get("eps_skip", False):
        import ddpm  # the schedule's alpha_bar, for c_skip(t)
        skip = ddpm.Schedule(cfg["T"], cfg["beta_1"], cfg["beta_T"]).alpha_bar
    return UNet(ch=cfg["ch"], ch_mult=tuple(int(c) for c in str(cfg["ch_mult"]).split(",")),
                num_res_blocks=cfg["num_res_blocks"], dropout=cfg["dropout"],
                attn_res=tuple(int(r) for r in str(cfg["attn_res"]).split(",") if r), skip_alpha_bar=skip)
