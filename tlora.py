"""T-LoRA: LoRA (Hu et al. 2022) for the UNet's conv and linear layers, with timestep-aware stacking
(PAPER.md Sec. 3).

A wrapped layer computes  W x + sum_{j < active} (alpha / r) B_j A_j x  (Hu et al. 2022, Eq. 3),
with the frozen base weight W and k low-rank pairs (A_j, B_j), B_j zero-initialised so training
starts from the base model exactly. `active` is how many of the k LoRAs are on: ShortFT's
timestep-aware LoRA (T-LoRA, PAPER.md Sec. 3) stacks LoRA i on LoRA i-1, so at a timestep of
segment i the first i LoRAs are on. With k = 1 it is plain LoRA.
"""
import copy

import torch
import torch.nn as nn


class LoRALayer(nn.Module):
    """A frozen nn.Conv2d or nn.Linear plus k stacked low-rank updates."""

    def __init__(self, base, rank, alpha, k):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.active = k
        if isinstance(base, nn.Conv2d):  # A: a conv of the base's kernel into r channels; B: 1x1 conv back
            self.A = nn.ModuleList(nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride,
                                             base.padding, bias=False) for _ in range(k))
            self.B = nn.ModuleList(nn.Conv2d(rank, base.out_channels, 1, bias=False) for _ in range(k))
        else:
            self.A = nn.ModuleList(nn.Linear(base.in_features, rank, bias=False) for _ in range(k))
            self.B = nn.ModuleList(nn.Linear(rank, base.out_features, bias=False) for _ in range(k))
        for B in self.B:
            nn.init.zeros_(B.weight)  # delta W = 0 at the start: the fine-tuned model begins as the base

    def forward(self, x):
        out = self.base(x)
        for A, B in list(zip(self.A, self.B))[: self.active]:
            out = out + self.scale * B(A(x))
        return out

    def delta(self, n):
        """sum_{j < n} (alpha / r) B_j A_j as a weight of the base layer's shape."""
        d = torch.zeros_like(self.base.weight)
        for A, B in list(zip(self.A, self.B))[:n]:
            if isinstance(self.base, nn.Conv2d):  # (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)
                d = d + self.scale * torch.einsum("or,rikl->oikl", B.weight[:, :, 0, 0], A.weight)
            else:  # (out, r) @ (r, in) -> (out, in)
                d = d + self.scale * B.weight @ A.weight
        return d


def add_lora(model, rank, alpha, k, targets=""):
    """Replace every Conv2d/Linear whose name contains one of the comma-separated `targets`
    (all of them when empty) by a LoRALayer; freeze everything else. Returns the LoRA names."""
    if rank < 1:
        raise ValueError(f"--lora_rank must be at least 1 (or use --full_ft), got {rank}")
    wanted = [t for t in targets.split(",") if t]
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
             and (not wanted or any(w in n for w in wanted))]
    if not names:
        raise ValueError(f"--lora_targets={targets!r} matches no conv or linear layer of the UNet")
    model.requires_grad_(False)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, leaf, LoRALayer(getattr(holder, leaf), rank, alpha, k))
    return names


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALayer)]


def set_active(model, n):
    """Switch on the first n LoRAs of every LoRA layer (T-LoRA: n = the segment index, 1-based)."""
    for m in lora_layers(model):
        m.active = n


def lora_params(model, j):
    """The parameters of LoRA j (0-based) across all layers."""
    return [p for m in lora_layers(model) for p in (*m.A[j].parameters(), *m.B[j].parameters())]


def lora_state(model):
    """Only the LoRA weights: what `save` writes on its own (a few % of the UNet)."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if ".A." in n or ".B." in n}


@torch.no_grad()  # merging is weight surgery, not part of any graph
def merged(model, n):
    """A plain UNet (no LoRA layers) whose weights are W + the first n LoRAs: for fast sampling."""
    plain = copy.deepcopy(model)
    for name, m in list(plain.named_modules()):
        if isinstance(m, LoRALayer):
            base = copy.deepcopy(m.base)
            base.weight += m.delta(n)
            parent, _, leaf = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, leaf, base)
    return plain

