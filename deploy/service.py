"""The inspection service (serve.py): one image in, verdict, score and mask out, over HTTP.

    POST /predict         an image (multipart field `file`, or the raw bytes as the body);
                          ?pictures=true adds the predicted mask and infer.py's picture
                          (image | ground truth | anomaly map | mask) as base64 PNGs
    POST /predict/batch   several images (multipart fields `files`), one result each
    GET  /health          liveness and the queue's state
    GET  /model           deploy.json's summary: arch, size, thresholds, backend, precision
    GET  /                a page to upload an image and see the result

A fixed pool of predictors (--workers threads, each owning one predictor built by
deploy/predictor.py, as infer.py builds it) takes requests from a bounded queue, so memory
does not grow with load: a full queue answers 503 with Retry-After, a request waiting past
--timeout 504. Uploads over --max_upload_mb get 413 before their body is read; what is not
an image, is truncated or would decode to more than --max_pixels pixels gets 415 or 422.
Verdicts, masks and pictures come from report/per_image.score_image, the code infer.py's
scores.csv rows come from. No request can stop the server: every error is a JSON answer.
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
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile

from dataset import DataError, decode_upload, normalize
from report.per_image import ImageItem, colour_range, score_image
from utils.errors import bounded_line, first_line

from .deployment import Deployment, ModelError
from .predictor import PredictorOptions, UsageError, build_predictor
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
        self.process.start()
        child.close()
        self.provider = self._answer()

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

    def close(self) -> None:
        try:
            self.connection.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()  # it ignores SIGTERM (the parent's business): SIGKILL
            self.process.join(timeout=5)
        self.connection.close()


def _predictor_process(connection, model_dir: str, options: PredictorOptions) -> None:
    """The child's loop: build the predictor, then answer batches until told to stop. Its
    signals are the parent's business: Ctrl-C reaches the whole process group, and the
    parent finishes the requests in flight before it closes the children."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from utils import runtime
    runtime.start()
    from deploy.deployment import read_deployment
    from deploy.predictor import build_predictor as build

    def failure(err: BaseException) -> tuple:
        return "error", (type(err).__name__, f"{bounded_line(first_line(err), 300)}")
    try:
        predictor = build(read_deployment(model_dir), options)
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


@dataclass
class Job:
    image: np.ndarray                 # [3, S, S] normalised
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)


class PredictorPool:
    """`workers` threads, each with its own predictor, serving a queue of at most
    `queue_size` waiting jobs; a worker takes up to `max_batch` jobs per run, waiting at
    most `max_wait_ms` for the batch to fill."""

    def __init__(self, deployment: Deployment, options: PredictorOptions, service: ServiceOptions) -> None:
        self.service = service
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=service.queue_size)
        # every predictor is built before the server listens: a broken export fails at start.
        # Paddle Inference holds the GIL for a whole run (measured: the event loop stalled
        # 580 ms per wide_resnet50_2 image, /health unanswered), so its predictors run in
        # child processes; ONNX Runtime and OpenVINO release it and run in threads here.
        make = SubprocessPredictor if options.backend in GIL_HOLDING_BACKENDS else build_predictor
        self.predictors = []
        try:
            for _ in range(service.workers):
                self.predictors.append(make(deployment, options))
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
        while True:
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
                for j in live:
                    j.future.set_exception(err)
            finally:
                with self._lock:
                    self.busy -= 1

    def close(self, wait_s: float = 60.0) -> None:
        """Let the queued jobs finish (within `wait_s`), then stop the workers and release
        the predictors; a stuck predictor does not keep the process from exiting."""
        for _ in self.threads:
            try:
                self.jobs.put(None, timeout=wait_s)
            except queue.Full:
                break
        for thread in self.threads:
            thread.join(timeout=wait_s)
        for predictor in self.predictors:
            predictor.close()


