"""RD4AD in PaddlePaddle: train, evaluate and visualise Reverse Distillation on MVTec AD.

    python main.py --config configs/sample_bottle.yaml   # quick start on the bundled sample
    python main.py                                       # train + evaluate every class
    python main.py --mode eval                           # evaluate saved checkpoints
    python main.py --mode infer --cls bottle             # pictures, masks and verdicts

The pipeline, one package a stage: images -> dataset.py -> model/ (teacher features ->
bottleneck -> student features -> anomaly map and score) -> engine/ (training,
evaluation, metrics, calibration) -> report/ (tables, pictures, HTML). See doc/pipeline.md.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence



def main(argv: Sequence[str] | None = None) -> int:
    # Paddle loads only once the settings are read (--help answers at once)
    from engine.command import main as command

    return command(argv)


if __name__ == "__main__":
    sys.exit(main())
