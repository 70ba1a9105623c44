"""Reports say what was evaluated, and verdicts can be checked by eye (issue 23, parts 1 and 4).

After the quick start's kind of run (resnet18, a small size, a random teacher), every
table, JSON, config and report page of train, eval, infer and a resumed run names that
model, read from its checkpoint, never the defaults (wide_resnet50_2, 256 px, 200 epochs,
batch 16, imagenet)."""
import csv
import json
import os
import re

import numpy as np
import pytest
import yaml
from PIL import Image

import engine.train
from conftest import ROOT
from engine.checkpoint import load_checkpoint
from app.command import main
from engine.config import Config
from core.decision import Calibration
from core.results import Predictions
from engine.model_info import class_model, describe_model
from report.html import threshold_point, write_class_report, write_summary_report
from report.per_image import CSV_FIELDS, ImageItem, caption
from report.pictures import _TITLE_H, DISPLAY_WIDTH, layout, side_by_side
from report.tables import models_table

SETTINGS = ["--data_dir", os.path.join(ROOT, "sample_data"), "--cls", "bottle", "--arch", "resnet18",
            "--image_size", "64", "--teacher_weights", "none", "--batch_size", "2", "--epochs", "2",
            "--eval_interval", "0", "--log_interval", "0", "--save_interval", "1"]
TRUE_MODEL = {"model": "rd4ad", "arch": "resnet18", "image_size": 64, "epochs_trained": 2, "epochs_planned": 2,
              "batch_size": 2, "teacher_weights": "none", "checkpoint": "last"}
TRUE_LINE = "Model: rd4ad, backbone resnet18, 64 px, trained 2 of 2 epochs, batch 2, teacher random (none)"


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def assert_describes_true_model(out):
    """Every file of the run that describes the model names the trained one."""
    results = json.loads(read(os.path.join(out, "results.json")))
    assert results["models"]["bottle"] == TRUE_MODEL
    config = results["config"]
    assert (config["arch"], config["image_size"], config["epochs"], config["batch_size"],
            config["teacher_weights"]) == ("resnet18", 64, 2, 2, "none")
    md = read(os.path.join(out, "results.md"))
    assert md.startswith("# RD4AD results (resnet18, 64px, ")
    assert "| bottle | rd4ad | resnet18 | 64 px | 2 of 2 | 2 | random (none) | last |" in md
    summary = read(os.path.join(out, "report.html"))
    assert ("<td>bottle</td><td>rd4ad</td><td>resnet18</td><td>64 px</td><td>2 of 2</td><td>2</td>"
            "<td>random (none)</td>") in summary
    page = read(os.path.join(out, "report", "bottle", "index.html"))
    assert TRUE_LINE in page
    for text in (md, summary, page, json.dumps(results)):
        for default in ("wide_resnet50_2", "256px", "256 px", "imagenet", "of 200"):
            assert default not in text, default


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("truth"))
    assert main([*SETTINGS, "--output_dir", out]) == 0
    return out


def test_train_then_eval_without_flags_describe_the_checkpoint(run):
    assert_describes_true_model(run)
    # the command: only the run's folder, every other setting a default
    assert main(["--mode", "eval", "--output_dir", run]) == 0
    assert_describes_true_model(run)
    used = yaml.safe_load(read(os.path.join(run, "config_eval.yaml")))
    assert (used["arch"], used["image_size"], used["epochs"], used["batch_size"], used["teacher_weights"]) == (
        "resnet18", 64, 2, 2, "none")


