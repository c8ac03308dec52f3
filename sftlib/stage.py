"""What every training stage shares around its loop: resume-or-skip, atomic checkpoints on a cadence,
a progress bar and a CSV log. The loop itself stays written out in the stage's own train_<stage>.py:

    stage = Stage(cfg, "ddpm", kind="ddpm", steps="ddpm_steps", columns=("loss",))
    ckpt = stage.resume_or_skip(complete=lambda c: c["step"] >= cfg["ddpm_steps"])  # cfg: the checkpoint's now
    if stage.skipped:
        return stage.ckpt_path
    ...                                   # build the model, load ckpt's weights when resuming
    stage.start(step)                     # the bar and <out_dir>/<stage>/log.csv
    while step < steps:
        ...                               # one training step
        stage.tick(step, batch_size, "ddpm_lr", cfg["log_every"], loss=loss)  # log.csv: running means
        if stage.due(step, every):
            stage.save(step=step, model=...)
    stage.close()
"""
import fcntl
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from sftlib import config
from sftlib.common import (CKPT_KEYS, UserError, load_checkpoint, open_log, pick_device, remove_stale_temps, rng_state,
                           run_main, save_atomic, seed_all)
from sftlib.readers import first_nonfinite, read_csv

# What --resume means: the run goes on with the config stored in its checkpoint. A key typed on the
# command line that differs from it is an error, except these, which may change on resume: the
# budgets, the learning rates (to go on after a NaN with a lower one) and the run's plumbing.
RESUME_MAY_CHANGE = ("ddpm_steps", "shortcut_steps", "classifier_steps", "evaluator_steps", "judge_steps", "ft_steps",
                     "ddpm_lr", "shortcut_lr", "cls_lr", "ft_lr", "log_every", "sample_every", "ddpm_ckpt_every",
                     "shortcut_ckpt_every", "cls_ckpt_every", "ft_ckpt_every", "bf16", "compile",
                     "resume", "device", "stages", "preset", "out_dir", "data_root", "grid_ddpm", "grid_shortcut",
                     "grid_ft", "sample_batch", "fid_n", "fid_ref_n", "pretrained", "ddpm_seconds", "shortcut_seconds",
                     "channels_last")
# the keys that decide a stage's networks: typed differently from a complete stage's, they are an error, not ignored
UNET_SHAPE = ("T", "beta_1", "beta_T", "ch", "ch_mult", "num_res_blocks", "attn_res", "dropout", "eps_skip")
SHAPE_KEYS = {"ddpm": UNET_SHAPE, "shortcut": UNET_SHAPE + ("k_segments",), "shortft": UNET_SHAPE + ("lora_rank",),
              "classifier": ("classifier_width",), "evaluator": ("evaluator_width",), "judge": ("judge_width",)}
# keys added after checkpoints were written without them: such a checkpoint ran with these values
LEGACY = dict(eps_skip=False, ddpm_min_snr=0.0, ddpm_lr_schedule="constant", ft_clip_grad="hard", ptrain_t1_phase=True,
              ddpm_seconds=0.0, shortcut_seconds=0.0)
RENAMED = dict(ptrain_t1_stage="ptrain_t1_phase")  # old key -> its name now (P-Training's steps are phases)
# ... and these always come from the current command, never from the checkpoint: a copied or moved
# run reads and writes where it is now
RESUME_FROM_COMMAND = ("out_dir", "data_root", "device", "resume", "stages")
# what a checkpoint must hold to be resumed, beyond what loading its model needs (common.CKPT_KEYS)
RESUME_KEYS = {"ddpm": ("opt", "step", "rng", "elapsed"), "shortcut": ("opt", "step", "rng", "elapsed", "target"),
               "classifier": ("opt", "step", "rng", "elapsed", "test_acc"),
               "evaluator": ("opt", "step", "rng", "elapsed", "test_acc"),
               "judge": ("opt", "step", "rng", "elapsed", "test_acc"),
               "shortft": ("opt", "step", "rng", "done", "train_s", "before", "history")}
