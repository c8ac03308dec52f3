"""The three CIFAR-10 classifier networks: the reward classifier (ResNet-9), the held-out evaluator (VGG)
and the judge (an all-convolutional net with Weight Standardization and GroupNorm).

Different architectures on purpose (*choice*): adversarial patterns transfer most easily between
models that share an architecture and an initialisation, so the evaluator is a plain VGG-style net,
and the judge, which measures the comparison's quality and target-rate axis, leaves the BatchNorm
family altogether: GroupNorm, a 5x5 stem, strided convolutions instead of pooling.
All take images in [-1, 1] and normalise them themselves. Trained by train_classifier.py.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from sftlib.common import UserError, atomic_path, load_checkpoint
from sftlib.fid import frechet_distance, gaussian_stats

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


class PooledNet(nn.Module):
    """What the evaluator and the judge share: Normalize, a conv `body`, global average pooling to the
    (B, 8w) features, a linear `fc` head. Subclasses build self.norm, self.body and self.fc."""

    def features(self, x):
        return self.body(self.norm(x)).mean(dim=(2, 3))  # (B, 8w), the penultimate layer

    def head(self, f):
        return self.fc(f)  # (B, 10)

    def forward(self, x):
        return self.head(self.features(x))  # (B, 10)


class VGG(PooledNet):
    """The held-out evaluator: a plain VGG-style stack (Simonyan & Zisserman 2015) of 3x3 convs, no
    skip connections, global *average* pooling; its pooled (B, 8w) vector is the feature space of the
    Fréchet distance in sftlib/metrics.py."""

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


class WSConv2d(nn.Conv2d):
    """A convolution with Weight Standardization (Qiao et al. 2019, Eq. 5): each filter is used with zero
    mean and unit variance over its inputs. With GroupNorm it trains about as fast as BatchNorm: after 400
    steps this net reached 42 % test accuracy without it, 60 % with it, 62 % with BatchNorm instead
    (checkpoints/README.md, judge card)."""

    def forward(self, x):
        w = self.weight  # (c_out, c_in, k, k)
        mu = w.mean(dim=(1, 2, 3), keepdim=True)  # (c_out, 1, 1, 1)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)  # (c_out, 1, 1, 1)
        return F.conv2d(x, (w - mu) / (var + 1e-5).sqrt(), self.bias, self.stride, self.padding)


def conv_gn(c_in, c_out, k=3, stride=1):
    """Weight-standardized conv, GroupNorm (Wu & He 2018; statistics per image and group of 16 channels,
    so no batch statistics at all), ReLU."""
    return nn.Sequential(WSConv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False),
                         nn.GroupNorm(max(1, c_out // 16), c_out), nn.ReLU())


class AllConv(PooledNet):
    """The judge: an all-convolutional net (Springenberg et al. 2015, "Striving for Simplicity": strided
    convolutions instead of pooling) with Weight Standardization and GroupNorm, a 5x5 stem and global
    average pooling. It never serves as a reward or for tuning; its pooled (B, 8w) vector is the feature
    space of sftlib/judge.py's Fréchet distances."""

    def __init__(self, width=16, n_classes=10):
        super().__init__()
        w = width
        self.norm = Normalize()
        self.body = nn.Sequential(
            conv_gn(3, w, k=5),  # (B, w, 32, 32)
            conv_gn(w, 2 * w, stride=2), conv_gn(2 * w, 2 * w),  # (B, 2w, 16, 16)
            conv_gn(2 * w, 4 * w, stride=2), conv_gn(4 * w, 4 * w),  # (B, 4w, 8, 8)
            conv_gn(4 * w, 8 * w, stride=2),  # (B, 8w, 4, 4)
        )
        self.fc = nn.Linear(8 * w, n_classes)


ARCHS = {"resnet9": ResNet9, "vgg": VGG, "allconv": AllConv}


def build_net(arch, device="cpu"):
    """arch = {"name": "resnet9" | "vgg" | "allconv", "width": int} -> an untrained nn.Module on device."""
    net = ARCHS[arch["name"]](arch["width"]).to(device)
    if torch.device(device).type != "mps":  # channels_last: ~30% faster convolutions on CPU and CUDA
        net = net.to(memory_format=torch.channels_last)
    return net


@torch.no_grad()  # evaluation only: no graph to keep
def net_outputs(net, images_uint8, device, batch_size=500):
    """uint8 images (N, 3, 32, 32) -> penultimate features (N, D) and log-probabilities (N, 10)."""
    feats, logp = [], []
    for i in range(0, len(images_uint8), batch_size):
        x = images_uint8[i:i + batch_size].to(device).float() / 127.5 - 1  # (b, 3, 32, 32) in [-1, 1]
        f = net.features(x)  # (b, D)
        feats.append(f.float().cpu())
        logp.append(torch.log_softmax(net.head(f).float(), 1).cpu())  # (b, 10)
    return torch.cat(feats).numpy(), torch.cat(logp).numpy()


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


def real_feature_stats(net, device, x_test, y_test, x_train, y_train, path):
    """A held-out network's statistics of real images (the arrays of sftlib/readers.py's REAL_STATS), written to
    `path` atomically and returned: the test split's features with their mean and covariance, and the features of
    the training images in the order given (the first n of them make a floor at any sample count n), with the
    floor of them all, their Fréchet distance to the test split. uint8 images (N, 3, 32, 32), labels (N,)."""
    import numpy as np

    f_test, _ = net_outputs(net, x_test, device)  # (N_test, D)
    f_train, _ = net_outputs(net, x_train, device)  # (N_train, D)
    mu, sigma = gaussian_stats(f_test)  # (D,), (D, D)
    stats = dict(mu_test=mu, sigma_test=sigma, feats_test=f_test.astype(np.float32), labels_test=np.asarray(y_test),
                 feats_train=f_train.astype(np.float32), labels_train=np.asarray(y_train),
                 n_test=np.array(len(f_test)), n_train=np.array(len(f_train)),
                 fd_floor=np.array(frechet_distance(*gaussian_stats(f_train), mu, sigma)))
    with atomic_path(path) as tmp:
        np.savez(tmp, **stats)
    return stats
