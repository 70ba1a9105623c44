"""Export a trained class to one static graph: image -> (anomaly map, score).

    python export_model.py                                   # the run in output/ -> output/inference/CLS/
    python export_model.py --output_dir output --cls bottle
    python export_model.py --checkpoint PATH/model.pdparams --save_dir DIR --onnx
    python export_model.py --cls bottle --onnx --int8 --calib_dir mvtec/bottle/train/good

Writes model.json + model.pdiparams (paddle.jit.save, Paddle 3 / PIR format), deploy.json
(arch, image size, mean/std, output order, thresholds, score statistics, and the size and
sha256 of every file written, which infer.py checks before loading) and, with --onnx,
model.onnx; with --int8 also model_int8.onnx, post-training quantised by ONNX Runtime
(int8 convolutions, per-channel weights, activations calibrated on good images; the
anomaly-map head stays float32). The work is in deploy/ (export.py, deployment.py).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from utils import runtime
from utils.cli import run_main


def main(argv: Sequence[str] | None = None) -> int:
    from deploy.command_lines import parse_export_args  # no Paddle: --help and flag mistakes answer at once

    def body() -> int | None:
        args = parse_export_args(argv)
        runtime.start()  # only now: Paddle, quietly, on every core
        from deploy.export_command import run

        return run(args)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
