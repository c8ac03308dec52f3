"""Stage `classifier`: the reward classifier and the held-out evaluator, two CIFAR-10 classifiers.

- The **reward classifier** (a compact ResNet) gives the reward log p(target | x) (rewards.py).
- The **held-out evaluator** (a plain VGG-style net, another seed) is never used as a reward. It
  judges the fine-tuned samples (evaluate.py): if the reward classifier's score rises but the
  evaluator's does not, the fine-tuning hacked the reward instead of drawing more ships.

Different architectures on purpose (*choice*): adversarial patterns transfer most easily between
models that share an architecture and an initialisation.

Writes <out_dir>/classifier/ckpt.pt (kind "classifier") and <out_dir>/evaluator/ckpt.pt (kind
"evaluator") = {kind, model, opt, step, config, rng, arch, test_acc, elapsed}, a log.csv next to
each, and finally <out_dir>/evaluator/real_stats.npz (evaluate.py: the real images' features).
Both nets take images in [-1, 1] and normalise them themselves.
"""
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (UserError, bf16_autocast, load_checkpoint, open_log, rng_state, save_atomic, seed_all,
                     set_rng_state)
from data import DeviceBatches, load_cifar10

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean and std of the training images in [0, 1]
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """Images in [-1, 1] -> standardised per channel, so callers never normalise by hand."""

    def __init__(self):
        super().__init__()
        # not in the state_dict: constants, not weights
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return ((x + 1) / 2 - self.mean) / self.std  # (B, 3, H, W)


def conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.body = nn.Sequential(conv_bn(ch, ch), conv_bn(ch, ch))

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Module):
    """The reward classifier: the ResNet-9 of Page, "How to train your ResNet" (2018), at width w
    (w = 64 is the original, 94% in 24 epochs)."""

    def __init__(self, width=64, n_classes=10):
        super().__init__()
        w = width
        self.norm = Normalize()
        self.prep = conv_bn(3, w)  # (B, w, 32, 32)
        self.layer1 = nn.Sequential(conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w))  # (B, 2w, 16, 16)
        self.layer2 = nn.Sequential(conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))  # (B, 4w, 8, 8)
        self.layer3 = nn.Sequential(conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w))  # (B, 8w, 4, 4)
        self.fc = nn.Linear(8 * w, n_classes, bias=False)

    def features(self, x):
        h = self.layer3(self.layer2(self.layer1(self.prep(self.norm(x)))))  # (B, 8w, 4, 4)
        return F.adaptive_max_pool2d(h, 1).flatten(1)  # (B, 8w)

    def head(self, f):
        return self.fc(f) * 0.125  # (B, 10); Page scales the logits by 1/8

    def forward(self, x):
        return self.head(self.features(x))  # (B, 10)


class VGG(nn.Module):
    """The held-out evaluator: a plain VGG-style stack (Simonyan & Zisserman 2015) of 3x3 convs, no
    skip connections, global *average* pooling; its pooled (B, 8w) vector is the feature space of the
    Fréchet distance in evaluate.py."""

    def __init__(self, width=64, n_classes=10):
        super().__init__()
        w = width
        self.norm = Normalize()
        self.body = nn.Sequential(
            conv_bn(3, w), conv_bn(w, w), nn.MaxPool2d(2),  # (B, w, 16, 16)
            conv_bn(w, 2 * w), conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),  # (B, 2w, 8, 8)
            conv_bn(2 * w, 4 * w), conv_bn(4 * w, 4 * w), nn.MaxPool2d(2),  # (B, 4w, 4, 4)
            conv_bn(4 * w, 8 * w),  # (B, 8w, 4, 4)
        )
        self.fc = nn.Linear(8 * w, n_classes)

    def features(self, x):
        return self.body(self.norm(x)).mean(dim=(2, 3))  # (B, 8w), the penultimate layer

    def head(self, f):
        return self.fc(f)  # (B, 10)

    def forward(self, x):
        return self.head(self.features(x))  # (B, 10)


