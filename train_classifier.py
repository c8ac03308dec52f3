"""Stage `classifier`: train the reward classifier, the held-out evaluator and the judge, three CIFAR-10
classifiers (their networks: sftlib/nets.py).

- The **reward classifier** (ResNet-9) gives the reward log p(target | x) (rewards.py).
- The **held-out evaluator** (a plain VGG-style net, another seed) is never used as a reward. It
  judges the fine-tuned samples (sftlib/metrics.py): if the reward classifier's score rises but the
  evaluator's does not, the fine-tuning hacked the reward instead of drawing more ships.
- The **judge** (an all-convolutional net, weight-standardized convs and GroupNorm, a third seed) is never used as a reward or
  for tuning either; it measures the comparison's quality and target-rate axis (sftlib/judge.py) from
  outside the reward's family: another architecture, no BatchNorm, and other training images, the
  *second half* of every class (data.load_cifar10's half=1; --n_train then counts within it). The other
  two nets see the first --n_train images of every class: with --n_train <= 25000 the judge's images are
  disjoint from theirs; with the default n_train=0 (all 50k) they see the judge's half too.

Writes <out_dir>/<kind>/ckpt.pt for kind = classifier, evaluator, judge = {kind, model, opt, step, config,
rng, arch, test_acc, elapsed}, a log.csv next to each, and finally <out_dir>/evaluator/real_stats.npz and
<out_dir>/judge/real_stats.npz (sftlib/metrics.py, sftlib/judge.py: the real images' features). In a
folder whose classifier and evaluator are complete (a run from before the judge) only the judge trains.

    python train_classifier.py --classifier_steps=500   # this stage alone (= python train_toy.py --stages=classifier)
"""
import os
import time

import torch
import torch.nn.functional as F

from sftlib import judge, metrics
from sftlib.common import UserError, bf16_autocast, seed_all, set_rng_state
from sftlib.data import DeviceBatches, load_cifar10
from sftlib.nets import build_net
from sftlib.stage import Stage, run_alone

# kind -> (architecture, config key of its width, of its steps, seed offset, half of every class it
# trains on: None = the first --n_train images, 1 = the second half, the judge's own): a different seed too
NETS = {"classifier": ("resnet9", "classifier_width", "classifier_steps", 0, None),
        "evaluator": ("vgg", "evaluator_width", "evaluator_steps", 1, None),
        "judge": ("allconv", "judge_width", "judge_steps", 2, 1)}


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
    """Train one of the three nets (kind = "classifier" | "evaluator" | "judge") to <out_dir>/<kind>/ckpt.pt."""
    arch_name, width_key, steps_key, seed_offset, half = NETS[kind]
    stage = Stage(cfg, kind, kind=kind, steps=steps_key, columns=("loss", "train_acc"))
    ckpt = stage.resume_or_skip(complete=lambda c: c["test_acc"] is not None and c["step"] >= cfg[steps_key])
    if stage.skipped:
        return stage.ckpt_path
    arch = {"name": arch_name, "width": cfg[width_key]}  # on --resume, cfg is now the checkpoint's config
    steps = cfg[steps_key]
    step, elapsed = 0, 0.0
    if ckpt is not None:
        if ckpt["arch"] != arch:
            raise UserError(f"cannot resume {stage.ckpt_path}: it is a {ckpt['arch']}, the config asks for {arch}")
        step, elapsed = ckpt["step"], ckpt["elapsed"]
    elif kind in ("evaluator", "judge") and os.path.exists(os.path.join(stage.out, "real_stats.npz")):
        os.remove(os.path.join(stage.out, "real_stats.npz"))  # features of an old evaluator or judge: stale

    seed_all(cfg["seed"] + seed_offset)  # each net's init and batches differ from the others'
    net = build_net(arch, device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg["cls_lr"], momentum=0.9, nesterov=True,
                          weight_decay=cfg["cls_weight_decay"])
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        set_rng_state(ckpt["rng"])
    cache = os.path.join(cfg["out_dir"], "cache")
    x, y = load_cifar10(cfg["data_root"], "train", cfg["n_train"], cache, half=half)
    data = DeviceBatches(x, y, device)  # batches with random flips, cut on the device
    B = cfg["cls_batch"]
    print(f"[{kind}] {arch_name} width {arch['width']}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M "
          f"parameters, {len(data)} training images, {steps} steps of batch {B} on {device}")
    autocast = bf16_autocast(cfg, device)

    def save(test_acc=None):
        stage.save(model=net.state_dict(), opt=opt.state_dict(), step=step, arch=arch, test_acc=test_acc,
                   elapsed=elapsed)

    net.train()
    stage.start(step)
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
        elapsed += time.time() - t0
        stage.tick(step, B, "cls_lr", cfg["log_every"], loss=loss,  # on the device: read once per log row
                   train_acc=(logits.argmax(1) == labels).float().mean())
        if step % cfg["cls_ckpt_every"] == 0 and step < steps:
            save()
    stage.close()
    x_test, y_test = load_cifar10(cfg["data_root"], "test", cfg["n_test"], cache)
    test_acc = accuracy(net, x_test, y_test, device)
    save(test_acc)  # a test accuracy in the checkpoint marks it complete
    print(f"[{kind}] done: {step} steps in {elapsed / 60:.1f} min; test accuracy {test_acc:.2%} "
          f"on {len(x_test)} real test images; checkpoint {stage.ckpt_path}")
    return stage.ckpt_path


def train(cfg, device):
    """The `classifier` stage: reward classifier, held-out evaluator, judge, then the real-feature statistics."""
    for kind in NETS:
        train_net(kind, cfg.copy(), device)  # a copy each: a resumed net takes its own checkpoint's config
    stats = metrics.real_stats(cfg["out_dir"], device)
    print(f"[evaluator] real floor: {metrics.FD_NAME} between {stats['n_train']} train and "
          f"{stats['n_test']} test images = {stats['fd_floor']:.4g}")
    stats = judge.real_stats(cfg["out_dir"], device)
    print(f"[judge] real floor: Fréchet distance in the judge's features between {stats['n_train']} train "
          f"images it never saw and {stats['n_test']} test images = {stats['fd_floor']:.4g}")


if __name__ == "__main__":
    run_alone(train, __doc__)
