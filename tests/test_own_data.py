"""A quality engineer's own photos: optional masks, plain folders, any size and format,
no defective images at all, and a deterministic validation split."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import ROOT
from dataset import Sample, split_validation

SAMPLE = os.path.join(ROOT, "sample_data", "bottle")
TINY = ["--arch", "resnet18", "--image_size", "64", "--teacher_weights", "none", "--batch_size", "2",
        "--epochs", "2", "--eval_interval", "0", "--log_interval", "0"]


def run_main(*args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *TINY, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_class_without_ground_truth_skips_pixel_metrics_with_a_note(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data / "widget", ignore=shutil.ignore_patterns("ground_truth"))
    out = str(tmp_path / "out")
    log = run_main("--data_dir", str(data), "--cls", "widget", "--output_dir", out)
    assert "no ground-truth masks (MVTec layout: " in log and "pixel metrics n/a, image metrics still" in log
    metrics = json.load(open(os.path.join(out, "results.json")))["classes"]["widget"]
    # strict JSON: n/a is null
    assert metrics["pixel_auroc"] is None and metrics["aupro_per_image"] is None
    assert metrics["pixel_f1"] is None
    assert 0.0 <= metrics["sample_auroc"] <= 1.0 and 0.0 <= metrics["image_f1"] <= 1.0
    assert "n/a" in open(os.path.join(out, "results.md")).read()
    # the report still has the image ROC, and no pixel plots
    report = os.listdir(os.path.join(out, "report", "widget"))
    assert "roc_image.png" in report and "roc_pixel.png" not in report


def test_plain_folders_of_any_size_and_format_without_defects(tmp_path):
    rng = np.random.default_rng(0)
    train, test = tmp_path / "photos" / "train", tmp_path / "photos" / "line"
    train.mkdir(parents=True)
    test.mkdir()
    sizes = [(120, 90), (300, 200), (64, 64), (97, 131)]
    for i, (w, h) in enumerate(sizes):
        pixels = (rng.random((h, w, 3)) * 60 + 100).astype(np.uint8)
        fmt = ["JPEG", "PNG", "BMP", "PNG"][i]
        Image.fromarray(pixels).save(train / f"part{i}.{fmt.lower().replace('jpeg', 'jpg')}", format=fmt)
    Image.fromarray((rng.random((80, 100)) * 255).astype(np.uint8)).save(test / "new_a.png")  # grayscale
    Image.fromarray((rng.random((50, 70, 3)) * 255).astype(np.uint8)).save(test / "new_b.jpg")
    (test / "notes.txt").write_text("not an image")
    (train / ".DS_Store").write_bytes(b"\0\1")
    out = str(tmp_path / "out")
    args = ["--train_dir", str(train), "--test_dir", str(test), "--output_dir", out]
    log = run_main(*args)
    assert "[photos] 3 train / 1 validation / 2 test images" in log  # named after photos/train
    metrics = json.load(open(os.path.join(out, "results.json")))["classes"]["photos"]
    assert all(metrics[k] is None for k in ("pixel_auroc", "sample_auroc", "image_f1"))
    state = json.load(open(os.path.join(out, "photos", "status.json")))
    assert state["finished"]

    run_main(*args, "--mode", "infer")
    rows = list(csv.DictReader(open(os.path.join(out, "photos", "infer", "scores.csv"))))
    assert [r["image"] for r in rows] == ["line/new_a.png", "line/new_b.jpg"]
    assert all(r["label"] == "" and r["verdict"] in ("OK", "DEFECT") for r in rows)  # unlabelled
    for r in rows:
        mask = Image.open(os.path.join(out, "photos", "infer", "masks", f"unlabeled_{r['image'][5:-4]}.png"))
        assert mask.size == (64, 64)


def test_plain_folders_with_defect_subfolders_and_no_masks_name_no_ground_truth_folder(tmp_path):
    photos = tmp_path / "photos"
    for folder, names in (("train", ("a", "b", "c", "d")), ("line/good", ("g",)), ("line/scratch", ("s",))):
        (photos / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(os.path.join(SAMPLE, "train", "good", "000.png"), photos / folder / f"{name}.png")
    out = str(tmp_path / "out")
    log = run_main("--train_dir", str(photos / "train"), "--test_dir", str(photos / "line"), "--output_dir", out)
    assert "no ground-truth masks: pixel metrics n/a, image metrics still computed" in log
    assert "ground_truth" not in log and "nan" not in log.replace("nan_", "")  # n/a, never nan


def test_validation_split_is_deterministic_and_stable():
    samples = [Sample(f"/d/img{i:03d}.png", None, 0, "good") for i in range(200)]
    train, val = split_validation(samples, 0.1)
    names = {s.image_path for s in val}
    assert 10 <= len(val) <= 30 and len(train) + len(val) == 200  # about 10%
    assert not names & {s.image_path for s in train}
    assert train == [s for s in samples if s.image_path not in names]  # file order kept
    # the same split whatever the listing order, and on a second call
    assert {s.image_path for s in split_validation(samples[::-1], 0.1)[1]} == names
    # adding images never moves a held-out image back into training
    more = samples + [Sample(f"/d/new{i:03d}.png", None, 0, "good") for i in range(200)]
    assert names <= {s.image_path for s in split_validation(more, 0.1)[1]}
    # tiny sets: one image held out, one kept for training; ratio 0: none
    assert [len(x) for x in split_validation(samples[:2], 0.1)] == [1, 1]
    assert [len(x) for x in split_validation(samples[:1], 0.1)] == [1, 0]
    assert split_validation(samples, 0.0)[1] == []
