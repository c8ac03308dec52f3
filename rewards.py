"""Differentiable rewards r(x_0) for fine-tuning the diffusion model (PAPER.md, Sec. 4, item 3).

The sign convention, stated once here and pinned by tests/test_rewards.py:
- a reward takes images x_0 in [-1, 1], shape (B, C, H, W), and returns one number per image, (B,);
- higher is better; the fine-tuning loss is loss = -reward.mean() (`reward_loss`);
- every reward is differentiable in x_0: the whole point is to backpropagate it into the sampler.

Rewards are chosen by a spec string (`--reward=...`):
    brightness                          mean intensity in [0, 1]
    brightness:0.8                      -(mean intensity - 0.8)^2: aim for a brightness level
    classifier:ship                     log p(ship | x) from the reward classifier (a network passed in)
    0.7*classifier:ship+0.3*brightness  a weighted sum of terms (the paper's headline reward is one)
"""
import math

import torch

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")  # CIFAR-10's order


class Reward:
    """A named differentiable reward: images in [-1, 1] (B, C, H, W) -> (B,), higher is better."""

    def __init__(self, name, fn):
        self.name = name
        self.fn = fn

    def __call__(self, x):
        r = self.fn(x)  # (B,)
        assert r.shape == (x.shape[0],), f"reward {self.name} returned {tuple(r.shape)}"
        return r

    def __repr__(self):
        return f"Reward({self.name})"


def reward_loss(r):
    """The fine-tuning loss of a batch of rewards (B,): loss = -mean reward (gradient descent raises r)."""
    return -r.mean()


# --- brightness --------------------------------------------------------------------------------------

def brightness(x, target=None):
    """Mean intensity of each image mapped to [0, 1]: b = mean((x + 1) / 2) over (C, H, W).

    Without a target the reward is b itself (db/dx = 1 / (2 C H W) for every pixel). With a target
    level tau in [0, 1] it is -(b - tau)^2, highest (0) when the image has exactly that brightness.
    """
    b = ((x + 1) / 2).mean(dim=(1, 2, 3))  # (B,) in [0, 1] for x in [-1, 1]
    return b if target is None else -(b - target) ** 2  # (B,)


def _parse_level(arg):
    if arg is None:
        return None
    try:
        level = float(arg)
    except ValueError:
        raise ValueError(f"brightness:{arg}: the level must be a number in [0, 1], e.g. brightness:0.8") from None
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"brightness:{arg}: the level must be in [0, 1]")
    return level


def _make_brightness(level, classifier):
    name = "brightness" if level is None else f"brightness:{level:g}"
    return Reward(name, lambda x: brightness(x, level))


# --- classifier log-probability ---------------------------------------------------------------------

def class_index(name):
    """A CIFAR-10 class name (or its index as a string) -> its index; anything else is a ValueError."""
    if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
        i = int(name)
        if 0 <= i < len(CLASSES):
            return i
    elif name in CLASSES:
        return CLASSES.index(name)
    raise ValueError(f"unknown class {name!r}: use one of {', '.join(CLASSES)}")


def _parse_class(arg):
    if arg is None:
        raise ValueError(f"the classifier reward needs a target class, e.g. classifier:ship ({', '.join(CLASSES)})")
    return class_index(arg)


class ClassifierReward:
    """r(x) = log p(target | x) = log_softmax(f(x))[target], f the frozen reward classifier.

    The classifier's weights are frozen (requires_grad False) and it runs in eval mode (BatchNorm
    uses its running statistics, so a batch of samples cannot shift them); the gradient still flows
    through it to the image, which is what fine-tuning needs.
    """

    def __init__(self, net, target):
        self.net = net.eval().requires_grad_(False)
        self.target = target

    def __call__(self, x):
        logits = self.net(x)  # (B, 10); the net normalises [-1, 1] inputs itself
        return torch.log_softmax(logits.float(), dim=1)[:, self.target]  # (B,)


def _make_classifier(target, classifier):
    if classifier is None:
        raise ValueError(f"the reward classifier:{CLASSES[target]} needs a classifier network")
    return Reward(f"classifier:{CLASSES[target]}", ClassifierReward(classifier, target))


# --- the registry and the spec parser ------------------------------------------------------------------

# name -> (parse the text after ':' to an argument, build a Reward from it); parsing checks every
# term before anything is loaded, so a typo anywhere in a spec fails fast.
REGISTRY = {
    "brightness": (_parse_level, _make_brightness),
    "classifier": (_parse_class, _make_classifier),
}


def parse_reward_spec(spec, registry=None):
    """'0.7*classifier:ship+0.3*brightness' -> [(0.7, 'classifier', 8), (0.3, 'brightness', None)].
    The one parser of reward specs: the SD path passes its own registry (sftlib/sd_rewards.py)."""
    registry = REGISTRY if registry is None else registry
    if not spec or not spec.strip():
        raise ValueError(f"empty reward spec: use one of {', '.join(registry)}, e.g. {next(iter(registry))}")
    terms = []
    for term in spec.replace(" ", "").split("+"):
        weight, star, body = term.rpartition("*")
        if star:
            try:
                w = float(weight)
                if not math.isfinite(w):
                    raise ValueError
            except ValueError:
                raise ValueError(f"reward weight {weight!r} in {spec!r} is not a number "
                                f"(write e.g. 0.7*{next(iter(registry))}+0.3*brightness)") from None
        else:
            w = 1.0
        name, colon, arg = body.partition(":")
        if name not in registry:
            raise ValueError(f"unknown reward {name!r} in {spec!r}: use one of {', '.join(registry)}")
        parse, _ = registry[name]
        terms.append((w, name, parse(arg if colon else None)))
    return terms


def needs_classifier(spec):
    """Whether a spec has a classifier term (then build_reward needs the network)."""
    return any(name == "classifier" for _, name, _ in parse_reward_spec(spec))


def build_reward(spec, classifier=None):
    """A reward spec string -> a Reward (x in [-1, 1] (B, C, H, W) -> (B,)) with a readable name.
    classifier: the frozen reward classifier (logits over CLASSES) for classifier:<class> terms;
    sftlib/models.load_reward loads the pipeline's own from its checkpoint."""
    terms = parse_reward_spec(spec)
    parts = [(w, REGISTRY[name][1](arg, classifier)) for w, name, arg in terms]
    if len(parts) == 1 and parts[0][0] == 1.0:
        return parts[0][1]
    name = "+".join(f"{w:g}*{r.name}" for w, r in parts)
    return Reward(name, lambda x: sum(w * r(x) for w, r in parts))  # (B,) the weighted sum
