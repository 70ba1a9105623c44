"""`python serve.py`: the inspection service over an exported model (deploy/service.py)."""
from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Sequence

from engine.paths import RunPaths
from utils.cli import OneLineArgumentParser, parse_bool, run_main
from utils.names import check_class_name

from .deployment import read_deployment
from .predictor import BACKEND_NAMES, PRECISION_NAMES, PredictorOptions, UsageError
from .service_options import ServiceOptions

DESCRIPTION = "Serve an exported RD4AD model over HTTP: POST an image, get its verdict, score and mask."


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=DESCRIPTION)
    add = p.add_argument
    s, o = ServiceOptions(), PredictorOptions()
    add("--model_dir", default="", metavar="DIR", help="exported model (default: output/inference/CLS)")
    add("--cls", default="bottle", help="class of the default --model_dir (default: bottle)")
    add("--backend", default=o.backend, choices=BACKEND_NAMES, metavar="NAME",
        help=f"runtime: one of {', '.join(BACKEND_NAMES)} (default: {o.backend})")
    add("--precision", default=o.precision, choices=PRECISION_NAMES, metavar="NAME",
        help=f"one of {', '.join(PRECISION_NAMES)} (default: {o.precision})")
    add("--enable_mkldnn", type=parse_bool, default=True, metavar="BOOL", help="oneDNN on CPU (default: True)")
    add("--workers", type=int, default=s.workers, metavar="N",
        help=f"predictors, one thread each (default: {s.workers})")
    add("--cpu_threads", type=int, default=None, metavar="N",
        help="threads per predictor (default: the cores divided among the workers)")
    add("--queue", type=int, default=s.queue_size, metavar="N",
        help=f"requests that may wait for a worker; beyond them 503 (default: {s.queue_size})")
    add("--timeout", type=float, default=s.timeout_s, metavar="S", help=f"answer within S seconds or 504 "
                                                                       f"(default: {s.timeout_s:g})")
    add("--max_upload_mb", type=float, default=s.max_upload_mb, metavar="MB",
        help=f"larger uploads get 413 (default: {s.max_upload_mb:g})")
    add("--max_pixels", type=int, default=s.max_pixels, metavar="N",
        help=f"images that decode to more pixels get 422 (default: {s.max_pixels})")
    add("--max_batch", type=int, default=s.max_batch, metavar="N",
        help=f"queued images one predictor run may take (default: {s.max_batch})")
    add("--max_wait_ms", type=float, default=s.max_wait_ms, metavar="MS",
        help=f"how long a worker waits to fill its batch (default: {s.max_wait_ms:g})")
    add("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    add("--port", type=int, default=8866, help="port (default: 8866)")
    a = p.parse_args(argv)
    if not a.model_dir:
        a.model_dir = RunPaths("output").export_dir(check_class_name(a.cls))
    return a


def check_args(a: argparse.Namespace) -> tuple[PredictorOptions, ServiceOptions]:
    for flag, value, low in (("--workers", a.workers, 1), ("--queue", a.queue, 1), ("--max_batch", a.max_batch, 1),
                             ("--max_pixels", a.max_pixels, 1), ("--port", a.port, 0)):
        if value < low:
            raise UsageError(f"{flag} {value}: must be at least {low}")
    for flag, value, high in (("--timeout", a.timeout, 3600), ("--max_upload_mb", a.max_upload_mb, 1024)):
        if not 0 < value <= high:
            raise UsageError(f"{flag} {value}: must be a positive number, at most {high}")
    if not 0 <= a.max_wait_ms < 10_000:
        raise UsageError(f"--max_wait_ms {a.max_wait_ms}: must lie in 0..10000")
    if a.port > 65535:
        raise UsageError(f"--port {a.port}: must be at most 65535")
    threads = a.cpu_threads or max(1, (os.cpu_count() or 1) // a.workers)
    if threads < 1:
        raise UsageError(f"--cpu_threads {threads}: must be at least 1")
    options = PredictorOptions(backend=a.backend, precision=a.precision, cpu_threads=threads,
                               enable_mkldnn=a.enable_mkldnn)
    options.check()
    service = ServiceOptions(workers=a.workers, queue_size=a.queue, timeout_s=a.timeout, max_upload_mb=a.max_upload_mb,
                             max_pixels=a.max_pixels, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms)
    return options, service


def run(a: argparse.Namespace) -> int:
    options, service = check_args(a)
    try:
        import uvicorn

        from .service import Inspector, create_app
    except ImportError as err:
        raise UsageError(f"serve.py needs FastAPI and uvicorn ({err}): "
                         "pip install -r requirements-deploy.txt") from None
    inspector = Inspector(read_deployment(a.model_dir), options, service)
    try:
        return _serve(a, inspector, uvicorn, create_app)
    finally:  # whatever ends the run, the predictor processes end with it
        inspector.pool.close()


def _serve(a: argparse.Namespace, inspector, uvicorn, create_app) -> int:
    options, service = inspector.options, inspector.service
    app = create_app(inspector)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=max(service.timeout_s, 1.0), lifespan="off")
    server = uvicorn.Server(config)
    print(f"serving {inspector.model_id} ({options.backend} {options.precision}, {service.workers} worker(s), "
          f"queue {service.queue_size}) on http://{a.host}:{a.port}/", flush=True)
    # uvicorn catches SIGTERM and Ctrl-C while serving (stop accepting, finish the requests in
    # flight) and then raises the signal again for the handler found before it started: a
    # no-op one, so that a requested stop ends with exit status 0 and not death by signal.
    stops = []
    previous = {sig: signal.signal(sig, lambda number, frame: stops.append(number))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped", flush=True)
    return 0 if server.started else 2


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 served and stopped cleanly; 2 a mistake in the settings or the model
    folder (one line), or the port could not be opened."""
    return run_main(lambda: run(parse_args(argv)))
