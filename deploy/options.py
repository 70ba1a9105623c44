"""How to run an exported model, as plain settings: readable without Paddle (the command
lines and --help are built from them before any work starts). deploy/predictor.py holds
the runtimes; tests/test_run_ux.py checks BACKEND_NAMES against its table."""
from __future__ import annotations

import os
from dataclasses import dataclass

from utils.errors import UserError

DEVICE_NAMES = ("cpu", "gpu")
PRECISION_NAMES = ("fp32", "fp16", "bf16", "int8")
BACKEND_NAMES = ("paddle", "onnxruntime", "openvino")
MIN_OPSET, MAX_OPSET = 7, 21   # what paddle2onnx exports
MAX_CALIB_IMAGES = 10000


class UsageError(UserError):
    """A setting this machine or model cannot honour."""


@dataclass(frozen=True)
class PredictorOptions:
    """How to run an exported model (infer.py's flags, the benchmark's settings)."""
    backend: str = "paddle"
    device: str = "cpu"
    precision: str = "fp32"
    cpu_threads: int = os.cpu_count() or 1
    enable_mkldnn: bool = True
    use_tensorrt: bool = False
    batch_size: int = 1
    recheck_band: float = 0.0              # int8 only: scores this near the threshold are scored again in fp32
    recheck_threshold: float | None = None  # the threshold they are near (None: the export's calibrated one)

    def check(self) -> None:
        """UsageError for a backend, device and precision that cannot run together here."""
        from .predictor import BACKENDS, check_recheck_band  # the runtimes: Paddle and the others

        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend}: one of {', '.join(BACKENDS)}")
        if self.device not in DEVICE_NAMES:
            raise UsageError(f"--device {self.device}: one of {', '.join(DEVICE_NAMES)}")
        check_recheck_band(self.recheck_band)
        if self.recheck_band and self.precision != "int8":
            raise UsageError(f"--recheck_band rechecks int8 scores in fp32: it needs --precision int8, not "
                             f"{self.precision}")
        BACKENDS[self.backend].check_options(self)


def add_precision_flags(add, default: str, auto_is: str) -> None:
    """--precision (with auto) and --recheck_band, as infer.py and serve.py both take them."""
    add("--precision", default=default, choices=PRECISION_NAMES + ("auto",), metavar="NAME",
        help=f"one of {', '.join(PRECISION_NAMES)}, or auto: the fastest path the export judged to keep every "
             f"verdict ({auto_is}) (default: {default})")
    add("--recheck_band", type=float, default=0.0, metavar="SCORE",
        help="with --precision int8: images whose int8 score lies within SCORE of the image threshold are scored "
             "again in fp32 (default: 0, none; --precision auto takes the band the export judged)")
