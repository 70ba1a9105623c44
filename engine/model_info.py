"""What a class's results were computed with, as plain data for every report, table and
JSON: the model's name, backbone, image size, epochs trained of planned, batch size and
teacher weights, taken from the checkpoint (and, for a checkpoint older than its
"planned_epochs" / "batch_size" fields, from the training run's saved config.yaml when it
describes the same model). Never from the current command's defaults."""
from __future__ import annotations

import os

from utils.errors import UserError
from utils.io import is_whole_number

from .checkpoint import load_checkpoint
from .config import Config, load_config_file

DEFAULT_MODEL = "rd4ad"  # checkpoints written before they named their model
# The keys of a description, in the order tables show them.
FIELDS = ("model", "arch", "image_size", "epochs_trained", "epochs_planned", "batch_size",
          "teacher_weights", "checkpoint")
_MAX_TEXT = 200
# Config setting -> the description field that says what it was for the model.
SETTING_FIELDS = {"arch": "arch", "image_size": "image_size", "teacher_weights": "teacher_weights",
                  "epochs": "epochs_planned", "batch_size": "batch_size"}


def training_record(cfg: Config) -> dict:
    """The fields a training run adds to its checkpoints so they describe themselves."""
    return {"planned_epochs": int(cfg.epochs), "batch_size": int(cfg.batch_size)}


def describe_model(state: dict, checkpoint: str = "last", run_settings: dict | None = None) -> dict:
    """A checkpoint's (checked) contents -> its description (FIELDS). `run_settings`: the
    training run's saved settings, used for planned epochs and batch size only when the
    checkpoint lacks them and the settings name the same arch, size and teacher. A value
    nobody recorded is None (shown as '?'), never a default."""
    run = run_settings or {}
    same_model = all(run.get(k) == state.get(k) for k in ("arch", "image_size", "teacher_weights"))
    planned = _count(state.get("planned_epochs"))
    batch = _count(state.get("batch_size"))
    if same_model and planned is None:
        planned = _count(run.get("epochs"))
    if same_model and batch is None:
        batch = _count(run.get("batch_size"))
    name = state.get("model", DEFAULT_MODEL)
    return {
        "model": _text(name) if isinstance(name, str) and name else DEFAULT_MODEL,
        "arch": _text(state["arch"]),
        "image_size": int(state["image_size"]),
        "epochs_trained": int(state["epoch"]),
        "epochs_planned": planned,
        "batch_size": batch,
        "teacher_weights": _text(state["teacher_weights"]),
        "checkpoint": checkpoint,
    }


def trained_model(cfg: Config, epoch: int) -> dict:
    """The description of the model a training run holds after `epoch`."""
    return describe_model({"arch": cfg.arch, "image_size": cfg.image_size, "epoch": epoch,
                           "teacher_weights": cfg.teacher_weights, **training_record(cfg)})


def class_model(cfg: Config, cls: str) -> dict | None:
    """The description of the checkpoint a class's results come from (the best-on-test
    one with --select_best_on_test); None when it has none (e.g. training diverged) or it
    cannot be read (that error is the class's own, reported where the class failed). In
    eval / infer a --teacher_weights given replaces the checkpoint's (load_trained does)."""
    path = cfg.paths.checkpoint(cls, best=cfg.select_best_on_test)
    if not os.path.isfile(path):
        return None
    try:
        state = load_checkpoint(path)
    except UserError:
        return None
    model = describe_model(state, "best_on_test" if cfg.select_best_on_test else "last", run_settings(cfg))
    if cfg.mode != "train" and "teacher_weights" in cfg.explicit:
        model["teacher_weights"] = _text(cfg.teacher_weights)
    return model


def described_settings(cfg: Config, models: dict[str, dict | None]) -> dict:
    """The run's settings with the model's own (arch, image size, teacher, planned epochs,
    batch size) taken from the classes' descriptions: the value they share, None where
    they differ or nobody recorded it. What results.json calls "config"."""
    settings = cfg.to_dict()
    if not any(models.values()):
        return settings
    common = common_settings(models)
    for key, field in SETTING_FIELDS.items():
        settings[key] = common.get(field)
    return settings


def run_settings(cfg: Config) -> dict:
    """The training run's saved settings (OUTPUT_DIR/config.yaml), {} when absent or damaged."""
    path = cfg.paths.config_yaml("train")
    if not os.path.isfile(path):
        return {}
    try:
        return load_config_file(path)
    except UserError:
        return {}


def common_settings(models: dict[str, dict | None]) -> dict:
    """The description fields every class shares (a run's one-line title)."""
    described = [m for m in models.values() if m]
    if not described:
        return {}
    return {k: described[0][k] for k in FIELDS if all(m[k] == described[0][k] for m in described)}


def _count(value: object) -> int | None:
    """A positive whole number from a checkpoint or file, else None (damaged or absent)."""
    return int(value) if is_whole_number(value) and 0 < value < 10 ** 9 else None


def _text(value: object) -> str:
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT - 3] + "..."
