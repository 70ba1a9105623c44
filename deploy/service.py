"""The inspection service (serve.py): one image in, verdict, score and mask out, over HTTP.

    POST /predict         an image (multipart field `file`, or the raw bytes as the body);
                          ?pictures=true adds the predicted mask and infer.py's picture
                          (image | ground truth | anomaly map | mask) as base64 PNGs
    POST /predict/batch   several images (multipart fields `files`), one result each
    GET  /health          liveness and the queue's state
    GET  /model           deploy.json's summary: arch, size, thresholds, backend, precision
    GET  /                a page to upload an image and see the result

A fixed pool of predictors (--workers, each owning one predictor built by
deploy/predictor.py, as infer.py builds it: Paddle's in a child process each, the others
in a thread each) takes requests from a bounded queue, so memory does not grow with load:
a full queue answers 503 with Retry-After, a request waiting past --timeout 504. Uploads
over --max_upload_mb get 413 (from Content-Length, or counted as the body arrives); what
is not an image, is truncated or would decode to more than --max_pixels pixels gets 415 or
422. A request's headers and then its body must each arrive within --upload_timeout
(slow-loris clients: the connection is closed, or 408). Verdicts, masks and pictures come
from report/per_image.score_image, the code infer.py's scores.csv rows come from. No
request can stop the server: every error is a JSON answer, a garbled request's 400 too.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import h11
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from uvicorn.protocols.http.h11_impl import H11Protocol

from dataset import DataError, decode_upload, normalize
from report.per_image import ImageItem, colour_range, score_image
from utils import runtime
from utils.errors import bounded_line, first_line

from .deployment import Deployment, ModelError
from .predictor import PredictorOptions, UsageError, build_predictor, warm_up
from .service_options import ServiceOptions

IMAGE_TYPES = ("image/", "application/octet-stream")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "service_page.html")


GIL_HOLDING_BACKENDS = ("paddle",)


class SubprocessPredictor:
    """A predictor in a child process of its own (spawned), called like one: the batch goes
    through a pipe and the answer comes back, while this process's GIL stays free."""

    def __init__(self, deployment: Deployment, options: PredictorOptions) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_predictor_process, args=(child, deployment.folder, options),
                                       name="rd4ad-predictor", daemon=True)
        with _environment(runtime.child_environment(PYTHONWARNINGS="ignore:No ccache found")):
            self.process.start()  # a spawned child reads the environment at its start
        child.close()
        self.closed = False
        try:
            self.provider = self._answer()
        except BaseException:  # a failed build, or a stop while the model loads
            self.close(wait_s=0)
            raise

    def _answer(self):
        try:
            kind, payload = self.connection.recv()
        except (EOFError, OSError):
            raise ModelError(f"the predictor process stopped (exit status {self.process.exitcode})") from None
        if kind == "ok":
            return payload
        error_type, message = payload
        raise {"MemoryError": MemoryError, "UsageError": UsageError}.get(error_type, ModelError)(message)

    def alive(self) -> bool:
        return self.process.is_alive()

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.connection.send(images)
        return self._answer()

    def close(self, wait_s: float = 10.0) -> None:
        """Ask the child to stop, and kill it if it has not within `wait_s`."""
        if self.closed:
            return
        self.closed = True
        try:
            self.connection.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=wait_s)
        if self.process.is_alive():
            self.process.kill()  # it ignores SIGTERM (the parent's business): SIGKILL
            self.process.join(timeout=5)
        self.connection.close()


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _predictor_process(connection, model_dir: str, options: PredictorOptions) -> None:
    """The child's loop: build the predictor, then answer batches until told to stop. Its
    signals are the parent's business: Ctrl-C reaches the whole process group, and the
    parent finishes the requests in flight before it closes the children."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    runtime.start()
    from deploy.deployment import read_deployment
    from deploy.predictor import build_predictor as build

    def failure(err: BaseException) -> tuple:
        return "error", (type(err).__name__, f"{bounded_line(first_line(err), 300)}")
    try:
        deployment = read_deployment(model_dir)
        predictor = build(deployment, options)
        warm_up(predictor, np.zeros((1, 3, deployment.image_size, deployment.image_size), np.float32))
        connection.send(("ok", predictor.provider))
    except BaseException as err:
        connection.send(failure(err))
        return
    while True:
        try:
            images = connection.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if images is None:
            predictor.close()
            return
        try:
            connection.send(("ok", predictor(images)))
        except BaseException as err:  # the batch fails, never the child
            connection.send(failure(err))


class QueueFull(Exception):
    """The bounded queue has no room: the client should retry later (503)."""


class PredictorDied(Exception):
    """A predictor process stopped: its worker takes no more jobs (503; /health degraded)."""


@dataclass
class Job:
    image: np.ndarray                 # [3, S, S] normalised
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)


class PredictorPool:
    """`workers` threads, each with its own predictor, serving a queue of at most
    `queue_size` waiting jobs; a worker takes up to `max_batch` jobs per run, waiting at
    most `max_wait_ms` for the batch to fill."""

    def __init__(self, deployment: Deployment, options: PredictorOptions, service: ServiceOptions,
                 progress: Callable[[str], None] | None = None) -> None:
        self.service = service
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=service.queue_size)
        # every predictor is built before the server listens: a broken export fails at start.
        # Paddle Inference holds the GIL for a whole run (measured: the event loop stalled
        # 580 ms per wide_resnet50_2 image, /health unanswered), so its predictors run in
        # child processes; ONNX Runtime and OpenVINO release it and run in threads here.
        make = SubprocessPredictor if options.backend in GIL_HOLDING_BACKENDS else build_predictor
        self.predictors = []
        try:
            for k in range(service.workers):
                started = time.perf_counter()
                self.predictors.append(make(deployment, options))
                if make is build_predictor:  # a predictor process warms itself up
                    size = deployment.image_size
                    warm_up(self.predictors[-1], np.zeros((1, 3, size, size), np.float32))
                if progress is not None:  # start-up can take a while: say how far it is
                    progress(f"predictor {k + 1} of {service.workers} ready ({time.perf_counter() - started:.1f} s)")
        except BaseException:
            for predictor in self.predictors:
                predictor.close()
            raise
        self.provider = self.predictors[0].provider
        self.busy = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, args=(p,), name=f"predictor-{k}", daemon=True)
                        for k, p in enumerate(self.predictors)]
        for thread in self.threads:
            thread.start()

    def submit(self, image: np.ndarray) -> Job:
        if not self.alive():
            raise PredictorDied("every predictor process has stopped")
        job = Job(image)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    def waiting(self) -> int:
        return self.jobs.qsize()

    def alive(self) -> int:
        """Workers whose predictor can still answer (a predictor process may have died)."""
        return sum(getattr(p, "alive", lambda: True)() for p in self.predictors)

    def _work(self, predictor) -> None:
        alive = getattr(predictor, "alive", lambda: True)
        while alive():  # a dead predictor's worker stops taking jobs: the live ones get them
            job = self.jobs.get()
            if job is None:
                return
            batch = [job]
            deadline = time.perf_counter() + self.service.max_wait_ms / 1000
            while len(batch) < self.service.max_batch:
                try:
                    more = self.jobs.get(timeout=max(deadline - time.perf_counter(), 0)) \
                        if self.service.max_wait_ms > 0 else self.jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # closing: finish this batch, then stop
                    self.jobs.put(None)
                    break
                batch.append(more)
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]  # a timed-out job is dropped
            if not live:
                continue
            with self._lock:
                self.busy += 1
            start = time.perf_counter()
            try:
                maps, scores = predictor(np.stack([j.image for j in live]))
                ms = 1000 * (time.perf_counter() - start)
                for k, j in enumerate(live):
                    j.future.set_result((maps[k], float(scores[k]), ms, 1000 * (start - j.queued), len(live)))
            except BaseException as err:  # the request fails, never the worker
                if not alive():
                    err = PredictorDied(f"a predictor process stopped ({first_line(err)})")
                for j in live:
                    j.future.set_exception(err)
            finally:
                with self._lock:
                    self.busy -= 1

    def close(self, wait_s: float = 60.0) -> None:
        """Let the queued jobs finish (within `wait_s`; 0: not at all), then stop the workers
        and release the predictors; a stuck predictor does not keep the process from exiting."""
        if wait_s == 0:  # nobody waits for these answers any more
            while True:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.future.cancel()
        for _ in self.threads:
            try:
                self.jobs.put(None, timeout=wait_s)
            except queue.Full:
                break
        for thread in self.threads:
            thread.join(timeout=wait_s)
        for predictor in self.predictors:
            if isinstance(predictor, SubprocessPredictor):
                predictor.close(wait_s=min(wait_s, 10.0))
            else:
                predictor.close()  # idempotent: a second stop may call it again


class ServiceError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Inspector:
    """What every endpoint needs: the deployment, the pool, and how one image is judged."""

    def __init__(self, deployment: Deployment, options: PredictorOptions, service: ServiceOptions,
                 progress: Callable[[str], None] | None = None) -> None:
        self.deployment, self.options, self.service = deployment, options, service
        self.pool = PredictorPool(deployment, options, service, progress)
        # decoding a 40 MP frame takes hundreds of MB: so few decode at once, whatever the load
        self.decode_slots = asyncio.Semaphore(max(2, service.workers))
        weights = (deployment.files or {}).get("model.pdiparams", {}).get("sha256", "")
        self.model_id = f"{deployment.model}-{deployment.arch}-{deployment.cls or 'model'}-{weights[:12] or 'unverified'}"

    def summary(self) -> dict:
        d, c = self.deployment, self.deployment.calibration
        return {"model_id": self.model_id, "model": d.model, "arch": d.arch, "class": d.cls, "image_size": d.image_size,
                "backend": self.options.backend, "precision": self.options.precision,
                "recheck_band": self.options.recheck_band or None,
                "int8_score_bias": d.int8_score_bias.get(self.options.backend)
                if self.options.precision == "int8" else None,
                "provider": self.pool.provider, "workers": self.service.workers,
                "thresholds": None if c is None else {"image": c.image_threshold, "pixel": c.pixel_threshold},
                "max_upload_mb": self.service.max_upload_mb, "queue_size": self.service.queue_size,
                "max_batch": self.service.max_batch}

    def decode(self, data: bytes, name: str) -> tuple[np.ndarray, tuple[int, int]]:
        try:
            return decode_upload(data, name, self.deployment.image_size, self.service.max_pixels)
        except DataError as err:
            raise ServiceError(422, str(err)) from None

    async def judge(self, data: bytes, name: str, pictures: bool, deadline: float) -> dict:
        """One image: decoded off the event loop (a few at a time), queued, scored, turned
        into its answer. `deadline` counts from the end of the upload."""
        arrived = time.perf_counter()
        if self.pool.waiting() >= self.service.queue_size:  # refused before the costly decode
            raise ServiceError(503, "the queue is full; retry shortly", {"Retry-After": "1"})
        try:
            await asyncio.wait_for(self.decode_slots.acquire(), max(deadline - time.perf_counter(), 0))
        except (asyncio.TimeoutError, TimeoutError):
            raise ServiceError(504, f"no answer within --timeout {self.service.timeout_s:g} s") from None
        try:
            rgb, (width, height) = await asyncio.to_thread(self.decode, data, name)
        finally:
            self.decode_slots.release()
        decoded = time.perf_counter()
        try:
            job = self.pool.submit(normalize(rgb, self.deployment.mean, self.deployment.std))
        except QueueFull:
            raise ServiceError(503, "the queue is full; retry shortly", {"Retry-After": "1"}) from None
        except PredictorDied as err:
            raise ServiceError(503, f"{err}; see /health", {"Retry-After": "5"}) from None
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(job.future), max(deadline - time.perf_counter(), 0))
        except (asyncio.TimeoutError, TimeoutError):
            raise ServiceError(504, f"no answer within --timeout {self.service.timeout_s:g} s") from None
        except MemoryError as err:
            raise ServiceError(503, f"out of memory ({first_line(err)}); retry shortly", {"Retry-After": "5"}) from None
        except PredictorDied as err:
            raise ServiceError(503, f"{err}; retry shortly, see /health", {"Retry-After": "5"}) from None
        except Exception as err:
            raise ServiceError(500, f"the model failed ({bounded_line(first_line(err), 300)})") from None
        amap, score, inference_ms, queue_ms, batch = result
        timing = {"decode_ms": round(1000 * (decoded - arrived), 2), "queue_ms": round(queue_ms, 2),
                  "inference_ms": round(inference_ms, 2), "batch": batch}
        answer = await asyncio.to_thread(self.answer, name, rgb, amap, score, (width, height), pictures, timing)
        timing["total_ms"] = round(1000 * (time.perf_counter() - arrived), 2)  # from the end of the upload
        return answer

    def answer(self, name: str, rgb: np.ndarray, amap: np.ndarray, score: float, size: tuple[int, int],
               pictures: bool, timing: dict) -> dict:
        d = self.deployment
        item = ImageItem(name, name)
        scored = score_image(item, rgb, amap, score, d.calibration,
                             colour_range(d.calibration, d.score_stats, amap), picture=pictures)
        row = scored.row
        if row["error"]:  # a score that is not finite is never a verdict
            raise ServiceError(500, f"{name}: the model's output is not finite: no verdict")
        c = d.calibration
        answer = {
            "image": name, "width": size[0], "height": size[1], "model_id": self.model_id,
            "score": float(row["score"]),
            "normalized_score": float(row["normalized_score"]) if row["normalized_score"] else None,
            "verdict": row["verdict"] or None,
            "thresholds": None if c is None else {"image": c.image_threshold, "pixel": c.pixel_threshold},
            # the mask is the model's S x S grid (the image resized to it): counted there
            "mask_size": [d.image_size, d.image_size],
            "defect_pixels": None if scored.mask is None else int((np.asarray(scored.mask) > 0).sum()),
            "defect_fraction": None if scored.mask is None else round(float((np.asarray(scored.mask) > 0).mean()), 6),
            "timing": timing,
        }
        if pictures:
            answer["mask_png"] = None if scored.mask is None else _png_base64(scored.mask)
            answer["picture_png"] = _png_base64(scored.picture)
        return answer


def _png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def create_app(inspector: Inspector, access_log: Callable[[str], None] | None = None) -> FastAPI:
    """The FastAPI application over `inspector`; `access_log` hears one line per request."""
    limit = int(inspector.service.max_upload_mb * (1 << 20))
    app = FastAPI(title="RD4AD inspection", docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)  # a redirect would name whatever Host the client sent
    service = inspector.service
    app.add_middleware(BodyLimit, limit=limit, seconds=service.upload_timeout_s,
                       open_uploads=service.max_open_uploads or 2 * (service.queue_size + service.workers
                                                                     * service.max_batch))

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """413 before a too-large body is read; any failure a JSON answer, never a crash."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return error(413, f"upload of {length} bytes is over --max_upload_mb {inspector.service.max_upload_mb:g}")
        try:
            return await call_next(request)
        except BodyTooLarge:
            return error(413, f"upload over --max_upload_mb {inspector.service.max_upload_mb:g}")
        except UploadTooSlow:
            return error(408, f"the upload did not arrive within --upload_timeout "
                              f"{inspector.service.upload_timeout_s:g} s", {"Connection": "close"})
        except ServiceError as err:
            return error(err.status, err.message, err.headers)
        except Exception as err:  # a bug of ours: the request fails, the server stays
            return error(500, f"internal error ({type(err).__name__}: {bounded_line(str(err), 200)})")

    app.add_middleware(StopGuard)  # added after the guard, so outside it: its cancellation ends here
    if access_log is not None:
        app.add_middleware(AccessLog, log=access_log)  # outermost: every answer, the guards' included

    async def read_body(request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():  # a chunked upload has no Content-Length
            body += chunk
            if len(body) > limit:
                raise ServiceError(413, f"upload over --max_upload_mb {inspector.service.max_upload_mb:g}")
        return bytes(body)

    async def uploads(request: Request, many: bool) -> list[tuple[str, bytes]]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            try:
                form = await request.form(max_files=inspector.service.max_files, max_fields=16,
                                          max_part_size=limit)
            except (BodyTooLarge, UploadTooSlow):
                raise
            except Exception as err:  # malformed multipart, too many parts
                reason = str(getattr(err, "detail", err))  # Starlette's HTTPException: without its "400: "
                too_many = "Too many files" in reason
                raise ServiceError(413 if too_many else 422, f"more than {inspector.service.max_files} files in one "
                                   f"request" if too_many else f"cannot read the multipart form "
                                                               f"({bounded_line(reason, 200)})") from None
            field = "files" if many else "file"
            files = [v for k, v in form.multi_items() if isinstance(v, UploadFile)]
            if not files:
                seen = ", ".join(sorted({_safe_name(k) for k, _ in form.multi_items()})[:8])
                raise ServiceError(422, f"the form holds no file: send the image as the file field '{field}', "
                                        f"e.g. curl -F {field}=@IMAGE (" + (
                                            f"text fields received: {seen}" if seen else
                                            "no complete field received: a truncated body?") + ")")
            if not many and len(files) > 1:
                raise ServiceError(422, f"{len(files)} files sent to /predict; use /predict/batch")
            return [(_safe_name(f.filename), await f.read()) for f in files]
        if many:
            raise ServiceError(415, "/predict/batch takes multipart/form-data with fields 'files'")
        if not kind.startswith(IMAGE_TYPES):
            raise ServiceError(415, f"content type {kind or 'none'!r} is not an image; send image/* bytes or a "
                                    f"multipart form")
        return [("upload", await read_body(request))]

    def pictures_wanted(request: Request) -> bool:
        value = request.query_params.get("pictures", "false").lower()
        if value not in ("1", "true", "yes", "0", "false", "no"):
            raise ServiceError(422, f"?pictures={bounded_line(value, 40)}: must be true or false")
        return value in ("1", "true", "yes")

    @app.post("/predict")
    async def predict(request: Request):
        pictures = pictures_wanted(request)
        [(name, data)] = await uploads(request, many=False)
        answer = await inspector.judge(data, name, pictures, time.perf_counter() + inspector.service.timeout_s)
        request.state.verdict = answer["verdict"] or "no verdict"  # for the access log
        return answer

    @app.post("/predict/batch")
    async def predict_batch(request: Request):
        pictures = pictures_wanted(request)
        files = await uploads(request, many=True)
        deadline = time.perf_counter() + inspector.service.timeout_s
        room = batch_room(inspector.service)
        if len(files) > room:
            raise ServiceError(413, f"{len(files)} images in one request: more than the {room} the queue holds "
                                    f"(--queue)")

        async def one(name: str, data: bytes) -> dict:
            try:
                return {"status": 200, **await inspector.judge(data, name, pictures, deadline)}
            except ServiceError as err:
                return {"status": err.status, "image": name, "error": err.message}
        results = await asyncio.gather(*(one(n, d) for n, d in files))
        verdicts = [r.get("verdict") or ("error" if r["status"] != 200 else "no verdict") for r in results]
        request.state.verdict = " ".join(f"{verdicts.count(v)} {v}" for v in sorted(set(verdicts)))
        retry = {"Retry-After": "1"} if any(r["status"] == 503 for r in results) else None
        return JSONResponse({"results": results, "model_id": inspector.model_id}, headers=retry)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        alive, workers = inspector.pool.alive(), inspector.service.workers
        answer = {"status": "ok" if alive == workers else "degraded", "waiting": inspector.pool.waiting(),
                  "busy_workers": inspector.pool.busy, "workers": workers, "alive_workers": alive,
                  "queue_size": inspector.service.queue_size}
        return answer if alive == workers else JSONResponse(answer, status_code=503)

    @app.get("/model")
    async def model():
        return inspector.summary()

    @app.get("/")
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            # "<" escaped: a class name from deploy.json can never close the page's <script>
            model = json.dumps(inspector.summary()).replace("<", "\\u003c")
            return HTMLResponse(f.read().replace("{{MODEL}}", model))

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return error(404, f"no such endpoint: {request.url.path}")

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc):
        return error(405, f"{request.method} is not allowed on {request.url.path}", getattr(exc, "headers", None))

    return app


