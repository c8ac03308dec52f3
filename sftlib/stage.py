"""What every training stage shares around its loop: resume-or-skip, atomic checkpoints on a cadence,
a progress bar and a CSV log. The loop itself stays written out in the stage's own train_<stage>.py:

    stage = Stage(cfg, "ddpm", kind="ddpm", steps=cfg["ddpm_steps"], columns=("loss",))
    ckpt = stage.resume_or_skip(complete=lambda c: c["step"] >= cfg["ddpm_steps"])
    if stage.skipped:
        return stage.ckpt_path
    ...                                   # build the model, load ckpt's weights when resuming
    stage.start(step)                     # the bar and <out_dir>/<stage>/log.csv
    while step < steps:
        ...                               # one training step
        stage.tick(step, batch_size, "ddpm_lr", cfg["log_every"], loss=loss.item())  # log.csv: running means
        if stage.due(step, every):
            stage.save(step=step, model=...)
    stage.close()
"""
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from sftlib import config
from sftlib.common import UserError, load_checkpoint, open_log, pick_device, rng_state, run_main, save_atomic


class Stage:
    """One stage's bookkeeping: <out_dir>/<name>/ckpt.pt of checkpoint kind `kind`, `steps` steps,
    log.csv with the columns step, *columns, img_per_s (no log when columns is None)."""

    def __init__(self, cfg, name, kind, steps, columns=None):
        self.cfg, self.name, self.kind, self.steps, self.columns = cfg, name, kind, steps, columns
        self.out = os.path.join(cfg["out_dir"], name)
        self.ckpt_path = os.path.join(self.out, "ckpt.pt")
        self.skipped = False
        self.bar = self.log = None

    def say(self, msg):
        """A line of the stage's own, printed above the progress bar when there is one."""
        (self.bar.write if self.bar is not None else print)(f"[{self.name}] {msg}")

    def resume_or_skip(self, complete):
        """The checkpoint to resume, or None for a fresh run. A checkpoint for which complete(ckpt) holds
        sets self.skipped; an unfinished one is resumed only with --resume, else it is an error (a run
        is never silently overwritten)."""
        if not os.path.exists(self.ckpt_path):
            return None
        ckpt = load_checkpoint(self.ckpt_path, self.kind)
        if complete(ckpt):
            self.say(f"{self.ckpt_path} is complete ({ckpt['step']} steps): skipping the stage")
            self.skipped = True
        elif not self.cfg["resume"]:
            raise UserError(f"{self.ckpt_path} holds an unfinished run (step {ckpt['step']}): "
                            f"pass --resume to continue it, or choose another --out_dir")
        else:
            self.say(f"resuming {self.ckpt_path} from step {ckpt['step']}")
        return ckpt

    def start(self, step, total=None):
        """Open the progress bar (at `step` of `total`, default self.steps; None: no end known) and
        log.csv (anew for a fresh run, else appended to). Returns whether the log was started anew."""
        fresh = False
        if self.columns is not None:
            self.log, fresh = open_log(self.out, ",".join(("step", *self.columns, "img_per_s")), fresh=step == 0)
        self.bar = tqdm(file=sys.stdout, total=self.steps if total is None else total, initial=step,
                        desc=self.name, dynamic_ncols=True, mininterval=1.0)
        self._reset()
        return fresh

    def _reset(self):
        self._t, self._n, self._images, self._sums = time.time(), 0, 0, {}

    def tick(self, step, n_images, lr_key, log_every, **values):
        """Training step `step` done on n_images: a NaN or infinite loss stops the run (check_finite);
        advance the bar, add `values` to the running means, and every log_every steps (None: never) write
        them to log.csv."""
        if "loss" in values:
            self.check_finite(values["loss"], step, lr_key)
        self._add(n_images, **values)
        if self.log is not None and log_every and self.due(step, log_every):
            self.write_log(step)

    def _add(self, n_images, **values):
        self.bar.update(1)
        self._n, self._images = self._n + 1, self._images + n_images
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v

    def check_finite(self, loss, step, lr_key):
        """A NaN or infinite loss stops the run with one line; the last good checkpoint stays as it is."""
        if not math.isfinite(loss):
            raise UserError(f"[{self.name}] loss became {loss} at step {step}; the last good checkpoint "
                            f"is kept at {self.ckpt_path}: lower --{lr_key} and --resume")

    def due(self, step, every):
        """Whether a cadence of `every` steps falls on `step` (the last step always counts)."""
        return step % every == 0 or step == self.steps

    def write_log(self, step):
        """A row of log.csv and the bar's numbers: the running means since the last row, and img/s."""
        means = {k: v / max(1, self._n) for k, v in self._sums.items()}
        ips = self._images / max(1e-9, time.time() - self._t)
        self.bar.set_postfix(**{k: f"{v:.4g}" for k, v in means.items()}, img_s=f"{ips:.0f}")
        self.log.write(",".join([str(step), *(f"{means.get(c, float('nan')):.6g}" for c in self.columns),
                                 f"{ips:.1f}"]) + "\n")
        self.log.flush()
        self._reset()

    def save(self, **state):
        """The checkpoint, atomically: the given state plus kind, the resolved config and the RNG states."""
        save_atomic(dict(kind=self.kind, config=dict(self.cfg), rng=rng_state(), **state), self.ckpt_path)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()
        self.bar = self.log = None


def run_alone(train, doc):
    """`python train_<stage>.py --key=value ...`: one stage alone, with the pipeline's config and CLI
    (the same as `python train_toy.py --stages=<stage> --key=value ...`)."""
    def main(argv):
        cfg = config.resolve(argv, torch.cuda.is_available(), description=doc)
        train(cfg, pick_device(cfg["device"]))

    run_main(main)
