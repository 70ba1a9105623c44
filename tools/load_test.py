"""Load test of the inspection service (serve.py), on loopback only.

    python tools/load_test.py --model_dir output/inference/bottle --concurrency 4 --seconds 60
    python tools/load_test.py --model_dir ... --concurrency 32 --queue 8      # overload
    python tools/load_test.py --model_dir ... --bad_share 0.2                 # 20% bad uploads
    python tools/load_test.py --quick --model_dir ...                        # CI: 5 s, 4 clients

Starts serve.py on a free 127.0.0.1 port (its flags: --backend, --precision, --workers,
--queue, --max_batch, --max_wait_ms), scores the good images once with infer.py's
predictor path for the expected verdicts, then runs --concurrency clients for --seconds,
each sending one image at a time (a share --bad_share of them broken: not an image,
truncated, a decompression bomb, too large); after a 503 a client waits the Retry-After the
server asked for (--ignore_retry_after: it resends at once). A watcher asks /health every 0.5 s. It prints
throughput, latency p50/p95/p99 of the good answers, answers by status, verdicts that
differ from infer.py's, /health failures and the server's RSS after warm-up and at the end,
then stops the server with SIGTERM. Exit status 1 when a server error (5xx other than
503/504) or a verdict change was seen, or /health failed, or the server did not exit 0.
The clients stop by themselves: every request has a timeout and the run a deadline.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from http.client import HTTPConnection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a script in tools/: the repository's packages by path

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from utils.cli import OneLineArgumentParser  # noqa: E402
from utils.images import IMAGE_EXTENSIONS  # noqa: E402
from utils.runtime import child_environment  # noqa: E402

REQUEST_TIMEOUT_S = 120
OVERSIZE = "oversize.png"  # the server may answer 413 and close before the body is sent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--images", default=os.path.join(ROOT, "sample_data", "bottle", "test"),
                   help="good images to send (a folder, searched recursively)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--warmup_seconds", type=float, default=5.0, help="untimed load before the measured run")
    p.add_argument("--bad_share", type=float, default=0.0, help="share of bad uploads, 0..1")
    p.add_argument("--backend", default="paddle")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--queue", type=int, default=8)
    p.add_argument("--max_batch", type=int, default=1)
    p.add_argument("--max_wait_ms", type=float, default=0.0)
    p.add_argument("--ignore_retry_after", action="store_true",
                   help="clients resend at once after a 503 instead of waiting Retry-After seconds")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--quick", action="store_true", help="5 s, 4 clients, 20%% bad: a smoke test (CI)")
    a = p.parse_args(argv)
    if a.quick:
        a.seconds, a.warmup_seconds, a.concurrency, a.bad_share = 5.0, 1.0, 4, 0.2
    # bounded and self-stopping: every duration finite and at most an hour
    if not 1 <= a.concurrency <= 256:
        p.error(f"--concurrency {a.concurrency}: must lie in 1..256")
    if not 0 < a.seconds <= 3600 or not 0 <= a.warmup_seconds <= 3600:
        p.error(f"--seconds {a.seconds:g} and --warmup_seconds {a.warmup_seconds:g}: must lie in (0, 3600] "
                f"and [0, 3600]")
    if not 0 <= a.bad_share <= 1:
        p.error(f"--bad_share {a.bad_share:g}: must lie in 0..1")
    return a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(port: int, name: str, data: bytes) -> tuple[int, dict, float]:
    """(status, JSON answer, seconds the server asks to wait before retrying)."""
    body, kind = multipart(name, data)
    connection = HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("POST", "/predict", body, {"Content-Type": kind})
        response = connection.getresponse()
        raw = response.read()
        try:
            retry = min(float(response.getheader("retry-after") or 0), 5.0)
        except ValueError:
            retry = 1.0
        try:
            return response.status, json.loads(raw), retry
        except ValueError:
            return response.status, {"error": raw[:200].decode(errors="replace")}, retry
    finally:
        connection.close()


def health(port: int) -> bool:
    connection = HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def bad_uploads() -> list[tuple[str, bytes]]:
    """One of each kind of bad upload the service must turn away without a server error."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((9000, 9000), np.uint8)).save(buf, format="PNG")  # 81 MP: over --max_pixels
    bomb = buf.getvalue()
    good = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(good, format="PNG")
    return [("notes.txt", b"not an image at all"), ("half.png", good.getvalue()[:60]), ("bomb.png", bomb),
            ("empty.png", b""), (OVERSIZE, b"\0" * (3 << 20))]  # 3 MB: over the server's --max_upload_mb 2


