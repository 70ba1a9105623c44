"""train -> eval -> infer on sample_data through the command line, as a user runs it."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from report.pictures import layout

from conftest import ROOT

SMALL = ["--data_dir", os.path.join(ROOT, "sample_data"), "--cls", "bottle", "--arch", "resnet18",
         "--image_size", "64", "--teacher_weights", "none", "--batch_size", "3"]


def run_main(*args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    proc = run_main(*SMALL, "--epochs", "3", "--eval_interval", "2", "--log_interval", "1",
                    "--output_dir", out)
    return out, proc


def test_train_writes_checkpoint_and_results(trained):
    out, proc = trained
    assert "loss" in proc.stdout + proc.stderr and "ips" in proc.stdout + proc.stderr
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["checkpoint"] == "last" and results["config"]["arch"] == "resnet18"
    metrics = results["classes"]["bottle"]
    for name in ("pixel_auroc", "sample_auroc", "aupro_per_image", "aupro_set"):
        assert 0.0 <= metrics[name] <= 1.0, name
    md = open(os.path.join(out, "results.md")).read()
    assert "| bottle |" in md and "last epoch" in md and "AUPRO (set)" in md
    assert os.path.isfile(os.path.join(out, "bottle", "model.pdparams"))
    assert not [f for f in os.listdir(os.path.join(out, "bottle")) if f.endswith(".tmp")]


def test_eval_reproduces_training_metrics(trained):
    out, _ = trained
    train_metrics = json.load(open(os.path.join(out, "results.json")))["classes"]["bottle"]
    run_main(*SMALL, "--mode", "eval", "--output_dir", out)
    eval_metrics = json.load(open(os.path.join(out, "results.json")))["classes"]["bottle"]
    for name, value in train_metrics.items():
        assert eval_metrics[name] == pytest.approx(value, abs=1e-6), name


def test_infer_writes_side_by_side_pictures_and_scores(trained):
    out, _ = trained
    run_main(*SMALL, "--mode", "infer", "--output_dir", out)
    infer_dir = os.path.join(out, "bottle", "infer")
    rows = list(csv.DictReader(open(os.path.join(infer_dir, "scores.csv"))))
    assert len(rows) == 10
    assert {r["defect"] for r in rows} == {"good", "scratch", "crack", "missing", "stain"}
    assert all(float(r["score"]) >= 0 for r in rows)
    assert {r["label"] for r in rows} == {"0", "1"}
    assert {r["verdict"] for r in rows} <= {"OK", "DEFECT"}
    for r in rows:  # 0.5 is the threshold: verdict and normalised score agree
        assert 0.0 <= float(r["normalized_score"]) <= 1.0
        assert (float(r["normalized_score"]) > 0.5) == (r["verdict"] == "DEFECT"), r
    picture = Image.open(os.path.join(infer_dir, "crack_000.png"))
    # image | ground truth | anomaly map + colour scale | predicted mask
    corners, size = layout(64, 64, predicted=True)
    assert picture.size == size
    pixels = np.asarray(picture.convert("RGB"))

    def panel(name):
        x, y = corners[name]
        return pixels[y:y + 64, x:x + 64, 0]

    assert set(np.unique(panel("ground truth"))) == {0, 255}  # the ground-truth panel is the binary mask
    predicted = np.asarray(Image.open(os.path.join(infer_dir, "masks", "crack_000.png")))
    assert predicted.shape == (64, 64) and set(np.unique(predicted)) <= {0, 255}
    assert np.array_equal(panel("predicted mask"), predicted)


def test_unknown_class_is_one_line_and_exit_2(tmp_path):
    proc = run_main(*SMALL[:2], "--cls", "nosuch", "--teacher_weights", "none",
                    "--output_dir", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "'nosuch' not found" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
    proc = run_main(*SMALL, "--mode", "eval", "--output_dir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_best_on_test_selection_is_explicit_and_labelled(tmp_path):
    out = str(tmp_path)
    run_main(*SMALL, "--epochs", "2", "--eval_interval", "1", "--select_best_on_test",
             "--output_dir", out)
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["checkpoint"] == "best_on_test"
    assert results["classes"]["bottle"]["selected_epoch"] in (1, 2)
    assert "ON THE TEST SET" in open(os.path.join(out, "results.md")).read()
    assert os.path.isfile(os.path.join(out, "bottle", "best.pdparams"))
    assert os.path.isfile(os.path.join(out, "bottle", "model.pdparams"))  # the last epoch's too


def test_static_and_dynamic_evaluation_agree(trained):
    out, _ = trained
    scores = {}
    for backend in ("dygraph", "static"):
        run_main(*SMALL, "--mode", "eval", "--eval_backend", backend, "--output_dir", out)
        scores[backend] = json.load(open(os.path.join(out, "results.json")))["classes"]["bottle"]
    for name, value in scores["dygraph"].items():
        assert scores["static"][name] == pytest.approx(value, abs=1e-4), name


def test_bad_image_size_is_refused_before_any_work(tmp_path):
    proc = run_main(*SMALL, "--image_size", "100", "--output_dir", str(tmp_path), check=False)  # last wins
    assert proc.returncode == 2 and "--image_size 100: must be a multiple of 32" in proc.stderr
    assert not os.listdir(tmp_path)


def test_eval_writes_the_visual_report(trained):
    out, _ = trained
    run_main(*SMALL, "--mode", "eval", "--output_dir", out)
    folder = os.path.join(out, "report", "bottle")
    for name in ("roc_image.png", "roc_pixel.png", "pro.png", "scores.png"):
        assert Image.open(os.path.join(folder, name)).size[0] > 100, name
    # the misses grid: one row (4 panels) per defective image called OK, at most 6 of them
    metrics = json.load(open(os.path.join(out, "results.json")))["classes"]["bottle"]
    misses = round(8 * (1 - metrics["image_recall"]))
    _, (width, height) = layout(64, 64, predicted=True)
    grid = os.path.join(folder, "defect_lowest.png")
    if misses:
        assert Image.open(grid).size == (width, min(6, misses) * height)
    else:
        assert not os.path.exists(grid)
    page = open(os.path.join(folder, "index.html")).read()
    assert f"<td>{100 * metrics['pixel_auroc']:.1f}</td>" in page and "Thresholds from" in page
    summary = open(os.path.join(out, "report.html")).read()
    assert 'href="report/bottle/index.html"' in summary
    assert "RD4AD paper" in summary and "<td>97.8</td>" in summary and "<td>93.9</td>" in summary


def test_visualdl_logging_goes_through_its_log_writer(tmp_path):
    """A stand-in visualdl package records what main.py logs (VisualDL itself is optional)."""
    fake = tmp_path / "fake" / "visualdl"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import json, os\n"
        "class LogWriter:\n"
        "    def __init__(self, logdir):\n"
        "        self.path = os.path.join(logdir, 'scalars.jsonl'); os.makedirs(logdir, exist_ok=True)\n"
        "    def add_scalar(self, tag, value, step):\n"
        "        open(self.path, 'a').write(json.dumps([tag, value, step]) + '\\n')\n"
        "    def close(self):\n"
        "        pass\n")
    out = str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *SMALL, "--epochs", "2",
                           "--eval_interval", "1", "--visualdl", "--output_dir", out], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = [json.loads(line) for line in open(os.path.join(out, "visualdl", "bottle", "scalars.jsonl"))]
    tags = {tag for tag, _, _ in logged}
    assert {"train/loss", "test/pixel_auroc", "final/sample_auroc", "final/image_f1"} <= tags
    losses = json.load(open(os.path.join(out, "bottle", "train_log.json")))["loss_per_step"]
    assert [v for t, v, _ in logged if t == "train/loss"] == [x for epoch in losses for x in epoch]


def test_visualdl_missing_is_refused_up_front(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(tmp_path))  # make sure no real one shadows the check
    code = "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('visualdl') else 1)"
    if subprocess.run([sys.executable, "-c", code]).returncode == 0:
        pytest.skip("visualdl is installed here")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *SMALL, "--visualdl",
                           "--output_dir", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 2 and "--visualdl needs VisualDL: pip install visualdl" in proc.stderr
    assert not os.path.exists(tmp_path / "o" / "bottle")
