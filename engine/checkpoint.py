"""Class checkpoints: one dict of bottleneck + student weights with the settings they
were trained at, thresholds and score statistics; and the one way back to a network
(`load_trained`, used by evaluation, inference, export and the benchmark)."""
from __future__ import annotations

import math
import os

import numpy as np
import paddle

from model.arch import ARCH_NAMES
from model.rd4ad import RD4AD, build_rd4ad
from utils.errors import UserError, shorten
from utils.io import atomic_write, is_whole_number
from utils.names import NameError_, check_class_name
from utils.numbers import finite_in_float32, image_size_fits
from utils.safe_pickle import load_plain_pickle

from .decision import MAX_THRESHOLD, Calibration, CalibrationError

FORMAT = "rd4ad-paddle/1"


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or for another model."""


def save_checkpoint(path: str, net: paddle.nn.Layer, *, arch: str, image_size: int, epoch: int,
                    cls: str, teacher_weights: str = "imagenet", extra: dict | None = None) -> None:
    """A random teacher ('none') is saved too: it cannot be rebuilt from a name."""
    state = {
        "format": FORMAT,
        "arch": arch,
        "image_size": int(image_size),
        "epoch": int(epoch),
        "class": cls,
        "bottleneck": net.bottleneck.state_dict(),
        "student": net.student.state_dict(),
        "teacher_weights": teacher_weights,
        **(extra or {}),
    }
    if str(teacher_weights).lower() == "none":
        state["teacher"] = net.teacher.state_dict()
    atomic_write(path, lambda tmp: paddle.save(state, tmp))


def load_checkpoint(path: str, arch: str | None = None, image_size: int | None = None) -> dict:
    """Read (never running code: utils/safe_pickle.py) and check a checkpoint; raise
    CheckpointError with one line naming the file."""
    if not os.path.lexists(path):  # anything else there: load_plain_pickle says what it is
        raise CheckpointError(f"{path}: checkpoint not found (train this class first)")
    try:
        state = load_plain_pickle(path, "checkpoint")
    except UserError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an RD4AD-Paddle checkpoint")
    check_checkpoint(state, path)
    if arch is not None and state["arch"] != arch:
        raise CheckpointError(f"{path}: trained with --arch {state['arch']}, not {arch}")
    if image_size is not None and state["image_size"] != image_size:
        raise CheckpointError(
            f"{path}: trained with --image_size {state['image_size']}, not {image_size}")
    return state


def check_checkpoint(state: dict, path: str) -> None:
    """Every part a checkpoint of this format holds, with its type: a checkpoint that
    lacks one, or holds the wrong kind of value, is refused here rather than failing
    later (or being exported into a deploy.json that crashes infer.py)."""
    def bad(key: str, need: str) -> CheckpointError:
        got = shorten(state[key]) if key in state else "missing"
        return CheckpointError(f"{path}: damaged checkpoint: {key!r} must be {need} ({got})")

    if state.get("arch") not in ARCH_NAMES:
        raise bad("arch", "one of " + ", ".join(ARCH_NAMES))
    size = state.get("image_size")
    if not is_whole_number(size) or size < 64 or size % 32 or not image_size_fits(size):
        raise bad("image_size", "a multiple of 32, at least 64, whose 3 x size x size fits int32")
    if not is_whole_number(state.get("epoch")) or state["epoch"] < 0:
        raise bad("epoch", "a whole number >= 0")
    for key, longest in (("class", 255), ("teacher_weights", 4096)):
        if not isinstance(state.get(key), str) or len(state[key]) > longest:
            raise bad(key, f"a string of at most {longest} characters")
    try:  # it names the export's folder (export_model.py without --save_dir): never a path
        check_class_name(state["class"], "class")
    except NameError_ as err:
        raise CheckpointError(f"{path}: damaged checkpoint: {err}") from None
    for part in ("bottleneck", "student", "teacher"):
        if part == "teacher" and part not in state:
            continue
        weights = state.get(part)
        if not isinstance(weights, dict) or not weights:
            raise bad(part, "a dict of weight arrays")
        for name, value in weights.items():
            if not isinstance(name, str) or not isinstance(value, np.ndarray) or value.dtype.kind != "f":
                raise CheckpointError(f"{path}: damaged checkpoint: {part} weight {shorten(name)} "
                                      f"is not a float array")
            if not finite_in_float32(value):  # as the model holds it: float64 1e300 is inf there
                raise CheckpointError(f"{path}: {part} weight {shorten(name)} is not finite in float32 (NaN or "
                                      f"inf): the training diverged; retrain this class")
    if "calibration" in state:
        try:
            Calibration.from_dict(state["calibration"])
        except CalibrationError as err:
            raise CheckpointError(f"{path}: damaged checkpoint: calibration {err}") from None
    stats = state.get("score_stats")
    if stats is not None and (not isinstance(stats, dict) or len(stats) > 32 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            and abs(v) <= MAX_THRESHOLD for v in stats.values())):  # scores lie in [0, 6]
        raise bad("score_stats", f"a dict of finite numbers within +-{MAX_THRESHOLD:g}")


def apply_checkpoint(net: paddle.nn.Layer, state: dict, path: str = "checkpoint") -> None:
    for part in ("bottleneck", "student", "teacher"):
        if part == "teacher" and part not in state:
            continue
        layer = getattr(net, part)
        own = layer.state_dict()
        given = state[part]
        if set(own) != set(given) or any(list(own[k].shape) != list(given[k].shape) for k in own):
            raise CheckpointError(f"{path}: {part} weights do not fit the {state['arch']} model")
        layer.set_state_dict({k: np.asarray(v, dtype=np.float32) if own[k].dtype == paddle.float32 else v
                              for k, v in given.items()})


def load_trained(path: str, *, arch: str | None = None, image_size: int | None = None,
                 teacher_weights: str | None = None, conv_backend: str = "auto") -> tuple[RD4AD, dict]:
    """(eval-mode model, checkpoint contents). The checkpoint is read without running code
    and checked part by part; `arch` / `image_size`, when given, must match it. The
    teacher: the one the checkpoint carries (trained with a random teacher), else
    `teacher_weights` when given, else the one the checkpoint names."""
    state = load_checkpoint(path, arch=arch, image_size=image_size)
    if "teacher" in state:
        if teacher_weights is not None and teacher_weights != state["teacher_weights"]:
            raise CheckpointError(f"{path}: carries its own random teacher (trained with --teacher_weights "
                                  f"{state['teacher_weights']}), which --teacher_weights {teacher_weights} "
                                  f"cannot replace")
        source = "none"  # the checkpoint's own teacher is applied below
    else:
        source = teacher_weights or state["teacher_weights"]
        if source.lower() == "none":
            raise CheckpointError(f"{path}: trained with teacher weights {state['teacher_weights']!r}; "
                                  f"--teacher_weights none would pair it with a random teacher")
    net = build_rd4ad(state["arch"], source, state["image_size"], conv_backend)
    apply_checkpoint(net, state, path)
    net.eval()
    return net, state
