"""Frozen ImageNet ResNet encoder: the teacher. Returns layer1, layer2, layer3 features."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import paddle
import paddle.nn as nn
from paddle.vision.models import resnet as paddle_resnet

from utils.errors import UserError, shorten
from utils.numbers import finite_in_float32
from utils.safe_pickle import load_plain_pickle

from .arch import get_arch
from .layers import use_inplace_relu


class TeacherWeightsError(UserError):
    """The teacher's weights could not be found, downloaded or loaded."""


class Teacher(nn.Layer):
    """ResNet stem + layer1..layer3 of `paddle.vision.models`.

    layer4, avgpool and fc are dropped: RD4AD only distils layer1..3, and the reference
    computes layer4 only to throw it away (about a fifth of the teacher's work).
    """

    def __init__(self, arch: str) -> None:
        super().__init__()
        backbone = get_arch(arch).teacher(pretrained=False, num_classes=0, with_pool=False)
        self.conv1, self.bn1, self.relu, self.maxpool = (
            backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        self.layer1, self.layer2, self.layer3 = backbone.layer1, backbone.layer2, backbone.layer3
        self.arch = arch
        use_inplace_relu(self)
        for p in self.parameters():
            p.stop_gradient = True
        self.eval()

    def forward(self, images: paddle.Tensor) -> list[paddle.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]


DOWNLOAD_PROBE_SECONDS = 5.0  # 'auto' gives up on the download this soon when offline


def cached_imagenet_weights(arch: str) -> str:
    """Where Paddle's downloader keeps the official weights of `arch` (may not exist)."""
    from paddle.utils import download

    return os.path.join(download.WEIGHTS_HOME, os.path.basename(paddle_resnet.model_urls[arch][0]))


def can_download(url: str, timeout: float = DOWNLOAD_PROBE_SECONDS) -> str | None:
    """None when `url` answers within `timeout` seconds; otherwise why not (one line)."""
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return None
    except Exception as err:  # DNS, refused, timeout, proxy, HTTP error: all mean "not now"
        return f"{type(err).__name__}: {shorten(str(getattr(err, 'reason', err)), 80)}"


def resolve_teacher_weights(weights: str, arch: str, warn: Callable[[str], None] | None = None) -> str:
    """--teacher_weights as the run will use it. 'auto': 'imagenet' when the official
    weights are cached or the download server answers, else 'none' (a random teacher)
    with one warning through `warn`; anything else is returned as given."""
    choice = weights.lower()
    if choice == "auto":
        cached = cached_imagenet_weights(arch)
        why = None if os.path.isfile(cached) else can_download(paddle_resnet.model_urls[arch][0])
        if why is None:
            return "imagenet"
        if warn is not None:
            warn(f"--teacher_weights auto: no ImageNet weights for {arch} (not in {cached}; download: "
                 f"{why}): using a RANDOM teacher, so heatmaps will be poor; put the file there or pass "
                 f"--teacher_weights PATH")
        return "none"
    return weights


def imagenet_weights_path(arch: str) -> str:
    """Paddle's official ImageNet weights for `arch`: the cached file, downloaded once."""
    from paddle.utils import download

    url, md5 = paddle_resnet.model_urls[arch]
    cached = os.path.join(download.WEIGHTS_HOME, os.path.basename(url))
    # Paddle logs every retry; our one-line error below says what matters.
    quiet = getattr(download, "logger", None)
    level = quiet.level if quiet is not None else None
    if quiet is not None:
        quiet.setLevel(logging.ERROR)
    try:
        return download.get_weights_path_from_url(url, md5)
    except Exception as err:  # no network, proxy, md5 mismatch: all end the same way
        raise TeacherWeightsError(
            f"cannot get ImageNet weights for {arch} ({type(err).__name__}: {err}); "
            f"download {url} to {cached}, or pass --teacher_weights PATH to a local "
            f".pdparams file (or 'none' for a random teacher)") from None
    finally:
        if quiet is not None:
            quiet.setLevel(level)


def load_teacher_weights(teacher: Teacher, weights: str) -> None:
    """Fill `teacher` from "imagenet" (official, cached), "none" (keep random) or a path.

    A file may hold either a plain Paddle ResNet state dict (conv1.weight, ...) or this
    project's converted dict (teacher.conv1.weight, ...). layer4/fc keys are ignored.
    """
    weights = resolve_teacher_weights(weights or "none", teacher.arch)
    if weights.lower() == "none":
        return
    path = imagenet_weights_path(teacher.arch) if weights.lower() == "imagenet" else weights
    state = read_teacher_weights(path)
    state = {k[len("teacher."):] if k.startswith("teacher.") else k: v for k, v in state.items()}
    own = teacher.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own and not k.startswith(("layer4.", "fc.")))
    if missing or unexpected:
        example = f"{missing[0]} missing" if missing else f"unexpected {unexpected[0]}"
        raise TeacherWeightsError(f"{path}: not {teacher.arch} weights ({example})")
    for key, target in own.items():
        value = state[key]
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise TeacherWeightsError(f"{path}: {shorten(key)} is not a float array")
        shape = list(value.shape)
        if shape != list(target.shape):
            raise TeacherWeightsError(
                f"{path}: {key} has shape {shape}, {teacher.arch} needs {list(target.shape)}")
        if not finite_in_float32(value):  # as the model holds it: float64 1e300 is inf there
            raise TeacherWeightsError(f"{path}: {key} is not finite in float32 (NaN or inf)")
    teacher.set_state_dict({k: state[k].astype(np.float32, copy=False) for k in own})


def read_teacher_weights(path: str) -> dict:
    """A weights file as a dict of arrays, read without running code (utils/safe_pickle)."""
    if not os.path.lexists(path):  # anything else there: load_plain_pickle says what it is
        raise TeacherWeightsError(f"{path}: teacher weights file not found")
    try:
        state = load_plain_pickle(path, "teacher weights file")
    except UserError as err:
        raise TeacherWeightsError(str(err)) from None
    if not isinstance(state, dict):
        raise TeacherWeightsError(f"{path}: not a Paddle weights file (holds {type(state).__name__})")
    if not all(isinstance(k, str) for k in state):
        raise TeacherWeightsError(f"{path}: not a Paddle weights file (keys are not names)")
    return state
