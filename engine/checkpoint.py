"""Class checkpoints: one dict of the weights of the parts a model trains (its
trainable_parts(), under their keys), the model's name and the arguments that rebuild it
(build_args()), the settings it was trained at, thresholds and score statistics; and the
one way back to a network (`load_trained`, used by evaluation, both inference paths,
export, serving and the benchmark).

A checkpoint without a model name (written before model/registry.py) is RD4AD's: its
parts are "bottleneck" and "student", its arguments arch and image_size."""
from __future__ import annotations

import os

import numpy as np
import paddle

from model.arch import ARCH_NAMES
from model.base import AnomalyModel, prepared
from model.registry import DEFAULT_MODEL, MODELS, model_class
from utils.errors import UserError, shorten
from utils.io import atomic_write, is_whole_number
from utils.names import NameError_, check_class_name
from utils.numbers import finite_in_float32, image_size_fits, is_finite_number, MAX_EPOCHS
from utils.safe_pickle import load_plain_pickle

from core.decision import Calibration, CalibrationError
from core.results import check_score_stats

FORMAT = "rd4ad-paddle/1"
# Keys of a checkpoint that are not a part's weights: no model may name a part so.
RESERVED_KEYS = frozenset({"format", "model", "model_args", "parts", "arch", "image_size", "epoch", "class",
                           "teacher", "teacher_weights", "score_stats", "calibration", "selection",
                           "converted_from", "planned_epochs", "batch_size"})
