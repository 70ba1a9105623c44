"""A small equivalent of PaddlePaddle's AutoLog: stage timings, throughput and memory."""
from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager


class StageTimer:
    """Accumulates wall time per stage (preprocess / inference / postprocess)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"preprocess": 0.0, "inference": 0.0, "postprocess": 0.0}
        self.images = 0

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def per_image_ms(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {k: 1000.0 * v / n for k, v in self.seconds.items()}


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB -> MB
    except OSError:
        return None
    return None


def gpu_memory_mb() -> float | None:
    """Memory used on GPU 0 by every process (nvidia-smi), or None without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


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
    width = max(len(k) for k in report)
    lines = ["----------------------- benchmark -----------------------"]
    lines += [f"{k.ljust(width)} : {'n/a' if v is None else v}" for k, v in report.items()]
    return "\n".join(lines)
