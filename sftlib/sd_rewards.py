"""Rewards on Stable Diffusion's decoded images: x in [-1, 1] (B, 3, H, W) and the prompts -> (B,), higher
is better (the convention of rewards.py, whose spec parser reads these specs too: 'saturation',
'0.5*aesthetic+0.5*clip'). brightness, saturation and contrast need no download; clip needs --clip_path,
aesthetic also --aesthetic_path. transformers is imported only when a CLIP reward is built."""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from rewards import brightness, parse_reward_spec
from sftlib.common import UserError, torch_load_trusted


def saturation(x):
    """Mean chroma of the image in [0, 1]: max_c - min_c per pixel (HSV's S times V), averaged."""
    u = (x + 1) / 2  # (B, 3, H, W) in [0, 1]
    return (u.amax(1) - u.amin(1)).mean(dim=(1, 2))  # (B,)


def contrast(x):
    """RMS contrast: the standard deviation of the luma Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601)."""
    u = (x + 1) / 2  # (B, 3, H, W) in [0, 1]
    y = 0.299 * u[:, 0] + 0.587 * u[:, 1] + 0.114 * u[:, 2]  # (B, H, W)
    return y.flatten(1).std(1)  # (B,)


class CLIPReward:
    """CLIP score (Hessel et al. 2021, Eq. 1 without the clip at 0): 100 cos(E_img(x), E_text(prompt)); with
    `head` the LAION aesthetic score instead, an MLP on CLIP ViT-L/14's normalised image embedding
    (christophschuhmann/improved-aesthetic-predictor, as in DDPO and AlignProp). Weights from --clip_path
    (a hub id or a local folder) and --aesthetic_path (the predictor's .pth), loaded on first use."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's pixel stats

    def __init__(self, clip_path, device, head_path=""):
        from transformers import CLIPModel, CLIPTokenizer

        try:
            self.model = CLIPModel.from_pretrained(clip_path).to(device).eval().requires_grad_(False)
            self.tok = CLIPTokenizer.from_pretrained(clip_path)
        except Exception as e:
            raise UserError(f"could not load CLIP from --clip_path={clip_path} ({type(e).__name__}); offline? "
                            f"download openai/clip-vit-large-patch14 and pass --clip_path=DIR") from None
        self.head = None
        if head_path:
            if not os.path.isfile(head_path):
                raise UserError(f"--aesthetic_path={head_path}: no such file (sac+logos+ava1-l14-linearMSE.pth)")
            dim = self.model.config.projection_dim  # 768 for ViT-L/14
            self.head = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                      nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
            state = torch_load_trusted(head_path)  # weights_only: a pickled object is refused, not run
            self.head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
            self.head.to(device).eval().requires_grad_(False)

    def image_embedding(self, x):
        """Unit CLIP image embeddings (B, D) of images in [-1, 1]: resized and normalised as CLIP expects,
        differentiably (a bicubic resize of the whole square image in place of the processor's PIL one)."""
        size = self.model.config.vision_config.image_size
        u = F.interpolate((x + 1) / 2, size=(size, size), mode="bicubic", antialias=True)  # (B, 3, 224, 224)
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (self.MEAN, self.STD))
        pooled = self.model.vision_model(pixel_values=(u - mean) / std).pooler_output  # (B, hidden)
        return F.normalize(self.model.visual_projection(pooled), dim=-1)  # (B, D)

    def __call__(self, x, prompts):
        img = self.image_embedding(x)  # (B, D)
        if self.head is not None:
            return self.head(img).squeeze(1)  # (B,) aesthetic score, about 1..10
        ids = self.tok(list(prompts), padding="max_length", truncation=True, return_tensors="pt").input_ids
        txt = self.model.text_projection(self.model.text_model(input_ids=ids.to(x.device)).pooler_output)  # (B, D)
        return 100 * (img * F.normalize(txt, dim=-1)).sum(-1)  # (B,)


def _no_arg(name):
    def parse(arg):
        if arg is not None:
            raise UserError(f"the {name} reward takes no argument, got {name}:{arg}")
    return parse


def _statistic(f):
    return lambda arg, ctx: (lambda x, prompts: f(x))


def _clip(arg, ctx):
    return CLIPReward(ctx["clip_path"], ctx["device"])


def _aesthetic(arg, ctx):
    if not ctx["aesthetic_path"]:
        raise UserError("--reward=aesthetic needs the LAION predictor's weights: --aesthetic_path=FILE.pth")
    return CLIPReward(ctx["clip_path"], ctx["device"], ctx["aesthetic_path"])


# name -> (parse the text after ':', build r(x, prompts) from it and the context), as rewards.REGISTRY
REGISTRY = {"brightness": (_no_arg("brightness"), _statistic(brightness)),
            "saturation": (_no_arg("saturation"), _statistic(saturation)),
            "contrast": (_no_arg("contrast"), _statistic(contrast)),
            "clip": (_no_arg("clip"), _clip),
            "aesthetic": (_no_arg("aesthetic"), _aesthetic)}


def build_reward(spec, device, clip_path="", aesthetic_path=""):
    """A reward spec, e.g. 'saturation' or '0.5*aesthetic+0.5*clip', -> r(x, prompts) -> (B,)."""
    ctx = dict(device=device, clip_path=clip_path, aesthetic_path=aesthetic_path)
    parts = [(w, REGISTRY[name][1](arg, ctx)) for w, name, arg in parse_reward_spec(spec, REGISTRY)]
    return lambda x, prompts: sum(w * r(x, prompts) for w, r in parts)  # (B,)
