"""RD4AD model: teacher (frozen ResNet) -> bottleneck (OCBE) -> student (decoder).

The names below load on first use, so that importing a light module of this package
(model/choices.py: the settings' choices) does not import Paddle."""
from importlib import import_module

from .choices import ARCH_NAMES as ARCHS

_LAZY = {"RD4AD": ".rd4ad", "build_rd4ad": ".rd4ad", "TeacherWeightsError": ".teacher",
         "convert_reference_state_dicts": ".convert"}

__all__ = ["ARCHS", "RD4AD", "TeacherWeightsError", "build_rd4ad", "convert_reference_state_dicts"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
