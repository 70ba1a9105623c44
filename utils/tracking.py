"""Optional VisualDL logging of loss and metrics (--visualdl); a no-op when off."""
from __future__ import annotations

import math

from .config import ConfigError


class ScalarLogger:
    def __init__(self, logdir: str | None) -> None:
        self._writer = None
        if logdir is None:
            return
        try:
            from visualdl import LogWriter
        except ImportError:
            raise ConfigError("--visualdl needs VisualDL: pip install visualdl") from None
        self._writer = LogWriter(logdir=logdir)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None and isinstance(value, float) and math.isfinite(value):
            self._writer.add_scalar(tag=tag, value=value, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
