"""The inspection service: an exported RD4AD model behind HTTP (FastAPI + uvicorn).

    python serve.py --model_dir output/inference/bottle            # http://127.0.0.1:8866/
    python serve.py ... --backend openvino --precision int8 --workers 2 --queue 8
    curl -F file=@sample_data/bottle/test/crack/000.png http://127.0.0.1:8866/predict

POST /predict (an image: multipart field `file` or raw bytes; ?pictures=true adds the mask
and the picture as base64 PNGs), POST /predict/batch, GET /health, GET /model, GET / (an
upload page). Verdicts, thresholds and pictures are infer.py's (deploy/service.py). Binds
to 127.0.0.1 unless --host says otherwise. SIGTERM: stop accepting, finish the requests in
flight, exit 0.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from utils import runtime
from utils.cli import run_main


def main(argv: Sequence[str] | None = None) -> int:
    from deploy.command_lines import parse_serve_args  # no Paddle: --help and flag mistakes answer at once

    def body() -> int | None:
        args = parse_serve_args(argv)
        print("starting: importing Paddle and the web service ...", flush=True)  # a few seconds, then each stage
        runtime.start()  # only now: Paddle, quietly, on every core
        from deploy.serve_command import run

        return run(args)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
