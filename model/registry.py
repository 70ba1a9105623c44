"""The methods this project trains: a name (--model, recorded in checkpoints and
deploy.json) -> its AnomalyModel class. Adding a method = its file + one line here."""
from __future__ import annotations

from typing import Any

from .base import AnomalyModel, ModelOption, prepared
from .rd4ad import RD4AD

MODELS: dict[str, type[AnomalyModel]] = {
    "rd4ad": RD4AD,
}
DEFAULT_MODEL = "rd4ad"


class UnknownModelError(ValueError):
    """A model name that is not in MODELS (checkpoints and deploy.json say which file)."""


def model_class(name: str) -> type[AnomalyModel]:
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {str(name)[:40]!r} (known: {', '.join(MODELS)})")
    return MODELS[name]


def all_options() -> dict[str, ModelOption]:
    """Every method's options (one flag each); two methods may share an option name only
    with the same declaration."""
    out: dict[str, ModelOption] = {}
    for cls in MODELS.values():
        for key, option in cls.options.items():
            if key in out and out[key] != option:
                raise TypeError(f"model option {key!r} declared differently by two methods")
            out[key] = option
    return out


def build_model(name: str, arch: str, image_size: int | None = None, teacher_weights: str = "imagenet",
                conv_backend: str = "auto", **options: Any) -> AnomalyModel:
    """The model `name` with its teacher's weights loaded ("imagenet", "none" or a
    .pdparams path) and its dynamic-graph convolutions on `conv_backend` (model/onednn.py)."""
    return prepared(model_class(name)(arch, image_size, **options), teacher_weights, conv_backend)