def rss_mb(pid: int) -> float | None:
    """RSS of the server and its child processes (the predictor processes), in MB."""
    total, found = 0.0, False
    for process in [pid] + children(pid):
        try:
            with open(f"/proc/{process}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
                        found = True
        except OSError:
            continue
    return total if found else None


def children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        return found
    return found + [g for c in found for g in children(c)]


def expected_verdicts(model_dir: str, paths: list[str]) -> dict[str, str]:
    """What infer.py says of each image (its scores.csv), for comparison."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        folder = os.path.join(out, "images")
        os.makedirs(folder)
        for k, path in enumerate(paths):  # one flat folder: names as the clients send them
            os.symlink(os.path.abspath(path), os.path.join(folder, f"{k:04d}_{os.path.basename(path)}"))
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--model_dir", model_dir, "--image",
                               folder, "--output_dir", os.path.join(out, "infer"), "--save_images", "False"],
                              capture_output=True, text=True, env=child_environment())
        if proc.returncode != 0:
            raise SystemExit(f"error: infer.py failed on the good images: {proc.stderr.strip()[-300:]}")
        import csv
        with open(os.path.join(out, "infer", "scores.csv"), encoding="utf-8") as f:
            return {os.path.basename(r["image"]): r["verdict"] for r in csv.DictReader(f)}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    paths = sorted(os.path.join(d, n) for d, _, names in os.walk(a.images) for n in names
                   if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(d, n)))  # no FIFO
    if not paths:
        print(f"error: {a.images}: no images", file=sys.stderr)
        return 2
    good = [(f"{k:04d}_{os.path.basename(p)}", open(p, "rb").read()) for k, p in enumerate(paths)]
    expected = expected_verdicts(a.model_dir, paths)
    bad = bad_uploads()
    port = free_port()
    # the server's output goes to a file, not a pipe nobody reads while the load runs (a pipe
    # fills at 64 kB and would then stop the server)
    with tempfile.TemporaryFile("w+") as server_log:
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--model_dir", a.model_dir,
                                   "--port", str(port), "--backend", a.backend, "--precision", a.precision,
                                   "--workers", str(a.workers), "--queue", str(a.queue), "--max_batch",
                                   str(a.max_batch), "--max_wait_ms", str(a.max_wait_ms), "--max_upload_mb", "2"],
                                  env=child_environment(), stdout=server_log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + 300
            while not health(port):
                if server.poll() is not None or time.time() > deadline:
                    server_log.seek(0)
                    print(f"error: serve.py did not start: {server_log.read()[-500:]}", file=sys.stderr)
                    return 2
                time.sleep(0.2)
            results = run_load(a, port, good, bad, expected, server.pid)
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
            try:
                exit_code = server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
                exit_code = "killed after 120 s"
    results["server exit status"] = exit_code
    print_report(a, results)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    failed = (results["server errors"] or results["verdict changes"] or results["health failures"]
              or exit_code != 0)
    return 1 if failed else 0


def run_load(a, port: int, good: list, bad: list, expected: dict, pid: int) -> dict:
    lock = threading.Lock()
    statuses: Counter = Counter()
    latencies: list[float] = []
    changes: list[str] = []
    health_failures = [0, 0]  # failures, checks
    measuring = threading.Event()
    stop_at = time.time() + a.warmup_seconds + a.seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.time() < stop_at:
            is_bad = rng.random() < a.bad_share
            name, data = rng.choice(bad) if is_bad else rng.choice(good)
            start = time.perf_counter()
            retry = 0.0
            try:
                status, answer, retry = post(port, name, data)
            except OSError:  # no answer: a failure, unless the upload was over the limit
                status, answer = ("closed on oversize" if name == OVERSIZE else "no answer"), {}
            elapsed = time.perf_counter() - start
            if status == 503 and not a.ignore_retry_after:
                time.sleep(retry)  # as a well-behaved client does
            if not measuring.is_set():
                continue
            with lock:
                statuses[status] += 1
                if status == 200 and not is_bad:
                    latencies.append(elapsed)
                    if answer.get("verdict") != expected.get(name):
                        changes.append(f"{name}: {answer.get('verdict')} (infer.py: {expected.get(name)})")

    def watcher() -> None:
        while time.time() < stop_at:
            ok = health(port)
            with lock:
                health_failures[0] += not ok
                health_failures[1] += 1
            time.sleep(0.5)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(a.concurrency)]
    threads.append(threading.Thread(target=watcher, daemon=True))
    for t in threads:
        t.start()
    time.sleep(a.warmup_seconds)
    rss_start = rss_mb(pid)
    measuring.set()
    began = time.perf_counter()
    for t in threads:
        t.join(timeout=a.warmup_seconds + a.seconds + REQUEST_TIMEOUT_S + 10)
    seconds = time.perf_counter() - began
    rss_end = rss_mb(pid)
    ms = sorted(1000 * t for t in latencies)

    def pct(q: float) -> float | None:
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 1) if ms else None
    server_errors = sum(n for s, n in statuses.items()
                        if s == "no answer" or isinstance(s, int) and s >= 500 and s not in (503, 504))
    return {"concurrency": a.concurrency, "seconds": round(seconds, 1), "bad share": a.bad_share,
            "backend": f"{a.backend} {a.precision}", "workers": a.workers, "queue": a.queue,
            "good answers/s": round(len(latencies) / seconds, 2) if seconds else None,
            "p50 ms": pct(0.50), "p95 ms": pct(0.95), "p99 ms": pct(0.99),
            "p99/p50": round(pct(0.99) / pct(0.50), 2) if ms else None,
            "answers by status": dict(sorted(statuses.items(), key=str)), "server errors": server_errors,
            "verdict changes": len(changes), "verdict change examples": changes[:5],
            "health failures": health_failures[0], "health checks": health_failures[1],
            "server RSS MB after warm-up": None if rss_start is None else round(rss_start, 1),
            "server RSS MB at the end": None if rss_end is None else round(rss_end, 1),
            "RSS growth % (server and its predictor processes)":
                round(100 * (rss_end - rss_start) / rss_start, 2) if rss_start and rss_end else None}


def print_report(a, results: dict) -> None:
    print("\n| figure | value |\n|---|---|")
    for key, value in results.items():
        if key != "verdict change examples" or value:
            print(f"| {key} | {value} |")


if __name__ == "__main__":
    sys.exit(main())