class BodyTooLarge(Exception):
    """The request body passed --max_upload_mb while it was being read."""


class UploadTooSlow(Exception):
    """The request body did not arrive within --upload_timeout (a slow-loris client)."""


class BodyLimit:
    """ASGI middleware counting every request body as it arrives, chunked and multipart
    ones included (Starlette spools multipart files without a limit of its own), giving it
    `seconds` to arrive in full, and holding at most `open_uploads` requests with a body at
    once (each may hold --max_upload_mb in memory until it is answered): beyond, 503."""

    def __init__(self, app, limit: int, seconds: float, open_uploads: int) -> None:
        self.app, self.limit, self.seconds, self.open_uploads = app, limit, seconds, open_uploads
        self.open = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if self.open >= self.open_uploads:
            body = json.dumps({"error": f"{self.open} uploads in progress already; retry shortly",
                               "status": 503}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.open += 1
        try:
            await self._counted(scope, receive, send)
        finally:
            self.open -= 1

    async def _counted(self, scope, receive, send) -> None:
        seen, complete = 0, False
        deadline = time.monotonic() + self.seconds

        async def counted():
            nonlocal seen, complete
            if complete:  # after the body only a disconnect can come: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except (asyncio.TimeoutError, TimeoutError):
                raise UploadTooSlow from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
                complete = not message.get("more_body", False)
            return message
        await self.app(scope, counted, send)


class AccessLog:
    """ASGI middleware: one line per request, as uvicorn's access log gives it: method, path,
    status, milliseconds and, for /predict, the verdict ("POST /predict 200 41 ms DEFECT").
    The path is the client's: shown printable and bounded, so it can forge no log line."""

    def __init__(self, app, log: Callable[[str], None]) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), ["-"]
        state = scope.setdefault("state", {})  # where an endpoint leaves its verdict (request.state)

        async def tracked(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, tracked)
        finally:
            path = "".join(c if c.isprintable() and c != " " else "?" for c in scope.get("path", ""))[:200]
            verdict = state.get("verdict")
            self.log(f"{scope.get('method', '-')} {path} {status[0]} {1000 * (time.perf_counter() - started):.0f} ms"
                     + (f" {verdict}" if verdict else ""))