class ServiceError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Inspector:
    """What every endpoint needs: the deployment, the pool, and how one image is judged."""

    def __init__(self, deployment: Deployment, options: PredictorOptions, service: ServiceOptions) -> None:
        self.deployment, self.options, self.service = deployment, options, service
        self.pool = PredictorPool(deployment, options, service)
        weights = (deployment.files or {}).get("model.pdiparams", {}).get("sha256", "")
        self.model_id = f"rd4ad-{deployment.arch}-{deployment.cls or 'model'}-{weights[:12] or 'unverified'}"

    def summary(self) -> dict:
        d, c = self.deployment, self.deployment.calibration
        return {"model_id": self.model_id, "arch": d.arch, "class": d.cls, "image_size": d.image_size,
                "backend": self.options.backend, "precision": self.options.precision,
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
        """One image: decoded off the event loop, queued, scored, turned into its answer."""
        rgb, (width, height) = await asyncio.to_thread(self.decode, data, name)
        try:
            job = self.pool.submit(normalize(rgb, self.deployment.mean, self.deployment.std))
        except QueueFull:
            raise ServiceError(503, "the queue is full; retry shortly", {"Retry-After": "1"}) from None
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(job.future), max(deadline - time.perf_counter(), 0))
        except (asyncio.TimeoutError, TimeoutError):
            raise ServiceError(504, f"no answer within --timeout {self.service.timeout_s:g} s") from None
        except MemoryError as err:
            raise ServiceError(503, f"out of memory ({first_line(err)}); retry shortly", {"Retry-After": "5"}) from None
        except Exception as err:
            raise ServiceError(500, f"the model failed ({bounded_line(first_line(err), 300)})") from None
        amap, score, inference_ms, queue_ms, batch = result
        return await asyncio.to_thread(self.answer, name, rgb, amap, score, (width, height), pictures,
                                       {"queue_ms": round(queue_ms, 2), "inference_ms": round(inference_ms, 2),
                                        "batch": batch})

    def answer(self, name: str, rgb: np.ndarray, amap: np.ndarray, score: float, size: tuple[int, int],
               pictures: bool, timing: dict) -> dict:
        d = self.deployment
        item = ImageItem(name, name)
        scored = score_image(item, rgb, amap, score, d.calibration, d.score_stats,
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
            "z_score": float(row["z_score"]) if row["z_score"] else None,
            "thresholds": None if c is None else {"image": c.image_threshold, "pixel": c.pixel_threshold},
            "defect_pixels": None if scored.mask is None else int((np.asarray(scored.mask) > 0).sum()),
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


def create_app(inspector: Inspector) -> FastAPI:
    """The FastAPI application over `inspector`."""
    limit = int(inspector.service.max_upload_mb * (1 << 20))
    app = FastAPI(title="RD4AD inspection", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=limit)

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
        except ServiceError as err:
            return error(err.status, err.message, err.headers)
        except Exception as err:  # a bug of ours: the request fails, the server stays
            return error(500, f"internal error ({type(err).__name__}: {bounded_line(str(err), 200)})")

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
            except BodyTooLarge:
                raise
            except Exception as err:  # malformed multipart, too many parts
                raise ServiceError(422, f"cannot read the multipart form ({bounded_line(str(err), 200)})") from None
            files = [v for k, v in form.multi_items() if isinstance(v, UploadFile)]
            if not files:
                raise ServiceError(422, "the form holds no file (send the image as the field 'file')")
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
        return request.query_params.get("pictures", "false").lower() in ("1", "true", "yes")

    @app.post("/predict")
    async def predict(request: Request):
        deadline = time.perf_counter() + inspector.service.timeout_s
        [(name, data)] = await uploads(request, many=False)
        return await inspector.judge(data, name, pictures_wanted(request), deadline)

    @app.post("/predict/batch")
    async def predict_batch(request: Request):
        deadline = time.perf_counter() + inspector.service.timeout_s
        files = await uploads(request, many=True)
        if len(files) > inspector.service.queue_size + inspector.service.workers * inspector.service.max_batch:
            raise ServiceError(413, f"{len(files)} images in one request: more than the queue can ever hold")

        async def one(name: str, data: bytes) -> dict:
            try:
                return {"status": 200, **await inspector.judge(data, name, pictures_wanted(request), deadline)}
            except ServiceError as err:
                return {"status": err.status, "image": name, "error": err.message}
        results = await asyncio.gather(*(one(n, d) for n, d in files))
        return {"results": results, "model_id": inspector.model_id}

    @app.get("/health")
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
        return error(405, f"{request.method} is not allowed on {request.url.path}")

    return app


class BodyTooLarge(Exception):
    """The request body passed --max_upload_mb while it was being read."""


class BodyLimit:
    """ASGI middleware counting every request body as it arrives, chunked and multipart
    ones included (Starlette spools multipart files without a limit of its own)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message
        await self.app(scope, counted, send)


def _safe_name(filename: str | None) -> str:
    """An upload's name for the answer: its base name, printable, bounded."""
    name = os.path.basename((filename or "upload").replace("\\", "/")) or "upload"
    name = "".join(c if c.isprintable() else "?" for c in name)
    return name[:120]