ARCHS = {"resnet9": ResNet9, "vgg": VGG}
# kind -> (architecture, config key of its width, of its steps, seed offset): a different seed too
NETS = {"classifier": ("resnet9", "classifier_width", "classifier_steps", 0),
        "evaluator": ("vgg", "evaluator_width", "evaluator_steps", 1)}


def build_net(arch, device="cpu"):
    """arch = {"name": "resnet9" | "vgg", "width": int} -> an untrained nn.Module on device."""
    net = ARCHS[arch["name"]](arch["width"]).to(device)
    if torch.device(device).type != "mps":  # channels_last: ~30% faster convolutions on CPU and CUDA
        net = net.to(memory_format=torch.channels_last)
    return net


def load_classifier(path, device, kind="classifier"):
    """A trained classifier from its checkpoint: frozen (requires_grad False) and in eval mode."""
    ckpt = load_checkpoint(path, kind)
    if ckpt.get("test_acc") is None:
        raise UserError(f"{path} is unfinished (step {ckpt['step']}): finish it with "
                        f"python train_toy.py --stages=classifier --resume")
    net = build_net(ckpt["arch"], device)
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UserError(f"{path}: weights do not match the {ckpt['arch']} it describes") from None
    return net.eval().requires_grad_(False)


def random_crop(x, pad=4):
    """Random translation by up to `pad` pixels per image (reflect padding), done on x's device."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, C, H + 2p, W + 2p)
    rows = torch.randint(0, 2 * pad + 1, (B, 1), device=x.device) + torch.arange(H, device=x.device)  # (B, H)
    cols = torch.randint(0, 2 * pad + 1, (B, 1), device=x.device) + torch.arange(W, device=x.device)  # (B, W)
    b = torch.arange(B, device=x.device)[:, None, None, None]  # (B, 1, 1, 1)
    c = torch.arange(C, device=x.device)[None, :, None, None]  # (1, C, 1, 1)
    return xp[b, c, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


@torch.no_grad()  # evaluation only: no graph to keep
def accuracy(net, x_uint8, y, device, batch_size=500):
    """Top-1 accuracy of net (in eval mode) on uint8 images (N, 3, 32, 32) with labels (N,)."""
    net.eval()
    correct = 0
    for i in range(0, len(x_uint8), batch_size):
        x = x_uint8[i:i + batch_size].to(device).float() / 127.5 - 1  # (b, 3, 32, 32) in [-1, 1]
        correct += (net(x).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    return correct / len(x_uint8)


def lr_at(step, steps, peak):
    """One-cycle schedule (Smith & Topin 2019, as in Page 2018): linear 0 -> peak over the first
    20% of the steps, then linear down to 0."""
    warm = max(1, int(0.2 * steps))
    return peak * (step + 1) / warm if step < warm else peak * (steps - step) / max(1, steps - warm)


def train_net(kind, cfg, device):
    """Train one of the two nets (kind = "classifier" | "evaluator") to <out_dir>/<kind>/ckpt.pt."""
    arch_name, width_key, steps_key, seed_offset = NETS[kind]
    out = os.path.join(cfg["out_dir"], kind)
    ckpt_path = os.path.join(out, "ckpt.pt")
    arch = {"name": arch_name, "width": cfg[width_key]}
    steps = cfg[steps_key]
    step, elapsed, ckpt = 0, 0.0, None
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, kind)
        if ckpt["test_acc"] is not None and ckpt["step"] >= steps:
            print(f"[{kind}] {ckpt_path} is complete ({ckpt['step']} steps, test accuracy "
                  f"{ckpt['test_acc']:.2%}): skipping")
            return ckpt_path
        if not cfg["resume"]:
            raise UserError(f"{ckpt_path} holds an unfinished run (step {ckpt['step']}): "
                            f"pass --resume to continue it, or choose another --out_dir")
        if ckpt["arch"] != arch:
            raise UserError(f"cannot resume {ckpt_path}: it is a {ckpt['arch']}, the config asks for {arch}")
        step, elapsed = ckpt["step"], ckpt["elapsed"]
        print(f"[{kind}] resuming {ckpt_path} from step {step}")
    elif kind == "evaluator" and os.path.exists(os.path.join(out, "real_stats.npz")):
        os.remove(os.path.join(out, "real_stats.npz"))  # features of an old evaluator: stale

    seed_all(cfg["seed"] + seed_offset)  # the evaluator's init and batches differ from the classifier's
    net = build_net(arch, device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg["cls_lr"], momentum=0.9, nesterov=True,
                          weight_decay=cfg["cls_weight_decay"])
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        set_rng_state(ckpt["rng"])
    cache = os.path.join(cfg["out_dir"], "cache")
    x, y = load_cifar10(cfg["data_root"], "train", cfg["n_train"], cache)
    data = DeviceBatches(x, y, device)  # batches with random flips, cut on the device
    B = cfg["cls_batch_size"]
    print(f"[{kind}] {arch_name} width {arch['width']}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M "
          f"parameters, {len(data)} training images, {steps} steps of batch {B} on {device}")
    autocast = bf16_autocast(cfg, device)
    log, _ = open_log(out, "step,loss,train_acc,img_per_s", fresh=step == 0)

    def save(test_acc=None):
        save_atomic(dict(kind=kind, model=net.state_dict(), opt=opt.state_dict(), step=step, config=dict(cfg),
                         rng=rng_state(), arch=arch, test_acc=test_acc, elapsed=elapsed), ckpt_path)

    net.train()
    bar = tqdm(file=sys.stdout, total=steps, initial=step, desc=kind, dynamic_ncols=True, mininterval=1.0)
    t_last, loss_sum, correct, n_seen = time.time(), 0.0, 0, 0
    while step < steps:
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg["cls_lr"])
        x0, labels = data.sample(B)  # (B, 3, 32, 32) in [-1, 1], flipped at random
        x0 = random_crop(x0)  # (B, 3, 32, 32), shifted by up to 4 pixels
        with autocast:
            logits = net(x0)  # (B, 10)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg["cls_label_smoothing"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_sum += loss.item()
        correct += (logits.argmax(1) == labels).sum().item()
        n_seen += B
        elapsed += time.time() - t0
        bar.update(1)
        if step % cfg["log_every"] == 0 or step == steps:
            ips = n_seen / (time.time() - t_last)
            n_batches = n_seen // B
            bar.set_postfix(loss=f"{loss_sum / n_batches:.3f}", acc=f"{correct / n_seen:.1%}", img_s=f"{ips:.0f}")
            log.write(f"{step},{loss_sum / n_batches:.4f},{correct / n_seen:.4f},{ips:.1f}\n")
            log.flush()
            t_last, loss_sum, correct, n_seen = time.time(), 0.0, 0, 0
        if step % cfg["cls_ckpt_every"] == 0 and step < steps:
            save()
    bar.close()
    log.close()
    x_test, y_test = load_cifar10(cfg["data_root"], "test", cfg["n_test"], cache)
    test_acc = accuracy(net, x_test, y_test, device)
    save(test_acc)  # a test accuracy in the checkpoint marks it complete
    print(f"[{kind}] done: {step} steps in {elapsed / 60:.1f} min; test accuracy {test_acc:.2%} "
          f"on {len(x_test)} real test images; checkpoint {ckpt_path}")
    return ckpt_path


def train(cfg, device):
    """The `classifier` stage: reward classifier, held-out evaluator, then the real-feature statistics."""
    import evaluate

    for kind in NETS:
        train_net(kind, cfg, device)
    stats = evaluate.real_stats(cfg["out_dir"], device)
    print(f"[evaluator] real floor: {evaluate.FD_NAME} between {stats['n_train']} train and "
          f"{stats['n_test']} test images = {stats['fd_floor']:.4g}")
