"""`python serve.py`: the inspection service over an exported model (deploy/service.py)."""
from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
from collections.abc import Sequence

from engine.paths import no_model_for_class
from utils.cli import run_main

from .command_lines import MAX_WORKERS, parse_serve_args
from .deployment import read_deployment
from .precision import auto_options
from .predictor import PredictorOptions, UsageError, check_auto_band
from .service_options import ServiceOptions




def check_args(a: argparse.Namespace) -> tuple[PredictorOptions, ServiceOptions]:
    for flag, value, low, high in (("--workers", a.workers, 1, MAX_WORKERS), ("--queue", a.queue, 1, 10_000),
                                   ("--max_batch", a.max_batch, 1, 256), ("--max_pixels", a.max_pixels, 1, 1 << 31),
                                   ("--port", a.port, 0, 65535)):
        if not low <= value <= high:
            raise UsageError(f"{flag} {value}: must lie in {low}..{high}")
    if a.cpu_threads is not None and not 1 <= a.cpu_threads <= 1024:
        raise UsageError(f"--cpu_threads {a.cpu_threads}: must lie in 1..1024")
    for flag, value, high in (("--timeout", a.timeout, 3600), ("--max_upload_mb", a.max_upload_mb, 1024),
                              ("--upload_timeout", a.upload_timeout, 3600)):
        if not 0 < value <= high:
            raise UsageError(f"{flag} {value}: must be a positive number, at most {high}")
    if not 0 <= a.max_wait_ms <= 10_000:
        raise UsageError(f"--max_wait_ms {a.max_wait_ms}: must lie in 0..10000")
    if a.max_batch > 1 and a.max_wait_ms / 1000 >= a.timeout:
        print(f"warning: --max_wait_ms {a.max_wait_ms:g} is not below --timeout {a.timeout:g} s: a request that "
              f"waits alone for its batch to fill gets 504", file=sys.stderr)
    if not 0 <= a.max_open_uploads <= 100_000:
        raise UsageError(f"--max_open_uploads {a.max_open_uploads}: must lie in 0..100000")
    threads = a.cpu_threads or max(1, (os.cpu_count() or 1) // a.workers)
    options = PredictorOptions(backend=a.backend, precision=a.precision, cpu_threads=threads,
                               enable_mkldnn=a.enable_mkldnn, recheck_band=a.recheck_band)
    if a.precision == "auto":  # chosen once deploy.json is read
        check_auto_band(a.recheck_band)
    else:
        options.check()
    service = ServiceOptions(workers=a.workers, queue_size=a.queue, timeout_s=a.timeout, max_upload_mb=a.max_upload_mb,
                             max_pixels=a.max_pixels, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms,
                             upload_timeout_s=a.upload_timeout, max_open_uploads=a.max_open_uploads)
    return options, service


def say(line: str) -> None:
    """A status line on stdout. A reader that went away (`serve.py | head -1`, waiting for
    the "serving" line) does not stop the service: its later lines go nowhere."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class StopRequested(Exception):
    """SIGTERM or Ctrl-C before the server listened, or a second one while it stopped."""


def _stop(number: int, frame) -> None:
    raise StopRequested(signal.Signals(number).name)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the model loads: a port in use is one line at
    once, and --port 0 gets a free port that the "serving" line then names."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise UsageError(f"--host {host}: not an address of this machine ({err})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        hint = "; choose another --port" if err.errno == errno.EADDRINUSE else ""
        raise UsageError(f"--host {host} --port {port}: cannot listen ({err.strerror}){hint}") from None
    sock.set_inheritable(False)
    return sock


def run(a: argparse.Namespace) -> int:
    options, service = check_args(a)
    missing = None if a.model_given else no_model_for_class("output", a.cls)
    if missing:
        raise UsageError(missing)
    try:
        from .service import Inspector  # FastAPI and uvicorn
    except ImportError as err:
        raise UsageError(f"serve.py needs FastAPI and uvicorn ({err}): "
                         "pip install -r requirements-deploy.txt") from None
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    inspector = None
    try:
        sock = listen(a.host, a.port)
        with sock:
            deployment = read_deployment(a.model_dir)
            if options.precision == "auto":
                options, line = auto_options(deployment, options, a.backend_given)
                say(line)
            recheck = f" + fp32 recheck within {options.recheck_band:.4g}" if options.recheck_band else ""
            say(f"loading {a.model_dir} ({options.backend} {options.precision}{recheck}, {service.workers} "
                f"worker(s))")
            inspector = Inspector(deployment, options, service, progress=say)
            return _serve(a, sock, inspector)
    except StopRequested as stop:
        say(f"stopped ({stop}) before serving")
        return 0
    finally:  # whatever ends the run, the predictor processes end with it
        try:
            if inspector is not None:
                inspector.pool.close()
        except StopRequested:  # another signal while waiting: stop without waiting
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            inspector.pool.close(wait_s=0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(a: argparse.Namespace, sock: socket.socket, inspector) -> int:
    import uvicorn

    from .service import GuardedH11Protocol, InspectionServer, create_app
    options, service = inspector.options, inspector.service
    GuardedH11Protocol.header_timeout_s = service.upload_timeout_s
    # our access log (one line per request, with the verdict) instead of uvicorn's
    config = uvicorn.Config(create_app(inspector, access_log=say), log_level="warning", access_log=False,
                            http=GuardedH11Protocol,
                            ws="none",  # no WebSocket endpoint: an upgrade request is a plain HTTP one
                            timeout_graceful_shutdown=max(service.timeout_s, 1.0), lifespan="off")
    host, port = sock.getsockname()[:2]
    where = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    recheck = f" + fp32 recheck within {options.recheck_band:.4g}" if options.recheck_band else ""
    serving = (f"serving {inspector.model_id} ({options.backend} {options.precision}{recheck}, {service.workers} "
               f"worker(s), queue {service.queue_size}) on {where}")
    server = InspectionServer(config, say, serving)
    # uvicorn catches SIGTERM and Ctrl-C while serving (stop accepting, finish the requests in
    # flight) and then raises the signal again for the handler found before it started: a
    # no-op one, so that a requested stop ends with exit status 0 and not death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: None)
    server.run(sockets=[sock])
    # from here a signal means "now": the queue is not waited for (run()'s finally)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    if server.force_exit:
        inspector.pool.close(wait_s=0)  # the queued requests' answers have nobody to go to
        say("stopped at a second signal, without finishing the requests in flight")
    else:
        say("stopped")
    return 0 if server.started else 2


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 served and stopped cleanly (SIGTERM or Ctrl-C, also before serving);
    2 a mistake in the settings or the model folder, or the port could not be opened
    (one line)."""
    return run_main(lambda: run(parse_serve_args(argv)))
