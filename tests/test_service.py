"""serve.py through a real server on a free loopback port: good images (the same verdicts
and scores as infer.py), every kind of bad upload, a full queue, a timeout, SIGTERM with a
request in flight, and the server still answering after all of it."""
import base64
import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.client import HTTPConnection

import numpy as np
import paddle
import pytest
from PIL import Image

import export_model
import infer
from conftest import ROOT
from engine.checkpoint import save_checkpoint
from model import build_rd4ad
from report.pictures import layout
from utils.runtime import child_environment

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SIZE = 64
TEST_DIR = os.path.join(ROOT, "sample_data", "bottle", "test")
GOOD = os.path.join(TEST_DIR, "good", "000.png")
CRACK = os.path.join(ROOT, "sample_data", "bottle", "test", "crack", "000.png")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An export whose image threshold is the median score of the sample test images, so
    that verdicts split (and the pixel threshold just below it, so that masks show)."""
    root = tmp_path_factory.mktemp("served")
    paddle.seed(11)
    net = build_rd4ad("resnet18", teacher_weights="none")
    ckpt = str(root / "bottle" / "model.pdparams")
    save_dir = str(root / "inference")

    def export(threshold):
        calibration = {"image_threshold": threshold, "pixel_threshold": threshold - 0.05, "image_low": threshold - 0.1,
                       "pixel_low": threshold - 0.2, "quantile": 0.995, "count": 4, "source": "validation"}
        save_checkpoint(ckpt, net, arch="resnet18", image_size=SIZE, epoch=1, cls="bottle", teacher_weights="none",
                        extra={"calibration": calibration, "score_stats": {"mean": threshold, "std": 0.02}})
        assert export_model.main(["--checkpoint", ckpt, "--save_dir", save_dir]) == 0
    export(1.0)
    from dataset import index_test_dir, load_image
    from deploy.deployment import read_deployment
    from deploy.predictor import PredictorOptions, build_predictor
    predictor = build_predictor(read_deployment(save_dir), PredictorOptions())
    images = [load_image(s.image_path, SIZE) for s in index_test_dir(TEST_DIR, None)]
    scores = [float(predictor(image[None])[1][0]) for image in images]
    export(round(float(np.median(scores)), 6))
    return save_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, *flags):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--model_dir", model_dir,
                                      "--port", str(self.port), *flags], cwd=ROOT, env=child_environment(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("server stopped: " + self.proc.stdout.read())
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("server did not start")

    def request(self, method, path, body=None, headers=None, timeout=60):
        connection = HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read()
            return response.status, json.loads(data) if response.getheader("content-type", "").startswith(
                "application/json") else data.decode(), dict(response.getheaders())
        finally:
            connection.close()

    def get(self, path):
        return self.request("GET", path)

    def post_file(self, path, data, name="image.png", field="file", query=""):
        body, kind = multipart([(field, name, data)])
        return self.request("POST", path + query, body, {"Content-Type": kind})

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def multipart(files):
    boundary = uuid.uuid4().hex
    parts = []
    for field, name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(model_dir):
    running = Server(model_dir, "--max_upload_mb", "1", "--max_pixels", "1000000")
    yield running
    assert running.stop() == 0


def test_good_images_get_infer_pys_verdicts_and_scores(server, model_dir, tmp_path):
    out = tmp_path / "infer"
    folder = os.path.join(ROOT, "sample_data", "bottle", "test")
    assert infer.main(["--model_dir", model_dir, "--image", folder, "--output_dir", str(out),
                       "--save_images", "False"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert {r["verdict"] for r in rows} == {"OK", "DEFECT"}  # the threshold splits them
    threshold = json.load(open(os.path.join(model_dir, "deploy.json")))["calibration"]["image_threshold"]
    for row in rows:
        status, answer, _ = server.post_file("/predict", open(row["image"], "rb").read())
        assert status == 200, answer
        assert answer["verdict"] == row["verdict"] and answer["score"] == pytest.approx(float(row["score"]), abs=1e-5)
        assert answer["normalized_score"] == pytest.approx(float(row["normalized_score"]), abs=1e-4)
        assert answer["thresholds"]["image"] == pytest.approx(threshold) and answer["model_id"].startswith(
            "rd4ad-resnet18-bottle-")
        assert (answer["width"], answer["height"]) == Image.open(row["image"]).size


def test_raw_bytes_and_pictures(server):
    status, answer, _ = server.request("POST", "/predict?pictures=true", open(CRACK, "rb").read(),
                                       {"Content-Type": "image/png"})
    assert status == 200, answer
    picture = Image.open(io.BytesIO(base64.b64decode(answer["picture_png"])))
    mask = Image.open(io.BytesIO(base64.b64decode(answer["mask_png"])))
    assert picture.size == layout(SIZE, SIZE, predicted=True)[1] and mask.size == (SIZE, SIZE)
    assert answer["defect_pixels"] == int((np.asarray(mask) > 0).sum()) and answer["mask_size"] == [SIZE, SIZE]
    assert answer["defect_fraction"] == pytest.approx(answer["defect_pixels"] / SIZE ** 2, abs=1e-6)
    timing = answer["timing"]
    assert timing["inference_ms"] > 0 and timing["decode_ms"] > 0 and timing["batch"] == 1
    assert timing["total_ms"] >= timing["decode_ms"] + timing["queue_ms"] + timing["inference_ms"]


def test_a_batch_answers_each_image_on_its_own(server):
    good, broken = open(GOOD, "rb").read(), b"\x89PNG\r\n\x1a\n not really"
    body, kind = multipart([("files", "a.png", good), ("files", "b.png", broken), ("files", "c.png", good)])
    status, answer, _ = server.request("POST", "/predict/batch", body, {"Content-Type": kind})
    assert status == 200
    results = answer["results"]
    assert [r["status"] for r in results] == [200, 422, 200] and results[0]["score"] == results[2]["score"]
    assert "b.png: cannot read image" in results[1]["error"]


@pytest.mark.parametrize("case", ["text", "truncated", "bomb", "empty", "wrong_type", "too_large", "chunked_large",
                                  "two_files", "no_file", "bad_length"])
def test_bad_uploads_get_json_errors_and_the_server_lives(server, case):
    png = open(GOOD, "rb").read()
    if case == "text":
        status, answer, _ = server.post_file("/predict", b"hello, not an image", "notes.txt")
        expected, words = 422, "notes.txt: cannot read image"
    elif case == "truncated":
        status, answer, _ = server.post_file("/predict", png[: len(png) // 2], "half.png")
        expected, words = 422, "half.png: cannot read image"
    elif case == "bomb":  # 2000 x 2000: more pixels than --max_pixels 1000000; a small file
        status, answer, _ = server.post_file("/predict", png_bytes(np.zeros((2000, 2000), np.uint8)), "bomb.png")
        expected, words = 422, "2000x2000 pixels, more than the 1000000 allowed"
    elif case == "empty":
        status, answer, _ = server.post_file("/predict", b"", "empty.png")
        expected, words = 422, "empty.png: cannot read image (empty)"
    elif case == "wrong_type":
        status, answer, _ = server.request("POST", "/predict", b"{}", {"Content-Type": "application/json"})
        expected, words = 415, "is not an image"
    elif case == "too_large":  # 2 MB over --max_upload_mb 1: refused from Content-Length
        status, answer, _ = server.post_file("/predict", b"\0" * (2 << 20), "big.png")
        expected, words = 413, "over --max_upload_mb 1"
    elif case == "chunked_large":  # no Content-Length: counted while read
        chunks = (b"\0" * (256 << 10) for _ in range(8))
        status, answer, _ = server.request("POST", "/predict", chunks, {"Content-Type": "image/png"})
        expected, words = 413, "over --max_upload_mb 1"
    elif case == "two_files":
        body, kind = multipart([("file", "a.png", png), ("file", "b.png", png)])
        status, answer, _ = server.request("POST", "/predict", body, {"Content-Type": kind})
        expected, words = 422, "use /predict/batch"
    elif case == "no_file":
        boundary = "b0undary"
        body = f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--{boundary}--\r\n'.encode()
        status, answer, _ = server.request("POST", "/predict", body,
                                           {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        expected, words = 422, ("send the image as the file field 'file', e.g. curl -F file=@IMAGE (text fields "
                                "received: note)")
    else:  # refused by the HTTP layer itself (h11), before our endpoints: still a JSON 400
        status, answer, _ = server.request("POST", "/predict", b"x", {"Content-Type": "image/png",
                                                                      "Content-Length": "-5"})
        expected, words = 400, "not an HTTP/1.1 request"
    assert status == expected and answer["status"] == expected and words in answer["error"], answer
    assert server.get("/health")[0] == 200  # still serving


def test_health_model_and_page(server):
    status, health, _ = server.get("/health")
    assert status == 200 and health["status"] == "ok" and health["workers"] == 1
    status, model, _ = server.get("/model")
    assert status == 200 and (model["arch"], model["image_size"], model["backend"], model["precision"]) == (
        "resnet18", SIZE, "paddle", "fp32") and model["thresholds"]["image"] > 0
    status, page, _ = server.get("/")
    assert status == 200 and "RD4AD inspection" in page and '"arch": "resnet18"' in page
    # the mask is shown once: as the last panel of the one picture (mask_png is for API clients)
    assert page.count("<img") == 1 and "mask_png" not in page
    status, answer, _ = server.get("/nothing")
    assert status == 404 and answer["error"] == "no such endpoint: /nothing"


def test_one_access_line_per_request_with_the_verdict(model_dir):
    server = Server(model_dir)
    try:
        assert server.request("POST", "/predict", open(CRACK, "rb").read(), {"Content-Type": "image/png"})[0] == 200
        assert server.get("/health")[0] == 200
        assert server.get("/a%0AGET%20/forged%20200")[0] == 404  # a path that would forge a log line
        body, kind = multipart([("files", "a.png", open(GOOD, "rb").read()), ("files", "b.png", b"broken")])
        assert server.request("POST", "/predict/batch", body, {"Content-Type": kind})[0] == 200
    finally:
        assert server.stop() == 0
    lines = server.proc.stdout.read().splitlines()
    served = lines[[i for i, line in enumerate(lines) if line.startswith("serving ")][0] + 1:]
    while served and served[0].startswith("GET /health 200 "):  # Server's own probe until it answered
        served.pop(0)
    assert re.fullmatch(r"POST /predict 200 \d+ ms (OK|DEFECT)", served[0]), served
    assert re.fullmatch(r"GET /health 200 \d+ ms", served[1]), served
    assert re.fullmatch(r"GET /a\?GET\?/forged\?200 404 \d+ ms", served[2]), served
    assert re.fullmatch(r"POST /predict/batch 200 \d+ ms 1 (OK|DEFECT) 1 error", served[3]), served
    assert served[4:] == ["stopped"], served


def test_a_full_queue_answers_503_with_retry_after(model_dir):
    server = Server(model_dir, "--queue", "1", "--workers", "1", "--max_batch", "4", "--max_wait_ms", "300")
    try:
        png = open(GOOD, "rb").read()
        answers = []

        def send():
            answers.append(server.post_file("/predict", png))
        threads = [threading.Thread(target=send) for _ in range(12)]
        for t in threads:
            t.start()
        health = [server.get("/health")[0] for _ in range(3)]  # answered while the queue is full
        for t in threads:
            t.join()
        statuses = sorted(status for status, _, _ in answers)
        assert set(statuses) == {200, 503} and health == [200] * 3, statuses
        busy = [headers for status, _, headers in answers if status == 503]
        assert all(h.get("retry-after") == "1" for h in busy)
    finally:
        assert server.stop() == 0


def test_a_request_past_the_timeout_gets_504(model_dir):
    server = Server(model_dir, "--timeout", "0.2", "--max_batch", "2", "--max_wait_ms", "1000")
    try:  # the worker waits 1 s to fill its batch: past the 0.2 s timeout
        status, answer, _ = server.post_file("/predict", open(GOOD, "rb").read())
        assert status == 504 and "within --timeout 0.2 s" in answer["error"]
        assert server.get("/health")[0] == 200
    finally:
        assert server.stop() == 0


def test_sigterm_finishes_the_request_in_flight_and_exits_0(model_dir):
    server = Server(model_dir, "--max_batch", "2", "--max_wait_ms", "1500")
    answers = []
    sender = threading.Thread(target=lambda: answers.append(server.post_file("/predict", open(GOOD, "rb").read())))
    sender.start()
    time.sleep(0.5)  # the request waits in its worker for the batch to fill
    server.proc.send_signal(signal.SIGTERM)
    sender.join(timeout=60)
    assert server.proc.wait(timeout=60) == 0
    assert answers and answers[0][0] == 200 and answers[0][1]["verdict"] in ("OK", "DEFECT")
    with pytest.raises(OSError):  # no longer accepting
        server.get("/health")


def test_bad_settings_are_one_line_before_serving(model_dir, tmp_path):
    for flags, words in ((["--workers", "0"], "--workers 0: must lie in 1..64"),
                         (["--workers", "65"], "--workers 65: must lie in 1..64"),
                         (["--cpu_threads", "0"], "--cpu_threads 0: must lie in 1..1024"),
                         (["--upload_timeout", "0"], "--upload_timeout 0.0: must be a positive number"),
                         (["--host", "no.such.host.invalid"], "--host no.such.host.invalid: not an address"),
                         (["--backend", "openvino", "--precision", "fp16"], "openvino runs fp32, bf16 or int8"),
                         (["--timeout", "nan"], "--timeout nan: must be a finite number")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--model_dir", model_dir, *flags],
                              cwd=ROOT, env=child_environment(), capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--model_dir", str(tmp_path)],
                          cwd=ROOT, env=child_environment(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "deploy.json: not found" in proc.stderr


def test_load_test_quick_mode(model_dir, tmp_path):
    """tools/load_test.py --quick: 4 clients for 5 s with 20% bad uploads; no server error,
    every good answer infer.py's verdict, /health always answered, the server exits 0."""
    report = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "load_test.py"), "--quick", "--model_dir",
                           model_dir, "--json", str(report)], cwd=ROOT, env=child_environment(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = json.load(open(report))
    statuses = figures["answers by status"]
    assert figures["server errors"] == 0 and figures["verdict changes"] == 0 and figures["health failures"] == 0
    assert statuses.get("200", 0) > 0 and statuses.get("422", 0) > 0  # good and bad uploads both went through
    assert figures["server exit status"] == 0 and figures["p50 ms"] > 0 and "| good answers/s |" in proc.stdout


def test_hostile_uploads_found_in_review(server):
    """A chunked multipart upload over the limit, a 1 x 39M strip (gigabytes to resize), EXIF
    that makes PIL raise struct.error: 413 and 422, never a 500 or a swollen server."""
    boundary_body, kind = multipart([("file", "big.png", b"\0" * (3 << 20))])
    status, answer, _ = server.request("POST", "/predict", (boundary_body[i:i + 65536]
                                                           for i in range(0, len(boundary_body), 65536)),
                                       {"Content-Type": kind})
    assert status == 413 and "over --max_upload_mb 1" in answer["error"], answer
    buf = io.BytesIO()
    Image.new("L", (1, 20000)).save(buf, format="PNG")
    status, answer, _ = server.request("POST", "/predict", buf.getvalue(), {"Content-Type": "image/png"})
    assert status == 422 and "a side longer than 16384" in answer["error"], answer
    status, answer, _ = server.request("POST", "/predict", b"GIF89a" + b"\0" * 40, {"Content-Type": "image/gif"})
    assert status == 422 and "cannot read image" in answer["error"] and "BytesIO" not in answer["error"], answer
    assert server.get("/health")[0] == 200


def test_the_page_never_runs_a_class_name(model_dir, tmp_path):
    import shutil
    hostile = str(tmp_path / "hostile")
    shutil.copytree(model_dir, hostile)
    path = os.path.join(hostile, "deploy.json")
    meta = json.load(open(path))
    # a class name has no '/' (utils/names.py, checked in deploy.json too), but may hold '<'
    meta["class"] = "bottle<script>document.title='PWNED'<!--"
    json.dump(meta, open(path, "w"))
    server = Server(hostile)
    try:
        status, page, _ = server.get("/")
        assert status == 200 and "<script>document.title" not in page and "\\u003cscript" in page
    finally:
        assert server.stop() == 0


def start_serving(*flags: str) -> tuple[subprocess.Popen, list[str]]:
    """serve.py started with `flags`, and its stdout's lines up to the "serving" one."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), *flags], cwd=ROOT,
                            env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while not lines or not lines[-1].startswith(("serving", "error")):
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
    return proc, lines


def test_port_0_is_named_and_a_port_in_use_is_one_line_before_loading(model_dir):
    """--port 0: the "serving" line names the port the server really listens on, and nothing
    but our own lines comes before it (the predictor processes print no Paddle warnings)."""
    proc, lines = start_serving("--model_dir", model_dir, "--port", "0")
    try:
        # one line per stage: starting (imports), loading the model, each predictor ready, serving
        assert [line.split(" ", 1)[0] for line in lines] == ["starting:", "loading", "predictor", "serving"], lines
        assert re.fullmatch(r"predictor 1 of 1 ready \(\d+\.\d s\)", lines[2]), lines
        port = int(lines[-1].rsplit(":", 1)[1].strip("/"))
        connection = HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("HEAD", "/health")  # HEAD as load balancers ask it
        assert connection.getresponse().status == 200
        connection.close()
        started = time.time()  # the same port again: refused at once, before any model loads
        taken = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--model_dir", model_dir, "--port",
                                str(port)], cwd=ROOT, env=child_environment(), capture_output=True, text=True,
                               timeout=120)
        lines = [line for line in taken.stderr.splitlines() if line.strip()]
        assert taken.returncode == 2 and len(lines) == 1 and f"--port {port}: cannot listen (Address already in " \
            f"use); choose another --port" in lines[0] and "loading" not in taken.stdout, taken
        assert time.time() - started < 60
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_slow_and_garbled_clients_are_cut_off_while_health_answers(model_dir):
    """A slow-loris client (headers, or a body, dribbling in) is cut off after --upload_timeout;
    an idle connection too; meanwhile /health answers at once."""
    server = Server(model_dir, "--upload_timeout", "1")
    try:
        idle = socket.create_connection(("127.0.0.1", server.port))
        slow_headers = socket.create_connection(("127.0.0.1", server.port))
        slow_headers.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        slow_body = socket.create_connection(("127.0.0.1", server.port))
        slow_body.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                          b"Content-Length: 1000\r\n\r\nabc")
        started = time.time()
        assert server.get("/health")[0] == 200 and time.time() - started < 0.9
        for client in (idle, slow_headers, slow_body):
            client.settimeout(10)
        assert idle.recv(100) == b"" and slow_headers.recv(100) == b""  # closed, not held for ever
        answer = b""
        while chunk := slow_body.recv(4096):
            answer += chunk
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 408") and b"within --upload_timeout 1 s" in body, answer
        assert time.time() - started < 8
        for client in (idle, slow_headers, slow_body):
            client.close()
        assert server.get("/health")[0] == 200
    finally:
        assert server.stop() == 0


def test_query_and_form_mistakes_say_what_to_send(server):
    png = open(GOOD, "rb").read()
    status, answer, _ = server.request("POST", "/predict?pictures=maybe", png, {"Content-Type": "image/png"})
    assert status == 422 and answer["error"] == "?pictures=maybe: must be true or false"
    body, kind = multipart([("file", "a.png", png)])
    status, answer, _ = server.request("POST", "/predict", body[: len(body) // 2], {"Content-Type": kind})
    assert status == 422 and "no complete field received: a truncated body?" in answer["error"], answer
    body, kind = multipart([("files", f"{k}.png", png) for k in range(9)])  # --queue 8
    status, answer, _ = server.request("POST", "/predict/batch", body, {"Content-Type": kind})
    assert status == 413 and "9 images in one request: more than the 8 the queue holds" in answer["error"], answer
    for _ in range(3):  # as many as the queue holds: each answered, on an idle server
        body, kind = multipart([("files", f"{k}.png", png) for k in range(8)])
        status, answer, _ = server.request("POST", "/predict/batch", body, {"Content-Type": kind})
        assert status == 200 and [r["status"] for r in answer["results"]] == [200] * 8, answer
    boundary = "b0undary"  # `curl -F file=<img.png` sends the image as a text field
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="file"\r\n\r\nxyz\r\n--{boundary}--\r\n'
    status, answer, _ = server.request("POST", "/predict", body.encode(),
                                       {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 422 and "e.g. curl -F file=@IMAGE (text fields received: file)" in answer["error"], answer
    status, answer, _ = server.request("POST", "/predict", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n",
                                       {"Content-Type": "image/eps"})  # never handed to Ghostscript
    assert status == 422 and "cannot read image (not an image of PNG, JPEG" in answer["error"], answer
    status, answer, _ = server.get("/health/")  # no redirect built from the client's Host
    assert status == 404 and answer["status"] == 404
    status, answer, headers = server.request("DELETE", "/health")
    assert status == 405 and set(headers.get("allow", "").split(", ")) == {"GET", "HEAD"}, headers


def test_width_and_height_are_the_upright_ones():
    """A camera's EXIF orientation 6 (rotated 90°): the answer's size is the upright one,
    as image_size_of gives for files."""
    from dataset import decode_upload
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (120, 80)).save(buf, format="JPEG", exif=exif.tobytes())
    rgb, size = decode_upload(buf.getvalue(), "camera.jpg", SIZE, 10**6)
    assert size == (80, 120) and rgb.shape == (SIZE, SIZE, 3)


def test_sigterm_while_loading_stops_cleanly_and_leaves_no_process(model_dir):
    """SIGTERM while the model loads: one line, exit 0, and no predictor process left behind
    (the pipe to serve.py's stdout, which a child would inherit, reaches its end)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--model_dir", model_dir, "--port", "0"],
                            cwd=ROOT, env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    first = [proc.stdout.readline(), proc.stdout.readline()]
    assert first[0].startswith("starting: ") and first[1].startswith("loading "), first
    proc.send_signal(signal.SIGTERM)  # the predictor process is still importing Paddle
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and rest.strip() == "stopped (SIGTERM) before serving", rest


def test_a_second_sigterm_stops_without_waiting_for_the_requests_in_flight(model_dir):
    server = Server(model_dir, "--max_batch", "2", "--max_wait_ms", "8000", "--timeout", "60")
    answers = []

    def send():
        try:
            answers.append(server.post_file("/predict", open(GOOD, "rb").read())[0])
        except OSError as err:
            answers.append(err)
    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.5)  # the request waits 8 s in its worker for the batch to fill
    started = time.time()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    output, _ = server.proc.communicate(timeout=60)
    assert server.proc.returncode == 0 and time.time() - started < 6, output
    assert "stopped at a second signal, without finishing the requests in flight" in output
    sender.join(timeout=30)
    assert answers and answers[0] != 200  # the request was given up, not answered


def test_a_dead_predictor_process_takes_no_more_requests(model_dir):
    """--workers 2, one predictor process killed: its worker stops taking jobs, so the live
    one answers them (at most the job in the dead one's hands gets a 503), and /health
    says degraded. Never a 500."""
    server = Server(model_dir, "--workers", "2")
    try:
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == server.proc.pid
                    and b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()
                    and b"resource_tracker" not in open(f"/proc/{p}/cmdline", "rb").read()]
        assert len(children) == 2, children
        os.kill(children[0], signal.SIGKILL)
        time.sleep(1)
        statuses = [server.post_file("/predict", open(GOOD, "rb").read())[0] for _ in range(6)]
        assert 500 not in statuses and statuses.count(200) >= 5 and set(statuses) <= {200, 503}, statuses
        status, health, _ = server.get("/health")
        assert status == 503 and health["status"] == "degraded" and health["alive_workers"] == 1
    finally:
        assert server.stop() == 0


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_uploads_time_is_not_the_models_and_stopping_answers_json(model_dir):
    """A slow upload within --upload_timeout but longer than --timeout is answered (the
    timeout counts from the end of the upload); --max_open_uploads turns away one more with
    a JSON 503; a stop that cuts a stalled upload answers it with a JSON 503; a late bad
    chunk after an answer logs no traceback."""
    server = Server(model_dir, "--timeout", "1", "--upload_timeout", "20", "--max_open_uploads", "2")
    try:
        png = open(GOOD, "rb").read()
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(png) + png[:100])
        time.sleep(1.5)
        slow.sendall(png[100:])
        slow.settimeout(30)
        assert slow.recv(100).startswith(b"HTTP/1.1 200"), "a slow upload got no answer"
        slow.close()
        stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        for client in stalled:
            client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                           b"Content-Length: 1000\r\n\r\nabc")
        time.sleep(0.5)
        status, answer, headers = server.request("POST", "/predict", png, {"Content-Type": "image/png"})
        assert status == 503 and "2 uploads in progress already" in answer["error"] and headers["retry-after"] == "1"
        late = socket.create_connection(("127.0.0.1", server.port))
        late.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        time.sleep(0.5)
        late.sendall(b"zz\r\n")
        server.proc.send_signal(signal.SIGTERM)  # the stalled uploads are cut after the 1 s grace
        for client in stalled:
            client.settimeout(30)
            answer = b""
            while chunk := client.recv(4096):
                answer += chunk
            head, body = answer.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 503") and json.loads(body)["error"].startswith("the server is stopping")
        output, _ = server.proc.communicate(timeout=60)
        assert server.proc.returncode == 0 and "Traceback" not in output and "Exception" not in output, output
    finally:
        if server.proc.poll() is None:
            server.stop()


def test_a_reader_that_goes_away_does_not_stop_the_service(model_dir):
    """`serve.py | head -2`: the reader of the status lines leaves once it has the "serving"
    line; the service goes on answering and still stops with exit 0."""
    proc, lines = start_serving("--model_dir", model_dir, "--port", "0")
    try:
        port = int(lines[-1].rsplit(":", 1)[1].strip("/"))
        proc.stdout.close()  # the "stopped" line will meet a broken pipe
        connection = HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
