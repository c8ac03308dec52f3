"""The classroom checkpoints: a base DDPM, its shortcut and the three classifiers, trained by the project's
own commands (on a GPU; the judge on a CPU) and shipped in checkpoints/ as .safetensors (fp16 weights, the
run's config and facts in the metadata; checkpoints/README.md holds their cards). `python train_toy.py
--pretrained` installs them as the complete ddpm, shortcut, classifier, evaluator and judge stages of
--out_dir, so the pipeline goes straight to the ShortFT stage: minutes on a laptop CPU instead of half an
hour, on a base model trained far longer than the CPU preset can. `python train_toy.py --preset=quick` is
that run with a smaller evaluation (config.PRESETS["quick"]). The config the run prints and stores holds the shipped
models' own shape, step and training keys (install), never the CPU preset's values for stages it did not
train. `python train_toy.py sample --ckpt=checkpoints/ddpm.safetensors` draws from a shipped model
directly (load_unet)."""
import os
import shutil

from sftlib.common import UserError, atomic_path, file_sha256, save_atomic
from sftlib.readers import NUMBER, check_schema, read_safetensors
from sftlib.stage import LEGACY

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")
STAGES = ("ddpm", "shortcut", "classifier", "evaluator", "judge")  # <stage>.safetensors, each a checkpoint kind
# what the pipeline must agree on with the shipped models, each from the model that owns it: their
# shapes and their (completed) step counts
SHIPPED_KEYS = {"ddpm": ("T", "beta_1", "beta_T", "clip_x0", "ch", "ch_mult", "num_res_blocks", "attn_res", "dropout",
                         "eps_skip", "ddpm_steps"),
                "shortcut": ("k_segments", "shortcut_steps"),
                "classifier": ("classifier_width", "classifier_steps"),
                "evaluator": ("evaluator_width", "evaluator_steps"), "judge": ("judge_width", "judge_steps")}
# how each shipped model was trained (its stage's keys, by prefix): the run takes these from the model too,
# so its printed and stored config never shows the CPU preset's values for stages it did not train
TRAINING_KEYS = {"ddpm": ("ddpm_", "sample_every", "grid_ddpm"),
                 "shortcut": ("shortcut_", "cd_", "teacher_", "grid_shortcut"),
                 "classifier": ("cls_",), "evaluator": (), "judge": ()}  # cls_*: the classifier's and evaluator's run
# (the judge was trained later with the CPU preset's cls_*, which its own config records: checkpoints/README.md)
# the current run's own: where it reads and writes (never the folders of the run that trained them)
# what the metadata of a file of each kind must hold to be installed or sampled (beyond kind and config)
SHIPPED_META = {"classifier": {"arch": dict, "test_acc": NUMBER}, "evaluator": {"arch": dict, "test_acc": NUMBER},
                "judge": {"arch": dict, "test_acc": NUMBER}}
RUN_KEYS = ("out_dir", "data_root", "device", "resume", "stages", "preset", "seed", "n_train", "n_test")


def read(stage, folder=FOLDER):
    """(float32 state dict, metadata) of checkpoints/<stage>.safetensors, or a one-line error."""
    path = os.path.join(folder, f"{stage}.safetensors")
    if not os.path.isfile(path):
        raise UserError(f"--pretrained needs {path}, which ships with the repository: "
                        f"restore it with git checkout -- checkpoints/")
    state, meta = read_file(path, stage)
    return state, check_schema(meta, {"step": int, "elapsed": NUMBER}, path, "metadata")  # what install() records