class StopGuard:
    """ASGI middleware for a stop that cannot wait for a request any longer (uvicorn cancels
    it after --timeout of grace, or at a second SIGTERM): the client gets a JSON 503 if no
    answer has started, and the cancellation ends the request quietly, not as a traceback."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if scope["type"] == "http" and not started:
                body = json.dumps({"error": "the server is stopping; retry shortly", "status": 503}).encode()
                try:
                    await send({"type": "http.response.start", "status": 503,
                                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5"),
                                            (b"connection", b"close"), (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                except Exception:  # the connection went first
                    pass


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request's headers: a client
    that opens a connection and then sends nothing, or its headers a byte at a time, is
    closed after `header_timeout_s` instead of holding the connection for ever."""

    header_timeout_s = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._await_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is None or self.cycle.response_complete:  # no pipelined request started
            self._await_headers()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        waiting_since = self.cycle  # a request whose headers are complete replaces it

        def expire() -> None:
            if self.cycle is waiting_since and not self.transport.is_closing():
                self.transport.close()
        self._header_timer = self.loop.call_later(self.header_timeout_s, expire)

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse gets the JSON error every other failure gets (or, when
        an answer has gone out already, the connection is just closed)."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.close()
            return
        body = json.dumps({"error": f"not an HTTP/1.1 request ({msg})", "status": 400}).encode()
        for event in (h11.Response(status_code=400, reason=b"Bad Request",
                                   headers=[(b"content-type", b"application/json"), (b"connection", b"close"),
                                            (b"content-length", str(len(body)).encode())]),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class InspectionServer(uvicorn.Server):
    """uvicorn's server, saying `serving_line` once it listens, and stopping at once at a
    second SIGTERM as uvicorn does at a second Ctrl-C."""

    def __init__(self, config: uvicorn.Config, say, serving_line: str) -> None:
        super().__init__(config)
        self.say, self.serving_line = say, serving_line

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.say(self.serving_line)

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:
            self.force_exit = True
        super().handle_exit(sig, frame)


def batch_room(service: ServiceOptions) -> int:
    """The images one /predict/batch may hold: all of them fit in the queue at once."""
    return min(service.max_files, service.queue_size)


def _safe_name(filename: str | None) -> str:
    """An upload's name for the answer: its base name, printable, bounded."""
    name = os.path.basename((filename or "upload").replace("\\", "/")) or "upload"
    name = "".join(c if c.isprintable() else "?" for c in name)
    return name[:120]
