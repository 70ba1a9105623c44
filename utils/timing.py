"""Stage timings, throughput and memory, reported as PaddlePaddle's AutoLog reports them:
through `auto_log` itself when it is installed, else with the same lines written here."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any

STAGES = ("preprocess", "inference", "postprocess")


class StageTimer:
    """Accumulates wall time per stage (preprocess / inference / postprocess). Given an
    `auto_log.AutoLogger`, it also passes it each batch's boundaries as AutoLog expects
    them: `times.start()`, one `times.stamp()` per stage in STAGES order, `times.end()`."""

    def __init__(self, autolog: Any = None) -> None:
        self.seconds: dict[str, float] = {name: 0.0 for name in STAGES}
        self.images = 0
        self.autolog = autolog

    @contextmanager
    def batch(self):
        """One batch: every stage of STAGES is entered once inside it, in order."""
        if self.autolog is not None:
            self.autolog.times.start()
        yield
        if self.autolog is not None:
            self.autolog.times.end()

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if self.autolog is not None:
                self.autolog.times.stamp()

    def per_image_ms(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {k: 1000.0 * v / n for k, v in self.seconds.items()}


def autolog_logger(info: dict) -> Any:
    """An `auto_log.AutoLogger` for this run when AutoLog is installed (it is not on PyPI:
    pip install from github.com/LDOUBLEV/AutoLog), else None and our own lines are printed.
    `info` holds the run's settings, as for benchmark_report."""
    try:
        import auto_log
    except ImportError as err:
        if getattr(err, "name", None) != "auto_log":  # installed, but one of its own imports failed
            print(f"warning: auto_log is installed but cannot be imported ({err}); "
                  "printing the same report lines without it", file=sys.stderr)
        return None
    size, batch = info["image_size"], info["batch_size"]
    on_gpu = info["device"] == "gpu"
    return auto_log.AutoLogger(
        model_name=info["model_name"], model_precision=info["precision"], batch_size=batch,
        data_shape=[batch, 3, size, size], save_path=None,
        inference_config={"runtime_device": info["device"], "ir_optim": True,
                          "enable_tensorrt": info["use_tensorrt"], "precision": info["precision"],
                          "enable_mkldnn": info["enable_mkldnn"], "cpu_math_library_num_threads": info["cpu_threads"]},
        pids=os.getpid(), process_name=None, gpu_ids=_paddle_gpu_id() if on_gpu else None,
        time_keys=[f"{name}_time" for name in STAGES], warmup=0)


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB -> MB
    except OSError:
        return None
    return None


def gpu_memory_mb(device_id: int | None = None) -> float | None:
    """Memory used by every process on the GPU in use (nvidia-smi --id), or None without a
    GPU. `device_id`: default the one paddle.get_device() names ("gpu:N"; else 0). Not
    mapped: CUDA_VISIBLE_DEVICES (or CUDA_DEVICE_ORDER) can give Paddle's GPU N another
    number in nvidia-smi."""
    if device_id is None:
        device_id = _paddle_gpu_id()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                              f"--id={device_id}"], capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def _paddle_gpu_id() -> int:
    try:
        import paddle
    except ImportError:
        return 0
    name, _, number = paddle.get_device().partition(":")
    return int(number) if name == "gpu" and number.isdigit() else 0


def benchmark_report(info: dict, timer: StageTimer, device: str) -> dict:
    """AutoLog's figures: the run's settings, per-image stage times, ips and memory."""
    ms = timer.per_image_ms()
    total = sum(ms.values())
    return {
        **info,
        "images": timer.images,
        "preprocess_ms": round(ms.get("preprocess", 0.0), 3),
        "inference_ms": round(ms.get("inference", 0.0), 3),
        "postprocess_ms": round(ms.get("postprocess", 0.0), 3),
        "total_ms": round(total, 3),
        "ips": round(1000.0 / total, 3) if total and timer.images else None,  # no image: no rate
        "cpu_rss_mb": _round(_proc_status_mb("VmRSS")),
        "cpu_peak_rss_mb": _round(_proc_status_mb("VmHWM")),
        "gpu_mem_mb": gpu_memory_mb() if device == "gpu" else None,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def format_report(report: dict) -> str:
    """The report as AutoLog prints it (its Env, Paddle, Conf, Model, Data and Perf blocks,
    with `preprocess_time(ms)`, `inference_time(ms)` and `postprocess_time(ms)`), the lines
    TIPC's log analysers read. auto_log itself is not on PyPI, so the lines are written here."""
    import platform

    def value(key: str) -> str:
        v = report.get(key)
        return "None" if v is None else str(v)

    blocks = [
        ("Env info", [f"OS_version: {platform.platform()}", f"python_version: {platform.python_version()}",
                      f"CPU: {platform.processor() or platform.machine()}"]),
        ("Paddle info", [f"paddle_version: {_paddle_version()}", "log_api_version: 1.0"]),
        ("Conf info", [f"runtime_device: {value('device')}", f"backend: {value('backend')}",
                       f"enable_tensorrt: {value('use_tensorrt')}", f"enable_mkldnn: {value('enable_mkldnn')}",
                       f"cpu_math_library_num_threads: {value('cpu_threads')}"]),
        ("Model info", [f"model_name: {value('model_name')}", f"precision: {value('precision')}"]),
        ("Data info", [f"batch_size: {value('batch_size')}",
                       f"input_shape: [{value('batch_size')}, 3, {value('image_size')}, {value('image_size')}]",
                       f"data_num: {value('images')}"]),
        ("Perf info", [f"cpu_rss(MB): {value('cpu_rss_mb')}, gpu_rss(MB): {value('gpu_mem_mb')}, gpu_util: None%",
                       f"total time spent(s): {_seconds(report)}",
                       f"preprocess_time(ms): {value('preprocess_ms')}, inference_time(ms): {value('inference_ms')}, "
                       f"postprocess_time(ms): {value('postprocess_ms')}"]),
    ]
    lines = []
    for title, entries in blocks:
        lines.append(f" {title.center(55, '-').replace(title, ' ' + title + ' ')}")
        lines += [f" {entry}" for entry in entries]
    return "\n".join(lines)


def _seconds(report: dict) -> str:
    total, images = report.get("total_ms"), report.get("images")
    return "None" if total is None or not images else f"{total * images / 1000:.4f}"


def _paddle_version() -> str:
    try:
        import paddle
    except ImportError:
        return "None"
    return paddle.__version__