def read_file(path, kinds):
    """(float32 state dict, metadata) of any .safetensors this project writes (the shipped models, a
    stage's model.safetensors) whose kind is one of `kinds`, or a one-line error."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    state, meta = read_safetensors(path, kinds)  # torn, foreign or wrong metadata: one line (sftlib/readers.py)
    check_schema(meta, SHIPPED_META.get(meta["kind"], {}), path, "metadata")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, meta


def load_unet(path, kinds, device):
    """(UNet in eval mode, schedule, metadata) of a ddpm or shortcut .safetensors, e.g.
    checkpoints/ddpm.safetensors: what `train_toy.py sample --ckpt=FILE.safetensors` draws from."""
    from sftlib.models import schedule_of, unet_from

    state, meta = read_file(path, kinds)
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"{path} has no config in its metadata: not a file this project wrote")
    net = unet_from(dict(config=meta["config"], weights=state), path, "weights")
    return net.to(device).eval().requires_grad_(False), schedule_of(meta["config"], device), meta


def install(cfg, folder=FOLDER):
    """Write the shipped models as complete checkpoints <out_dir>/<stage>/ckpt.pt (a stage already there
    is left alone), and set cfg's shape and step keys to the shipped ones so every stage before ShortFT
    sees itself complete. Returns the keys it set."""
    shipped = {}
    for stage in STAGES:
        state, meta = read(stage, folder)
        ckpt_cfg = dict(meta["config"], **{k: cfg[k] for k in RUN_KEYS})
        shipped.update({k: meta["config"].get(k, LEGACY.get(k)) for k in SHIPPED_KEYS[stage]})
        shipped.update(training_keys(stage, meta["config"], cfg))
        path = os.path.join(cfg["out_dir"], stage, "ckpt.pt")
        if os.path.exists(path):
            print(f"[pretrained] {path} exists: kept (remove it to install the shipped {stage})")
            continue
        ckpt = dict(kind=stage, config=ckpt_cfg, step=meta["step"], elapsed=meta["elapsed"],
                    pretrained=os.path.join(folder, f"{stage}.safetensors"))
        if stage in ("ddpm", "shortcut"):
            ckpt.update(ema=state, model=state)  # only the EMA weights ship: they are what is sampled
            if stage == "shortcut":  # and the base it was distilled from: the shipped ddpm, by its bytes
                ckpt.update(edges=meta["edges"], teacher_sha256=file_sha256(os.path.join(folder, "ddpm.safetensors")))
        else:
            ckpt.update(model=state, arch=meta["arch"], test_acc=meta["test_acc"])
        save_atomic(ckpt, path)
        if stage in ("ddpm", "shortcut"):  # the stage's export, whose presence marks it complete
            with atomic_path(os.path.join(cfg["out_dir"], stage, "model.safetensors")) as tmp:
                shutil.copyfile(ckpt["pretrained"], tmp)
        print(f"[pretrained] {stage}: installed {ckpt['pretrained']} as {path} ({meta['step']} steps"
              + (f", test accuracy {meta['test_acc']:.1%}" if "test_acc" in meta else "") + ")")
    typed = getattr(cfg, "given", None) or ()
    for k in sorted(k for k in typed if k in shipped and cfg[k] != shipped[k]):
        print(f"[pretrained] --{k}={cfg[k]} ignored: the shipped models have {k}={shipped[k]}")
    cfg.update(shipped)
    return shipped


def training_keys(stage, shipped_cfg, cfg):
    """{key: the value it had when the shipped `stage` was trained} for that stage's training keys
    (TRAINING_KEYS) that the current config has; a key the shipped config lacks (added later) takes its
    LEGACY value, or is left as it is when there is none."""
    keys = [k for k in cfg if k.startswith(TRAINING_KEYS[stage]) and k not in RUN_KEYS]
    return {k: shipped_cfg[k] if k in shipped_cfg else LEGACY[k] for k in keys if k in shipped_cfg or k in LEGACY}


SHIPPED_NOTE = ("ddpm, shortcut, classifier, evaluator, judge: shipped (checkpoints/README.md); their shape, step and "
                "training keys above are the shipped models' own")


def shipped_models_are_loadable(device="cpu"):
    """Build every shipped network and load its weights (strict): a check for the tests and the cards."""
    from sftlib.nets import build_net
    from unet import build_unet

    out = {}
    for stage in STAGES:
        state, meta = read(stage)
        net = build_unet(meta["config"]) if stage in ("ddpm", "shortcut") else build_net(meta["arch"])
        net.load_state_dict(state)
        out[stage] = sum(p.numel() for p in net.parameters())
    return out


if __name__ == "__main__":  # python -m sftlib.pretrained: what ships, at a glance
    for name, n in shipped_models_are_loadable().items():
        meta = read(name)[1]
        print(f"{name:10s} {n / 1e6:5.2f}M parameters, {meta['step']} steps"
              + (f", test accuracy {meta['test_acc']:.2%}" if "test_acc" in meta else ""))
