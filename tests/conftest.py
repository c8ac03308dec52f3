"""Shared fixtures. Real CIFAR-10 comes from $SHORTFT_CIFAR (ImageFolder layout), by default the
shared copy next to the checkout (../shared/data/cifar10). Without one, the tests that need it are
skipped with the reason, except under CI (CI=true), where a missing copy is a failure."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR = os.environ.get("SHORTFT_CIFAR", os.path.join(ROOT, "..", "shared", "data", "cifar10"))
sys.path.insert(0, ROOT)

# the tiny DDPM the integration tests train on real data (0.7M parameters, a few hundred steps)
TINY = ["--ch=16", "--ch_mult=1,2,4", "--num_res_blocks=1", "--attn_res=8", "--ddpm_batch=32",
        "--n_train=1000", "--log_every=20", "--sample_every=1000", "--preset=cpu", "--device=cpu"]


def run_cli(*args, check=True, timeout=1500):
    """Run `python train_toy.py ARGS` in a subprocess; returns the CompletedProcess."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_toy.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train_toy.py {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster than several fighting over shared cores (a module asks for it with
    pytestmark = pytest.mark.usefixtures("one_thread"))."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cifar_root():
    if not os.path.isdir(os.path.join(CIFAR, "train")):
        why = f"real CIFAR-10 not found at {CIFAR}: set SHORTFT_CIFAR to a folder with train/<class>/ and test/<class>/"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)  # CI must run every test
        pytest.skip(why)
    return CIFAR


@pytest.fixture(scope="session")
def tiny_ddpm(tmp_path_factory, cifar_root):
    """A tiny DDPM trained for 200 steps on 1000 real CIFAR-10 images; returns its out_dir."""
    out = tmp_path_factory.mktemp("tiny_ddpm")
    run_cli(f"--out_dir={out}", f"--data_root={cifar_root}", "--ddpm_steps=200", "--ddpm_ckpt_every=100", "--stages=ddpm",
            *TINY)
    return str(out)