MAX_ARGS = 32


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or for another model."""


def part_layers(net: AnomalyModel) -> dict[str, paddle.nn.Layer]:
    """The model's trainable parts, their keys checked against the checkpoint's own."""
    parts = net.trainable_parts()
    clash = sorted(set(parts) & RESERVED_KEYS)
    if clash or not parts:
        raise ValueError(f"model {net.name}: trainable part names {clash or 'none'} are not allowed")
    return parts


def model_args(net: AnomalyModel, image_size: int) -> dict:
    """build_args() with the image size the checkpoint is for (a model may be built
    without one: its head is then made for each image size)."""
    return {**net.build_args(), "image_size": int(image_size)}


def save_checkpoint(path: str, net: AnomalyModel, *, epoch: int, cls: str, image_size: int | None = None,
                    arch: str | None = None, teacher_weights: str = "imagenet", extra: dict | None = None) -> None:
    """The parts `net` trains, its name and build arguments (`arch` / `image_size`, when
    given, must be the model's; `image_size` names the size when the model was built
    without one). A random teacher ('none') is saved too: it cannot be rebuilt from a name."""
    args = model_args(net, image_size if image_size is not None else net.build_args()["image_size"])
    if arch is not None and arch != args["arch"]:
        raise ValueError(f"save_checkpoint: arch {arch} for a {args['arch']} model")
    parts = part_layers(net)
    state = {
        "format": FORMAT,
        "model": net.name,
        "model_args": args,
        "parts": list(parts),
        "arch": args["arch"],
        "image_size": args["image_size"],
        "epoch": int(epoch),
        "class": cls,
        **{key: layer.state_dict() for key, layer in parts.items()},
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
    normalise_model_fields(state, path)  # after arch and image_size: its arguments repeat them
    if not is_whole_number(state.get("epoch")) or not 0 <= state["epoch"] <= MAX_EPOCHS:
        raise bad("epoch", f"a whole number from 0 to {MAX_EPOCHS}")
    for key, longest in (("class", 255), ("teacher_weights", 4096)):
        if not isinstance(state.get(key), str) or len(state[key]) > longest:
            raise bad(key, f"a string of at most {longest} characters")
    try:  # it names the export's folder (export_model.py without --save_dir): never a path
        check_class_name(state["class"], "class")
    except NameError_ as err:
        raise CheckpointError(f"{path}: damaged checkpoint: {err}") from None
    for part in [*state["parts"], "teacher"]:
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
    problem = check_score_stats(stats) if stats is not None else None
    if problem:
        raise CheckpointError(f"{path}: damaged checkpoint: 'score_stats' must be the good images' score "
                              f"statistics ({problem})")


LEGACY_PARTS = ("bottleneck", "student")  # RD4AD's, in checkpoints without a model name


def normalise_model_fields(state: dict, path: str) -> None:
    """Fill in (a checkpoint without a model name: RD4AD's) and check the model's name,
    build arguments and part list."""
    if "model" not in state:
        state.update(model=DEFAULT_MODEL, parts=list(LEGACY_PARTS),
                     model_args={"arch": state.get("arch"), "image_size": state.get("image_size")})
    name, args, parts = state["model"], state.get("model_args"), state.get("parts")
    if not isinstance(name, str) or name not in MODELS:
        raise CheckpointError(f"{path}: trained with --model {shorten(name)}, which this version does not "
                              f"know (known: {', '.join(MODELS)})")
    if (not isinstance(args, dict) or len(args) > MAX_ARGS or not all(isinstance(k, str) for k in args)
            or args.get("arch") != state.get("arch") or args.get("image_size") != state.get("image_size")):
        raise CheckpointError(f"{path}: damaged checkpoint: 'model_args' must be a dict naming its arch and "
                              f"image_size ({shorten(args)})")
    options = MODELS[name].options
    unknown = sorted(set(args) - {"arch", "image_size"} - set(options))
    if unknown:
        raise CheckpointError(f"{path}: damaged checkpoint: model_args {', '.join(repr(k[:40]) for k in unknown[:3])}: "
                              f"not options of --model {name}")
    for key, option in options.items():
        value = args.get(key, option.default)
        if type(value) is not option.type or (option.choices and value not in option.choices):
            raise CheckpointError(f"{path}: damaged checkpoint: --{key} {shorten(value)} is not a valid "
                                  f"option of --model {name}")
    if (not isinstance(parts, list) or not parts or len(parts) > MAX_ARGS
            or not all(isinstance(p, str) and p not in RESERVED_KEYS for p in parts)):
        raise CheckpointError(f"{path}: damaged checkpoint: 'parts' must list the trained parts ({shorten(parts)})")


def apply_checkpoint(net: AnomalyModel, state: dict, path: str = "checkpoint") -> None:
    """Load the checkpoint's parts (and its own teacher, if any) into `net`."""
    layers = part_layers(net)
    if set(layers) != set(state["parts"]):
        raise CheckpointError(f"{path}: holds parts {', '.join(state['parts'])}, the {net.name} model trains "
                              f"{', '.join(layers)}")
    for part in [*state["parts"], "teacher"]:
        if part == "teacher" and part not in state:
            continue
        layer = net.teacher if part == "teacher" else layers[part]
        own = layer.state_dict()
        given = state[part]
        if set(own) != set(given) or any(list(own[k].shape) != list(given[k].shape) for k in own):
            raise CheckpointError(f"{path}: {part} weights do not fit the {state['arch']} model")
        layer.set_state_dict({k: np.asarray(v, dtype=np.float32) if own[k].dtype == paddle.float32 else v
                              for k, v in given.items()})


def load_trained(path: str, *, arch: str | None = None, image_size: int | None = None,
                 teacher_weights: str | None = None, conv_backend: str = "auto") -> tuple[AnomalyModel, dict]:
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
    net = rebuild(state, source, conv_backend, path)
    apply_checkpoint(net, state, path)
    net.eval()
    return net, state


def rebuild(state: dict, teacher_weights: str, conv_backend: str = "auto", path: str = "checkpoint") -> AnomalyModel:
    """The architecture a checkpoint (or deploy.json) names: MODELS[model](**model_args),
    its teacher's weights from `teacher_weights`. Untrained: apply_checkpoint fills it."""
    try:
        net = model_class(state["model"])(**state["model_args"])
    except (TypeError, ValueError) as err:  # arguments the model's __init__ refuses
        raise CheckpointError(f"{path}: --model {state['model']} cannot be rebuilt from {shorten(state['model_args'])} "
                              f"({shorten(str(err))})") from None
    return prepared(net, teacher_weights, conv_backend)  # the teacher file's own errors name it