_LOCKS = {}  # (device, inode) of a lock file -> this process's open lock file (held until the process ends)


def lock_folder(folder):
    """An exclusive lock on <folder>/lock (flock: released by the OS when the process ends, even by
    kill -9), so a second run on the same stage folder stops with one line instead of mixing files."""
    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, "lock"), "a")
    key = (os.fstat(f.fileno()).st_dev, os.fstat(f.fileno()).st_ino)  # the file, even if its folder moved
    if key in _LOCKS:  # this process holds it already
        f.close()
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"another run is using {folder} (it holds {folder}/lock): wait for it to end, "
                        f"or choose another --out_dir") from None
    _LOCKS[key] = f


def budget_text(steps, seconds):
    """What budget_spent stops at, in words for a stage's first line."""
    return f"{steps} steps" + (f" or {seconds:.0f} s of training, whichever ends first," if seconds > 0 else "")


def budget_spent(step, elapsed, steps, seconds):
    """A stage's budget: `steps` optimizer steps, or, with seconds > 0, also `seconds` of training time,
    whichever ends first (the GPU preset trains its DDPM and shortcut for a time, at whatever rate the card gives)."""
    return step >= steps or (seconds > 0 and elapsed >= seconds)


class Stage:
    """One stage's bookkeeping: <out_dir>/<name>/ckpt.pt of checkpoint kind `kind`, `steps` steps,
    log.csv with the columns step, *columns, img_per_s (no log when columns is None)."""

    def __init__(self, cfg, name, kind, steps, columns=None):
        """steps: the config key of the stage's budget (read after resume_or_skip), or a number."""
        self.cfg, self.name, self.kind, self._steps, self.columns = cfg, name, kind, steps, columns
        self.out = os.path.join(cfg["out_dir"], name)
        self.ckpt_path = os.path.join(self.out, "ckpt.pt")
        self.skipped = False
        self.bar = self.log = None
        self.lr_key = "lr"

    @property
    def steps(self):
        return self.cfg[self._steps] if isinstance(self._steps, str) else self._steps

    def say(self, msg):
        """A line of the stage's own, printed above the progress bar when there is one."""
        (self.bar.write if self.bar is not None else print)(f"[{self.name}] {msg}")

    def resume_or_skip(self, complete, export=None):
        """The checkpoint to resume, or None for a fresh run. A checkpoint for which complete(ckpt) holds
        sets self.skipped; an unfinished one is resumed only with --resume, else it is an error (a run
        is never silently overwritten). export: the file a stage writes last to mark itself complete; a
        stage that trains (again: a larger budget) removes it first, so a stopped run is never taken for a
        complete one by the stages built on it (upstream)."""
        ckpt = self._resume_or_skip(complete)
        log = os.path.join(self.out, "log.csv")
        if ckpt is not None and not self.skipped and self.columns is not None and os.path.isfile(log):
            if os.path.getsize(log) == 0:  # killed before its header reached the disk: started anew
                os.remove(log)
            else:  # torn or foreign: one line, before anything changes
                read_csv(log, ("step", *self.columns, "img_per_s"), "log")
        if export is not None and not self.skipped and os.path.exists(export):
            os.remove(export)
        return ckpt

    def _resume_or_skip(self, complete):
        if os.path.isdir(self.out):
            lock_folder(self.out)
        if not os.path.exists(self.ckpt_path):
            return None
        # what loading needs; what resuming needs on top is checked below, only when resuming (a complete
        # stage, e.g. an installed --pretrained one, carries no optimiser state)
        ckpt = load_checkpoint(self.ckpt_path, self.kind, CKPT_KEYS.get(self.kind, ("config",)) + ("step",))
        conflicts, changed = self.adopt(ckpt["config"])  # from here on, self.cfg is the checkpoint's config
        shape = [(k, typed) for k, typed in conflicts if k in SHAPE_KEYS.get(self.kind, ())]
        if complete(ckpt) and shape:  # a typed shape that the complete stage would silently not have
            k, typed = shape[0]
            raise UserError(f"{self.ckpt_path} is complete with {k}={ckpt['config'][k]!r}, but the command line says "
                            f"--{k}={typed!r}, which it would ignore: drop --{k} or choose another --out_dir")
        if complete(ckpt):
            self.say(f"{self.ckpt_path} is complete ({ckpt['step']} steps): skipping the stage")
            self.skipped = True
        elif not self.cfg["resume"]:
            raise UserError(f"{self.ckpt_path} holds an unfinished run (step {ckpt['step']}): "
                            f"pass --resume to continue it, or choose another --out_dir")
        elif conflicts:
            k, typed = conflicts[0]
            raise UserError(f"--resume goes on with the config of {self.ckpt_path}, where {k}={ckpt['config'][k]!r}, "
                            f"but the command line says --{k}={typed!r}: drop --" + " --".join(k for k, _ in conflicts)
                            + " (on resume only the budgets, learning rates and cadences may change) "
                            "or start a new run in another --out_dir")
        elif any(k not in ckpt for k in RESUME_KEYS.get(self.kind, ())):
            raise UserError(f"{self.ckpt_path} cannot be resumed: it lacks "
                            + ", ".join(k for k in RESUME_KEYS.get(self.kind, ()) if k not in ckpt))
        else:
            self.say(f"resuming {self.ckpt_path} from step {ckpt['step']} with its config"
                     + "".join(f"; {k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
            self.say("config: " + " ".join(f"{k}={v}" for k, v in self.cfg.items()))
        return ckpt

    def adopt(self, saved):
        """Take the checkpoint's config `saved` into self.cfg, except the keys that come from the command
        (RESUME_FROM_COMMAND) and the typed keys that may change (RESUME_MAY_CHANGE). Returns the typed
        keys that differ from `saved` and may not change [(key, typed value)], and {key: (saved, now)} of those
        that do change. A config without `given` (built in code) counts every key as typed."""
        given = getattr(self.cfg, "given", None)
        given = set(self.cfg) if given is None else given
        conflicts, changed = [], {}
        saved = {RENAMED.get(k, k): v for k, v in saved.items()}
        saved = {**{k: v for k, v in LEGACY.items() if k in self.cfg}, **saved}  # an older checkpoint's missing keys
        for k, v in saved.items():
            if k not in self.cfg or v == self.cfg[k] or k in RESUME_FROM_COMMAND:
                continue
            if k in given and k in RESUME_MAY_CHANGE:
                changed[k] = (v, self.cfg[k])
            elif k in given:
                conflicts.append((k, self.cfg[k]))
                self.cfg[k] = v
            else:
                self.cfg[k] = v
        return sorted(conflicts), changed

    def start(self, step, total="steps"):
        """Open the progress bar (at `step` of `total`, default self.steps; None: no end known, e.g. a budget in
        seconds) and log.csv (anew for a fresh run, else appended to). Returns whether the log was started anew."""
        fresh = False
        lock_folder(self.out)
        remove_stale_temps(self.out)  # left by a run killed mid-write
        if self.columns is not None:  # a resumed log drops the rows after the checkpoint's step
            self.log, fresh = open_log(self.out, ",".join(("step", *self.columns, "img_per_s")), fresh=step == 0,
                                       keep_upto=step)
        self.bar = tqdm(file=sys.stdout, total=self.steps if total == "steps" else total, initial=step,
                        desc=self.name, dynamic_ncols=True, mininterval=1.0)
        self._reset()
        return fresh

    def _reset(self):
        self._t, self._n, self._images, self._sums = time.time(), 0, 0, {}

    def tick(self, step, n_images, lr_key, log_every, last=None, **values):
        """Training step `step` done on n_images: advance the bar, add `values` (numbers, or tensors on the
        device, summed there) to the running means, and every log_every steps (None: never; `last`: whether
        this is the last step, default step == steps) write them to log.csv. That row is where the values are
        read back from the device, once per log_every steps, and where a NaN or infinite loss stops the run
        (check_finite; Stage.save never writes non-finite weights in between)."""
        self.lr_key = lr_key
        self._add(n_images, **values)
        if self.log is not None and log_every and self.due(step, log_every, last):
            self.write_log(step)

    def _add(self, n_images, **values):
        self.bar.update(1)
        self._n, self._images = self._n + 1, self._images + n_images
        for k, v in values.items():
            v = v.detach() if torch.is_tensor(v) else v
            self._sums[k] = v if k not in self._sums else self._sums[k] + v

    def check_finite(self, loss, step, lr_key):
        """A NaN or infinite loss stops the run with one line; the last good checkpoint stays as it is."""
        if not math.isfinite(loss):
            raise UserError(f"[{self.name}] loss became {loss} at step {step} (or in the steps since the last log row); "
                            f"the last good checkpoint "
                            f"is kept at {self.ckpt_path}: lower --{lr_key} and --resume")

    def due(self, step, every, last=None):
        """Whether a cadence of `every` steps falls on `step` (the last step always counts; last: whether this
        step is the last, for a stage whose budget is in seconds; default step == steps)."""
        return step % every == 0 or (step == self.steps if last is None else bool(last))

    def write_log(self, step):
        """A row of log.csv and the bar's numbers: the running means since the last row, and img/s."""
        means = {k: float(v) / max(1, self._n) for k, v in self._sums.items()}  # float(): the one read per row
        if "loss" in means:
            self.check_finite(means["loss"], step, self.lr_key)
        ips = self._images / max(1e-9, time.time() - self._t)
        self.bar.set_postfix(**{k: f"{v:.4g}" for k, v in means.items()}, img_s=f"{ips:.0f}")
        self.log.write(",".join([str(step), *(f"{means.get(c, float('nan')):.6g}" for c in self.columns),
                                 f"{ips:.1f}"]) + "\n")
        self.log.flush()
        self._reset()

    def save(self, **state):
        """The checkpoint, atomically: the given state plus kind, the resolved config and the RNG states.
        Weights (or optimizer state) with a NaN or inf are not saved: the last good checkpoint stays."""
        bad = first_nonfinite(state)
        if bad is not None:
            raise UserError(f"[{self.name}] {bad} became NaN or infinite at step {state.get('step')}: not saved; the "
                            f"last good checkpoint is kept at {self.ckpt_path}: lower --{self.lr_key} and --resume")
        save_atomic(dict(kind=self.kind, config=dict(self.cfg), rng=rng_state(), **state), self.ckpt_path)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()
        self.bar = self.log = None


EXPORTED = ("ddpm", "shortcut")  # the stages whose model.safetensors, written last, marks them complete


def upstream(out_dir, name, needed_by):
    """<out_dir>/<name>/ckpt.pt of an earlier stage that `needed_by` builds on, or a one-line error: missing
    (run it first) or, for the stages in EXPORTED, unfinished (complete it first: never build on a stopped run)."""
    path, stage = os.path.join(out_dir, name, "ckpt.pt"), "classifier" if name in ("evaluator", "judge") else name
    if not os.path.isfile(path):
        raise UserError(f"{needed_by} needs {path}: run the {stage} stage first "
                        f"(python train_toy.py --stages={stage} --out_dir={out_dir})")
    if name in EXPORTED and not os.path.isfile(os.path.join(out_dir, name, "model.safetensors")):
        raise UserError(f"the {name} stage in {out_dir} is unfinished: complete it first "
                        f"(python train_toy.py --stages={name} --resume --out_dir={out_dir})")
    return path


def run_alone(train, doc):
    """`python train_<stage>.py --key=value ...`: one stage alone, with the pipeline's config and CLI
    (the same as `python train_toy.py --stages=<stage> --key=value ...`, seeded by --seed as it is)."""
    run_main(alone_main(train, doc))


def alone_main(train, doc):
    """run_alone's main(argv): resolve the config, seed every generator with --seed (a torch process
    otherwise starts from a random seed), train."""
    def main(argv):
        cfg = config.resolve(argv, torch.cuda.is_available(), description=doc)
        lock_folder(cfg["out_dir"])  # one run per output folder, whichever stages it runs
        seed_all(cfg["seed"])
        train(cfg, pick_device(cfg["device"]))

    return main
