"""Deployment inference with Paddle Inference (or ONNX Runtime) on an exported RD4AD model.

    python infer.py --data_dir sample_data --cls bottle            # model: output/inference/bottle
    python infer.py --model_dir output/inference/bottle --image path/to/img_or_folder
    python infer.py ... --backend onnxruntime [--precision int8]
    python infer.py ... --device gpu --precision fp16 [--use_tensorrt True]
    python infer.py ... --benchmark True        # AutoLog-style timing table + benchmark.json

Writes under --output_dir (default MODEL_DIR/infer): one picture per image (image | ground
truth | anomaly map with its colour scale | predicted mask), masks/NAME.png (the binary
defect mask at the calibrated pixel threshold) and scores.csv (score, normalised score in
[0, 1] with 0.5 at the threshold, verdict OK / DEFECT, the picture's name, any error); the
same files as `main.py --mode infer` (report/per_image.py). Preprocessing (size, mean,
std) and thresholds come from the model's deploy.json, which is checked, with every model
file, before anything is loaded. Exit status: 0 every image scored; 1 some image failed
(its row says why); 2 a mistake (one line); 130 interrupted.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from utils import runtime
from utils.cli import run_main


def main(argv: Sequence[str] | None = None) -> int:
    from deploy.command_lines import parse_infer_args  # no Paddle: --help and flag mistakes answer at once

    def body() -> int | None:
        args = parse_infer_args(argv)
        runtime.start()  # only now: Paddle, quietly, on every core
        from deploy.infer_command import run

        return run(args)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
