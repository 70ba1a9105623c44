"""Low precision judged on the exported model (deploy/precision.py): export_model.py
--check_dir records each bf16 / int8 path against fp32 in deploy.json, and infer.py
--precision auto takes the fastest path that kept every verdict."""
import csv
import json
import os

import numpy as np
import paddle
import pytest

import export_model
import infer
from conftest import ROOT
from deploy.deployment import read_deployment
from deploy.precision import PrecisionCheck, choose_path
from deploy.predictor import PredictorOptions, build_predictor, cpu_has_bf16
from engine.checkpoint import save_checkpoint
from model import build_rd4ad

SIZE = 64
TEST_DIR = os.path.join(ROOT, "sample_data", "bottle", "test")
GOOD_DIR = os.path.join(ROOT, "sample_data", "bottle", "train", "good")


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """An export judged on the sample test images, its threshold at the median fp32 score
    so that verdicts split (a threshold below every score would hide any change)."""
    root = tmp_path_factory.mktemp("judged")
    paddle.seed(3)
    net = build_rd4ad("resnet18", teacher_weights="none")
    ckpt = str(root / "bottle" / "model.pdparams")
    first = str(root / "first")

    def save(threshold):
        calibration = {"image_threshold": threshold, "pixel_threshold": threshold, "image_low": threshold - 0.1,
                       "pixel_low": 0.1, "quantile": 0.995, "count": 4, "source": "validation"}
        save_checkpoint(ckpt, net, arch="resnet18", image_size=SIZE, epoch=1, cls="bottle", teacher_weights="none",
                        extra={"calibration": calibration})
    save(1.0)
    assert export_model.main(["--checkpoint", ckpt, "--save_dir", first]) == 0
    scores = scores_of(first, "fp32")
    save(float(np.median(scores)))
    save_dir = str(root / "inference")
    assert export_model.main(["--checkpoint", ckpt, "--save_dir", save_dir, "--onnx", "--int8", "--calib_dir",
                              GOOD_DIR, "--check_dir", TEST_DIR]) == 0
    return save_dir, root


def scores_of(model_dir, precision, backend="paddle"):
    from dataset import index_test_dir, load_image
    images = np.stack([load_image(s.image_path, SIZE) for s in index_test_dir(TEST_DIR, None)])
    predictor = build_predictor(read_deployment(model_dir), PredictorOptions(backend=backend, precision=precision))
    return np.concatenate([predictor(image[None])[1] for image in images])


def test_the_export_records_every_path_that_runs_here(judged):
    save_dir, _ = judged
    checks = json.load(open(os.path.join(save_dir, "deploy.json")))["precision_checks"]
    paths = [(c["backend"], c["precision"]) for c in checks]
    expected = [("paddle", "fp32"), ("openvino", "int8"), ("onnxruntime", "int8")]
    if cpu_has_bf16():
        expected += [("openvino", "bf16"), ("paddle", "bf16")]
    expected += [("openvino", "fp32"), ("onnxruntime", "fp32")]
    assert paths == expected
    baseline = checks[0]
    assert baseline["images"] == 10 and baseline["min_pearson"] == 1.0 and baseline["verdict_changes"] == 0
    assert all(c["ms_per_image"] > 0 and c["verdict_changes"] is not None for c in checks)
    for fp32 in checks[-2:]:  # the other runtimes' fp32 computes what Paddle's does
        assert fp32["min_pearson"] > 0.9999 and fp32["verdict_changes"] == 0 and fp32["swapped_pairs"] == 0
    assert read_deployment(save_dir).precision_checks  # what infer.py reads back


def test_the_recorded_verdict_changes_are_the_real_ones(judged):
    """Recount one path's changes from its own scores at the recorded threshold."""
    save_dir, _ = judged
    deployment = read_deployment(save_dir)
    threshold = deployment.calibration.image_threshold
    fp32, int8 = scores_of(save_dir, "fp32"), scores_of(save_dir, "int8", backend="onnxruntime")
    record = next(c for c in deployment.precision_checks if c["backend"] == "onnxruntime")
    assert record["verdict_changes"] == int(((fp32 > threshold) != (int8 > threshold)).sum())


def test_precision_auto_keeps_every_verdict_of_the_check_images(judged, tmp_path, capsys):
    save_dir, _ = judged
    rows = {}
    for precision in ("fp32", "auto"):
        out = tmp_path / precision
        assert infer.main(["--model_dir", save_dir, "--image", TEST_DIR, "--output_dir", str(out),
                           "--precision", precision, "--save_images", "False"]) == 0
        rows[precision] = {r["image"]: r["verdict"] for r in csv.DictReader(open(out / "scores.csv"))}
    assert rows["auto"] == rows["fp32"] and set(rows["fp32"].values()) == {"OK", "DEFECT"}
    chosen = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--precision auto: ")]
    assert len(chosen) == 1 and "kept every verdict of the export's 10 check images" in chosen[0]


def test_precision_auto_needs_a_judged_export(judged, tmp_path, capsys):
    _, root = judged
    code = infer.main(["--model_dir", str(root / "first"), "--image", TEST_DIR, "--output_dir", str(tmp_path / "o"),
                       "--precision", "auto"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "holds no precision checks" in err[0]


def test_a_forged_judgement_is_refused(judged, tmp_path, capsys):
    import shutil
    save_dir, _ = judged
    forged = str(tmp_path / "forged")
    shutil.copytree(save_dir, forged)
    path = os.path.join(forged, "deploy.json")
    meta = json.load(open(path))
    meta["precision_checks"][1]["ms_per_image"] = float("nan")  # NaN: the fastest under min()
    json.dump(meta, open(path, "w"))
    code = infer.main(["--model_dir", forged, "--image", TEST_DIR, "--output_dir", str(tmp_path / "o"),
                       "--precision", "auto"])
    err = capsys.readouterr().err
    assert code == 2 and "'precision_checks' must be a list of" in err


def check(backend, precision, ms, changes=0, pearson=0.999):
    return PrecisionCheck(backend, precision, 10, ms, pearson, 0, changes)


CHECKS = [check("paddle", "fp32", 300.0), check("openvino", "int8", 90.0, changes=1),
          check("onnxruntime", "int8", 120.0), check("openvino", "bf16", 140.0, pearson=0.95),
          check("paddle", "bf16", 190.0)]


def test_choose_path_takes_the_fastest_that_kept_verdicts_and_maps():
    backend, precision, why = choose_path(CHECKS, lambda c: True)
    assert (backend, precision) == ("onnxruntime", "int8")  # openvino int8 changed a verdict
    assert "rejected (verdicts or maps changed): openvino int8, openvino bf16" in why


def test_choose_path_within_a_backend_and_what_runs_here():
    assert choose_path(CHECKS, lambda c: True, "paddle")[:2] == ("paddle", "bf16")
    assert choose_path(CHECKS, lambda c: c.precision != "bf16", "paddle")[:2] == ("paddle", "fp32")
    backend, precision, why = choose_path(CHECKS, lambda c: True, "openvino")  # both openvino paths failed
    assert (backend, precision) == ("openvino", "fp32") and "no checked path of openvino" in why
    assert choose_path(CHECKS, lambda c: c.precision == "fp32")[:2] == ("paddle", "fp32")


def test_without_a_threshold_no_low_precision_path_is_chosen():
    unjudged = [check("paddle", "fp32", 300.0, changes=None), check("onnxruntime", "int8", 100.0, changes=None)]
    assert choose_path(unjudged, lambda c: True)[:2] == ("paddle", "fp32")
