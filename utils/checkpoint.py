"""Class checkpoints: bottleneck + student weights with the settings they were trained at.

Every write goes to a temporary file in the same folder and is renamed over the target,
so a kill at any moment leaves the previous file intact.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import paddle

FORMAT = "rd4ad-paddle/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or for another model."""


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) then rename tmp_path over path (same folder, so atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file a normal mode
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
    """Read and check a checkpoint; raise CheckpointError with one line naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found (train this class first)")
    try:
        state = paddle.load(path)
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an RD4AD-Paddle checkpoint")
    if arch is not None and state["arch"] != arch:
        raise CheckpointError(f"{path}: trained with --arch {state['arch']}, not {arch}")
    if image_size is not None and state["image_size"] != image_size:
        raise CheckpointError(
            f"{path}: trained with --image_size {state['image_size']}, not {image_size}")
    return state


def apply_checkpoint(net: paddle.nn.Layer, state: dict, path: str = "checkpoint") -> None:
    for part in ("bottleneck", "student", "teacher"):
        if part == "teacher" and part not in state:
            continue
        layer = getattr(net, part)
        own = layer.state_dict()
        given = state[part]
        if set(own) != set(given) or any(list(own[k].shape) != list(given[k].shape) for k in own):
            raise CheckpointError(f"{path}: {part} weights do not fit the {state['arch']} model")
        layer.set_state_dict(given)
