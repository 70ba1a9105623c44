"""serve.py's settings beside the predictor's own (no FastAPI needed to read them)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceOptions:
    """serve.py's settings beside the predictor's own."""
    workers: int = 1
    queue_size: int = 8           # requests waiting beyond those being computed
    timeout_s: float = 30.0       # from arrival to answer
    max_upload_mb: float = 20.0
    max_pixels: int = 40_000_000  # 40 MP: any camera frame; a decompression bomb is far above
    max_batch: int = 1            # images one predictor run may take from the queue
    max_wait_ms: float = 0.0      # how long a worker waits to fill a batch
    max_files: int = 32           # per /predict/batch request
    upload_timeout_s: float = 30.0  # a request's headers, and then its body, must arrive within it
    max_open_uploads: int = 0     # requests with a body held at once; 0: twice what the queue and workers take
