"""The methods this project trains: a name (--model, recorded in checkpoints and
deploy.json) -> where its AnomalyModel class lives and the options (flags) it takes.
Adding a method = its file + one line here.

This module imports no Paddle: the settings and --help are built from it before any work
starts (issue 23 §5); a method's file (and Paddle) is imported only when it is built.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelOption:
    """An extra setting a method takes: a flag and a YAML key (--NAME), passed to the
    model's __init__ as a keyword argument and recorded in its build_args()."""
    default: Any
    help: str
    choices: tuple | None = None
    type: type = str


@dataclass(frozen=True)
class Method:
    """Where a method's class lives (module, class name) and its options, readable
    without importing it."""
    module: str
    cls: str
    options: dict[str, ModelOption] = field(default_factory=dict)
    title: str = ""  # as reports write it ("RD++"); default: the name in capitals


MODELS: dict[str, Any] = {  # name -> Method (or, in tests, an AnomalyModel class itself)
    "rd4ad": Method("model.rd4ad", "RD4AD", title="RD4AD"),
    "rdpp": Method("model.rdpp", "RDPP", {"ssot": ModelOption(
        "as_coded", "RD++'s SSOT term (as_coded: the reference's, ~0; pairwise: per image pair)", ("as_coded", "pairwise"))}, "RD++"),
}
DEFAULT_MODEL = "rd4ad"


class UnknownModelError(ValueError):
    """A model name that is not in MODELS (checkpoints and deploy.json say which file)."""


def model_class(name: str) -> type:
    """The AnomalyModel class of `name`, its module imported now; it takes the options its
    registry line declares."""
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {str(name)[:40]!r} (known: {', '.join(MODELS)})")
    entry = MODELS[name]
    if isinstance(entry, type):
        return entry
    klass = getattr(importlib.import_module(entry.module), entry.cls)
    if klass.name != name:
        raise TypeError(f"model/registry.py: {entry.module}.{entry.cls} is named {klass.name!r}, not {name!r}")
    own = vars(klass).get("options")
    if own is not None and own != entry.options:
        raise TypeError(f"model option(s) of {name!r} declared differently in {entry.module} and the registry")
    klass.options = entry.options
    return klass


def model_title(name: str) -> str:
    """How reports name a method: its registry title, else the name in capitals."""
    entry = MODELS.get(name)
    return getattr(entry, "title", "") or str(name).upper()


def all_options() -> dict[str, ModelOption]:
    """Every method's options (one flag each); two methods may share an option name only
    with the same declaration."""
    out: dict[str, ModelOption] = {}
    for entry in MODELS.values():
        for key, option in entry.options.items():
            if key in out and out[key] != option:
                raise TypeError(f"model option {key!r} declared differently by two methods")
            out[key] = option
    return out


def build_model(name: str, arch: str, image_size: int | None = None, teacher_weights: str = "imagenet",
                conv_backend: str = "auto", **options: Any):
    """The model `name` with its teacher's weights loaded ("imagenet", "none" or a
    .pdparams path) and its dynamic-graph convolutions on `conv_backend` (model/onednn.py)."""
    from .base import prepared

    return prepared(model_class(name)(arch, image_size, **options), teacher_weights, conv_backend)
