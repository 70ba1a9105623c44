"""Class checkpoints: bottleneck + student weights with the settings they were trained at.

Every write goes to a temporary file in the same folder and is renamed over the target,
so a kill at any moment leaves the previous file intact.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable

import numpy as np
import paddle

from .cli import output_error
from .errors import UserError, shorten
from .safe_pickle import load_plain_pickle
from model.arch import ARCH_NAMES as ARCHS

FORMAT = "rd4ad-paddle/1"


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or for another model."""


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) then rename tmp_path over path (same folder, so atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        # The temporary name is bounded so a long (but valid) target name still fits 255 bytes.
        prefix = "." + os.path.basename(path).encode("utf-8", "surrogateescape")[:64].decode(
            "utf-8", "ignore") + "."
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file a normal mode
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # disk full, permission, a file where a folder should be
        _remove_quietly(tmp)
        raise output_error(path, err) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str | None) -> None:
    if path and os.path.exists(path):
        try:
            os.remove(path)
        except OSError:
            pass


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def strict_json(obj: Any) -> Any:
    """obj with every non-finite float (nan, inf) as None: JSON has no NaN, and a strict
    reader (JSON.parse, jq) rejects the bare NaN that json.dumps writes by default."""
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(strict_json(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


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
    if not os.path.isfile(path):
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

    if state.get("arch") not in ARCHS:
        raise bad("arch", "one of " + ", ".join(ARCHS))
    size = state.get("image_size")
    if not is_whole_number(size) or size < 64 or size % 32:
        raise bad("image_size", "a multiple of 32, at least 64")
    if not is_whole_number(state.get("epoch")) or state["epoch"] < 0:
        raise bad("epoch", "a whole number >= 0")
    for key, longest in (("class", 255), ("teacher_weights", 4096)):
        if not isinstance(state.get(key), str) or len(state[key]) > longest:
            raise bad(key, f"a string of at most {longest} characters")
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
            if not np.isfinite(value).all():
                raise CheckpointError(f"{path}: {part} weight {shorten(name)} is not finite (NaN or "
                                      f"inf): the training diverged; retrain this class")
    if "calibration" in state:
        from .decision import Calibration, CalibrationError

        try:
            Calibration.from_dict(state["calibration"])
        except CalibrationError as err:
            raise CheckpointError(f"{path}: damaged checkpoint: calibration {err}") from None
    stats = state.get("score_stats")
    if stats is not None and (not isinstance(stats, dict) or len(stats) > 32 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in stats.values())):
        raise bad("score_stats", "a dict of finite numbers")


def is_whole_number(value: Any) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


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