def test_infer_describes_the_checkpoint_and_has_no_empty_z_score_column(run):
    before = read(os.path.join(run, "results.json"))
    assert main(["--mode", "infer", "--output_dir", run]) == 0
    used = yaml.safe_load(read(os.path.join(run, "config_infer.yaml")))
    assert (used["arch"], used["image_size"], used["epochs"], used["batch_size"], used["teacher_weights"]) == (
        "resnet18", 64, 2, 2, "none")
    assert read(os.path.join(run, "results.json")) == before  # infer rewrites no results
    with open(os.path.join(run, "bottle", "infer", "scores.csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert "z_score" not in rows[0] and tuple(rows[0]) == CSV_FIELDS
    for field in ("score", "normalized_score", "verdict"):  # every column filled for scored images
        assert all(r[field] for r in rows), field


def test_infer_takes_a_threshold_as_infer_py_does(run, capsys):
    with open(os.path.join(run, "bottle", "infer", "scores.csv"), encoding="utf-8", newline="") as f:
        scores = sorted(float(r["score"]) for r in csv.DictReader(f))
    threshold = (scores[3] + scores[4]) / 2  # 4 images at or below it, the rest above
    assert main(["--mode", "infer", "--output_dir", run, "--threshold", repr(threshold)]) == 0
    with open(os.path.join(run, "bottle", "infer", "scores.csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["verdict"] for r in rows] == ["DEFECT" if float(r["score"]) > threshold else "OK" for r in rows]
    assert sum(r["verdict"] == "OK" for r in rows) == 4
    picture = Image.open(os.path.join(run, "bottle", "infer", rows[0]["output"] + ".png"))
    assert picture.size == layout(64, 64, predicted=True)[1]
    capsys.readouterr()
    # a threshold that means nothing, or one eval would not use, is one line and exit 2
    for bad in (["--mode", "infer", "--threshold", "inf"], ["--mode", "eval", "--threshold", "0.5"]):
        assert main([*bad, "--output_dir", run]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--threshold" in err[0], err


def test_resumed_run_describes_what_it_trained(tmp_path, monkeypatch):
    out = str(tmp_path / "resumed")
    real_epoch = engine.train.TrainingRun.epoch

    def stop_in_epoch_two(self, epoch, batches, cache):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(self, epoch, batches, cache)

    monkeypatch.setattr(engine.train.TrainingRun, "epoch", stop_in_epoch_two)
    assert main([*SETTINGS, "--output_dir", out]) == 130
    assert os.path.isfile(os.path.join(out, "bottle", "train_state.pdparams"))
    monkeypatch.setattr(engine.train.TrainingRun, "epoch", real_epoch)
    assert main([*SETTINGS, "--output_dir", out, "--resume"]) == 0
    assert_describes_true_model(out)


def test_description_comes_from_the_checkpoint_else_the_run_else_unknown(run, tmp_path):
    state = load_checkpoint(os.path.join(run, "bottle", "model.pdparams"))
    assert describe_model(state) == TRUE_MODEL
    old = {k: v for k, v in state.items() if k not in ("planned_epochs", "batch_size")}  # an older checkpoint
    same_run = {"arch": "resnet18", "image_size": 64, "teacher_weights": "none", "epochs": 2, "batch_size": 2}
    assert describe_model(old, run_settings=same_run) == TRUE_MODEL
    # the run's settings describe another model: nothing taken from them, unknown is said
    other = dict(same_run, arch="wide_resnet50_2", epochs=200, batch_size=16)
    described = describe_model(old, run_settings=other)
    assert described["epochs_planned"] is None and described["batch_size"] is None
    assert "| bottle | rd4ad | resnet18 | 64 px | 2 of ? | ? | random (none) | last |" in models_table(
        {"bottle": described})
    # a checkpoint naming its model ("rdpp") is described so
    assert describe_model(dict(state, model="rdpp"))["model"] == "rdpp"
    # eval with --teacher_weights FILE: the teacher that was used is the one named
    cfg = Config(mode="eval", output_dir=run, teacher_weights="teacher.pdparams",
                 explicit=frozenset({"teacher_weights"}))
    assert class_model(cfg, "bottle")["teacher_weights"] == "teacher.pdparams"
    assert class_model(Config(mode="eval", output_dir=run), "bottle") == TRUE_MODEL


def test_hostile_description_values_are_neither_trusted_nor_markup(tmp_path):
    state = {"arch": "resnet18", "image_size": 64, "epoch": 2, "teacher_weights": "<script>x</script>\n|",
             "planned_epochs": True, "batch_size": "16", "model": 7}
    described = describe_model(state)
    assert described["epochs_planned"] is None and described["batch_size"] is None
    assert described["model"] == "rd4ad" and "\n" not in described["teacher_weights"]
    page = read(write_summary_report(str(tmp_path), {"bottle": {}}, {"bottle": described}))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "\\|" in models_table({"bottle": described})  # a | cannot split the markdown row


def test_caption_shows_the_threshold_it_was_compared_with():
    calibration = Calibration(0.25, 0.25, 0.05, 0.0, 0.995, 20, "validation")
    item = ImageItem("data/bottle/test/broken/003.png", "x")
    above = caption(item, 0.2994, calibration).split("\n")
    assert above == ["broken/003.png", "score 0.2994 > threshold 0.2500: DEFECT (normalised 0.62 > 0.50)"]
    below = caption(item, 0.2, calibration).split("\n")[1]
    assert below == "score 0.2000 <= threshold 0.2500: OK (normalised 0.38 <= 0.50)"
    # just above the threshold: enough digits that the two numbers differ
    close = caption(item, 0.250001, calibration).split("\n")[1]
    numbers = re.findall(r"score (\S+) > threshold (\S+):", close)[0]
    assert numbers[0] != numbers[1] and float(numbers[0]) > float(numbers[1])
    assert caption(item, 0.3, None).split("\n")[1] == "score 0.3000 (no threshold: no verdict)"


def _caption_ink_height(picture, map_size):
    """Pixel rows of the caption's first line that hold dark (text) pixels."""
    px = np.asarray(picture.convert("L")).astype(int)
    strip = px[_TITLE_H + map_size:]
    lines = np.flatnonzero((strip < 128).any(axis=1))
    first = lines[lines < lines[0] + 0.5 * (lines[-1] - lines[0] + 1)]  # the first of two lines
    return first[-1] - first[0] + 1


@pytest.mark.parametrize("size", [64, 128, 256, 512])
def test_caption_text_is_readable_where_the_report_shows_it(size):
    """The report shows a picture at most DISPLAY_WIDTH px wide (its CSS): the caption's
    letters ("Ag" + digits, with descenders) must be at least 13 px tall there; Pillow's
    default font gave 9-10 px, and less on wide pictures scaled down."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    amap = rng.random((size, size)).astype(np.float32)
    picture = side_by_side(image, None, amap, 0.0, 1.0, "good/Ag0.png\nscore 0.2994 > threshold 0.2500: DEFECT",
                           amap > 0.5, threshold=0.5)
    width = picture.size[0]
    shown = min(width, DISPLAY_WIDTH) / width
    assert _caption_ink_height(picture, size) * shown >= 13
    assert picture.size == layout(size, size, predicted=True)[1]


def _predictions(scores, labels, with_masks=True):
    n, s = len(scores), 64
    rng = np.random.default_rng(1)
    maps = (rng.random((n, s, s)) * 0.1).astype(np.float32) + np.asarray(scores, np.float32)[:, None, None] - 0.1
    masks = np.zeros((n, s, s), np.uint8)
    for i, label in enumerate(labels):
        if label == 1:
            masks[i, 10:20, 10:20] = 1
    pred = Predictions(maps, np.asarray(scores, np.float32), masks, np.asarray(labels, np.int64))
    if not with_masks:
        pred.mask_known = np.zeros(n, bool)
    return pred


class _Sample:
    def __init__(self, path, label, has_mask):
        self.image_path, self.label, self.has_mask, self.mask_path = path, label, has_mask, None
        self.defect = "" if label < 0 else ("good" if label == 0 else "crack")


def _report(tmp_path, scores, labels, calibration, with_masks=True):
    pred = _predictions(scores, labels, with_masks)
    samples = [_Sample(f"data/{'good' if lab == 0 else 'crack' if lab == 1 else 'line'}/{i:03d}.png", lab,
                       with_masks and lab >= 0) for i, lab in enumerate(labels)]
    folder = str(tmp_path / "report")
    image = np.full((64, 64, 3), 128, np.uint8)
    page = read(write_class_report(folder, "bottle", pred, samples, lambda i: image, {}, calibration,
                                   model=TRUE_MODEL))
    return folder, page


CALIBRATION = Calibration(0.5, 0.5, 0.1, 0.0, 0.995, 20, "validation")


def test_misses_and_false_alarms_grids_hold_only_wrong_verdicts(tmp_path):
    #         good: 0.2 OK, 0.7 DEFECT (false alarm) | defective: 0.1, 0.3 OK (missed), 0.9 DEFECT
    folder, page = _report(tmp_path, [0.2, 0.7, 0.1, 0.3, 0.9], [0, 0, 1, 1, 1], CALIBRATION)
    row = layout(64, 64, predicted=True)[1][1]
    assert Image.open(os.path.join(folder, "defect_lowest.png")).size[1] == 2 * row
    assert Image.open(os.path.join(folder, "good_highest.png")).size[1] == 1 * row
    assert "Hardest misses: defective images called OK (2 of 3)" in page
    assert "False alarms: good images called DEFECT (1 of 2)" in page
    assert TRUE_LINE in page  # the model and its teacher, on the class page
    # nothing missed: no grid (an earlier one removed), and the page says so
    folder, page = _report(tmp_path, [0.2, 0.3, 0.6, 0.8, 0.9], [0, 0, 1, 1, 1], CALIBRATION)
    assert not os.path.exists(os.path.join(folder, "defect_lowest.png"))
    assert "called OK (0 of 3)</h2><p>None.</p>" in page


def test_threshold_point_on_roc_and_histogram(tmp_path):
    labels = np.array([0, 0, 0, 0, 1, 1])
    values = np.array([0.1, 0.2, 0.6, 0.3, 0.4, 0.9])
    assert threshold_point(labels, values, 0.5) == (0.25, 0.5)  # 1 of 4 good, 1 of 2 defective above
    assert threshold_point(labels, values, 0.35) == (0.25, 1.0)
    folder, page = _report(tmp_path, [0.2, 0.7, 0.1, 0.3, 0.9], [0, 0, 1, 1, 1], CALIBRATION)
    assert '<img src="scores.png">' in page and '<img src="roc_image.png">' in page
    hist = np.asarray(Image.open(os.path.join(folder, "scores.png")).convert("RGB")).astype(int)
    assert hist.shape[1] > 300
    # green (good) and red (defective) bars both drawn
    assert ((hist[..., 1] > hist[..., 0] + 40) & (hist[..., 1] > hist[..., 2] + 40)).sum() > 50
    assert ((hist[..., 0] > hist[..., 1] + 60) & (hist[..., 0] > hist[..., 2] + 60)).sum() > 50


def test_own_unlabelled_images_without_masks_get_scores_verdicts_and_pictures(tmp_path):
    scores = [0.2, 0.9, 0.45, 0.6]
    folder, page = _report(tmp_path, scores, [-1, -1, -1, -1], CALIBRATION, with_masks=False)
    for name in ("scores.png", "unlabelled_highest.png"):
        assert os.path.isfile(os.path.join(folder, name)), name
    assert not os.path.exists(os.path.join(folder, "roc_image.png"))
    rows = layout(64, 64, predicted=True)[1][1]
    assert Image.open(os.path.join(folder, "unlabelled_highest.png")).size[1] == 4 * rows
    assert "<details open>" in page  # the scores table is the result: shown open
    assert "<td>n/a</td>" not in page and "No metrics: they need labelled test images" in page
    assert "F1-optimal" not in page  # no labels, no F1-optimal thresholds (not "n/a% at n/a")
    table = re.findall(r"<tr><td>line/(\d+)\.png</td><td>unlabelled</td><td>([\d.]+)</td><td>[\d.]+</td>"
                       r"<td>(\w+)</td></tr>", page)
    assert [(int(i), float(s), v) for i, s, v in table] == [
        (1, 0.9, "DEFECT"), (3, 0.6, "DEFECT"), (2, 0.45, "OK"), (0, 0.2, "OK")]  # highest first


def test_summary_report_names_the_method_and_its_published_rows(tmp_path):
    """An RD++ run's report.html is titled RD++ and shows RD++'s published means, not RD4AD's."""
    from report.html import write_summary_report

    results = {"bottle": {"pixel_auroc": 0.9, "sample_auroc": 0.8, "aupro_per_image": 0.7}}
    rdpp = open(write_summary_report(str(tmp_path / "a"), results, {"bottle": {"model": "rdpp"}})).read()
    assert "<title>RD++ results</title>" in rdpp and "RD++ paper" in rdpp and "RD4AD" not in rdpp
    rd4ad = open(write_summary_report(str(tmp_path / "b"), results, {"bottle": {"model": "rd4ad"}})).read()
    assert "<title>RD4AD results</title>" in rd4ad and "RD4AD paper" in rd4ad and "RD++" not in rd4ad
