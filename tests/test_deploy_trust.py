"""export_model.py and infer.py under hostile inputs: a broken model folder in any way,
bad settings, outputs that are not finite, colliding and long names, an output folder
inside the input folder, a folder in use, Ctrl-C. Each mistake is exactly one line
`error: ...` naming the file, exit status 2, no traceback and nothing written; an image
that could not be scored is never OK or DEFECT and makes the run exit 1."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

import deploy.export
import export_model
import infer
from deploy.export import ExportError
from deploy.predictor import PaddlePredictor
from utils.runtime import child_environment
from conftest import ROOT
from model import build_rd4ad
from engine.checkpoint import save_checkpoint
from utils.lock import LOCK_NAME, OutputLock

SIZE = 64
CALIBRATION = {"image_threshold": 1.0, "pixel_threshold": 1.0, "image_low": 0.8, "pixel_low": 0.2,
               "quantile": 0.995, "count": 20, "source": "validation"}
GOOD = os.path.join(ROOT, "sample_data", "bottle", "test", "good")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, model folder with model.json, model.pdiparams, model.onnx, deploy.json)."""
    root = tmp_path_factory.mktemp("trust")
    paddle.seed(7)
    ckpt = str(root / "bottle" / "model.pdparams")
    save_checkpoint(ckpt, build_rd4ad("resnet18", teacher_weights="none"), arch="resnet18",
                    image_size=SIZE, epoch=1, cls="bottle", teacher_weights="none",
                    extra={"calibration": CALIBRATION, "score_stats": {"mean": 1.0, "std": 0.1}})
    save_dir = str(root / "inference" / "bottle")
    assert export_model.main(["--checkpoint", ckpt, "--save_dir", save_dir, "--onnx"]) == 0
    return ckpt, save_dir


def clone(model_dir, dst):
    """A model folder whose large files are symlinks to the real export (cheap); `own`
    makes one a real copy before a test changes it."""
    os.makedirs(dst)
    for name in os.listdir(model_dir):
        if name == "deploy.json":
            shutil.copy(os.path.join(model_dir, name), os.path.join(dst, name))
        else:
            os.symlink(os.path.join(model_dir, name), os.path.join(dst, name))
    return str(dst)


def own(path):
    real = os.path.realpath(path)
    os.remove(path)
    shutil.copy(real, path)
    return path


def edit_deploy(folder, change):
    path = os.path.join(folder, "deploy.json")
    meta = json.load(open(path))
    meta = change(meta)
    with open(path, "w") as f:
        f.write(meta if isinstance(meta, str) else json.dumps(meta))


def expect_one_line(capsys, code, status, *names, out=None):
    """Exit status, exactly one line on stderr starting 'error: ' naming each of `names`,
    no traceback, and (out) the output folder never created."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == status, captured.err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err[-2000:]
    assert "Traceback" not in captured.err + captured.out
    for name in names:
        assert name in lines[0], lines[0]
    if out is not None:
        assert not os.path.exists(out)
    return lines[0]


def images_folder(tmp_path, names=("a.png", "b.png")):
    folder = tmp_path / "images"
    for k, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40, 3), 60 * k, np.uint8)).save(path)
    return str(folder)


def rows_of(out):
    return list(csv.DictReader(open(os.path.join(out, "scores.csv"))))


def run_infer(model_dir, image, out, *extra):
    return infer.main(["--model_dir", model_dir, "--image", image, "--output_dir", out,
                       "--cpu_threads", "1", *extra])


# ------------------------------------------------------------------ broken model folders

def _remove(path):
    os.remove(path)


def _empty(path):
    own(path)
    open(path, "w").close()


def _truncate(path):
    own(path)
    os.truncate(path, os.path.getsize(path) // 3)


def _flip_byte(path):  # same size, other content: only the sha256 tells
    own(path)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("backend,name", [("paddle", "model.json"), ("paddle", "model.pdiparams"),
                                          ("onnxruntime", "model.onnx")])
@pytest.mark.parametrize("damage,says", [(_remove, "not found"), (_empty, "empty file"),
                                         (_truncate, "truncated"), (_flip_byte, "changed since the export")])
def test_damaged_model_file_is_one_line_naming_it(exported, tmp_path, capsys, backend, name, damage, says):
    folder = clone(exported[1], tmp_path / "model")
    damage(os.path.join(folder, name))
    out = str(tmp_path / "out")
    code = run_infer(folder, GOOD, out, "--backend", backend)
    line = expect_one_line(capsys, code, 2, os.path.join(folder, name), says, out=out)
    assert "nan" not in line


def test_missing_weights_never_exit_0_with_nan_scores_and_ok(exported, tmp_path, capsys):
    """The issue's case: without model.pdiparams Paddle runs random weights, scoring nan."""
    folder = clone(exported[1], tmp_path / "model")
    os.remove(os.path.join(folder, "model.pdiparams"))
    out = str(tmp_path / "out")
    code = run_infer(folder, GOOD, out)
    expect_one_line(capsys, code, 2, "model.pdiparams", out=out)
    # an older export without the manifest: still refused, by the existence check
    edit_deploy(folder, lambda m: {k: v for k, v in m.items() if k != "files"})
    code = run_infer(folder, GOOD, out)
    expect_one_line(capsys, code, 2, "model.pdiparams: not found", out=out)


@pytest.mark.parametrize("name,change", [
    ("model.json", lambda p: open(p, "w").write("{not json")),
    ("model.pdiparams", lambda p: os.truncate(own(p), 1000)),
    ("model.onnx", lambda p: os.truncate(own(p), 1000)),
])
def test_older_export_without_manifest_still_one_line(exported, tmp_path, capsys, name, change):
    """Exports written before the manifest: damage is found by parsing or loading, and
    whatever the runtime raises becomes one bounded line naming the file."""
    folder = clone(exported[1], tmp_path / "model")
    edit_deploy(folder, lambda m: {k: v for k, v in m.items() if k != "files"})
    path = os.path.join(folder, name)
    if name == "model.json":
        own(path)
    change(path)
    out = str(tmp_path / "out")
    backend = "onnxruntime" if name.endswith(".onnx") else "paddle"
    code = run_infer(folder, GOOD, out, "--backend", backend)
    line = expect_one_line(capsys, code, 2, out=out)
    assert name in line and len(line) < 600


DEPLOY_DAMAGE = [
    ("missing", None, "deploy.json: not found"),
    ("not JSON", lambda m: '{"format": ', "not valid JSON"),
    ("not an object", lambda m: "[1, 2, 3]", "a JSON object is expected"),
    ("other format", lambda m: {**m, "format": "something-else/1"}, "not an RD4AD-Paddle export"),
    ("no arch", lambda m: {k: v for k, v in m.items() if k != "arch"}, "'arch' must be"),
    ("arch a list", lambda m: {**m, "arch": ["resnet18"]}, "'arch' must be"),
    ("size a string", lambda m: {**m, "image_size": "64"}, "'image_size' must be"),
    ("size not /32", lambda m: {**m, "image_size": 80}, "'image_size' must be"),
    ("size a bool", lambda m: {**m, "image_size": True}, "'image_size' must be"),
    ("mean of 2", lambda m: {**m, "mean": [0.4, 0.4]}, "'mean' must be"),
    ("std zero", lambda m: {**m, "std": [0.2, 0.0, 0.2]}, "'std' must be"),
    ("std under float32", lambda m: {**m, "std": [0.2, 1e-300, 0.2]}, "'std' must be"),  # 0.0 in float32
    ("mean over float32", lambda m: {**m, "mean": [0.4, 1e300, 0.4]}, "'mean' must be"),
    ("outputs swapped", lambda m: {**m, "outputs": ["score", "anomaly_map"]}, "'outputs' must be"),
    ("calibration text", lambda m: {**m, "calibration": {**m["calibration"], "image_threshold": "1"}},
     "calibration image_threshold"),
    ("calibration list", lambda m: {**m, "calibration": [1.0]}, "calibration must be a mapping"),
    ("stats text", lambda m: {**m, "score_stats": {"mean": "x"}}, "'score_stats' must be"),
    ("manifest garbage", lambda m: {**m, "files": {"../x": 3}}, "'files' must map"),
    ("class a number", lambda m: {**m, "class": 3}, "'class' must be"),
]


@pytest.mark.parametrize("case,change,says", DEPLOY_DAMAGE, ids=[c[0] for c in DEPLOY_DAMAGE])
def test_broken_deploy_json_is_one_line(exported, tmp_path, capsys, case, change, says):
    folder = clone(exported[1], tmp_path / "model")
    if change is None:
        os.remove(os.path.join(folder, "deploy.json"))
    else:
        edit_deploy(folder, change)
    out = str(tmp_path / "out")
    code = run_infer(folder, GOOD, out)
    expect_one_line(capsys, code, 2, os.path.join(folder, "deploy.json"), says, out=out)


@pytest.mark.parametrize("backend,graph", [("paddle", "model.json"), ("onnxruntime", "model.onnx")])
def test_image_size_disagreeing_with_the_graph(exported, tmp_path, capsys, backend, graph):
    """deploy.json says 96 px, the graph takes 64 (the manifest still matches: deploy.json
    itself is not in it), read from model.json / the ONNX session's input shape."""
    folder = clone(exported[1], tmp_path / "model")
    edit_deploy(folder, lambda m: {**m, "image_size": 96})
    out = str(tmp_path / "out")
    code = run_infer(folder, GOOD, out, "--backend", backend)
    expect_one_line(capsys, code, 2, "deploy.json: image_size 96 disagrees with the graph's input 64x64",
                    graph, out=out)


def test_stale_onnx_from_an_earlier_export_is_refused(exported, tmp_path, capsys):
    """Re-exporting without --onnx leaves the old model.onnx; it is not part of the new
    export, so ONNX Runtime never runs weights that disagree with model.pdiparams."""
    ckpt, save_dir = exported
    folder = str(tmp_path / "model")
    shutil.copytree(save_dir, folder)
    assert export_model.main(["--checkpoint", ckpt, "--save_dir", folder]) == 0
    capsys.readouterr()
    out = str(tmp_path / "out")
    code = run_infer(folder, GOOD, out, "--backend", "onnxruntime")
    expect_one_line(capsys, code, 2, "model.onnx: not part of this export", out=out)


def test_export_writes_a_manifest_that_matches_the_files(exported):
    import hashlib
    _, save_dir = exported
    files = json.load(open(os.path.join(save_dir, "deploy.json")))["files"]
    assert sorted(files) == ["model.json", "model.onnx", "model.pdiparams"]
    for name, record in files.items():
        data = open(os.path.join(save_dir, name), "rb").read()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ------------------------------------------------------------------ settings

@pytest.mark.parametrize("flags,says", [
    (["--threshold", "nan"], "--threshold nan: must be a finite number"),
    (["--threshold", "inf"], "--threshold inf: must be a finite number"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--cpu_threads", "0"], "--cpu_threads 0: must be at least 1"),
    (["--warmup", "-1"], "--warmup -1: must be at least 0"),
    (["--batch_size", "two"], "see"),
    (["--backend", "tvm"], "see"),
    (["--no_such_flag"], "see"),
])
def test_bad_setting_is_one_line_and_writes_nothing(exported, tmp_path, capsys, flags, says):
    out = str(tmp_path / "out")
    code = run_infer(exported[1], GOOD, out, *flags)
    expect_one_line(capsys, code, 2, says, out=out)


@pytest.mark.parametrize("cls", ["../x", "/abs", "", "a/b"])
def test_cls_must_be_a_name(exported, tmp_path, capsys, cls):
    out = str(tmp_path / "out")
    code = infer.main(["--model_dir", exported[1], "--data_dir", os.path.join(ROOT, "sample_data"),
                       "--cls", cls, "--output_dir", out])
    expect_one_line(capsys, code, 2, "--cls", out=out)


# ------------------------------------------------------------------ never a confident wrong answer

def _poison(monkeypatch, which):
    """Make the predictor's outputs non-finite for the images `which` picks."""
    original = PaddlePredictor.run

    def call(self, images):
        maps, scores = original(self, images)
        maps, scores = maps.copy(), scores.copy()
        for k in range(len(scores)):
            if which(k):
                scores[k] = np.nan
                maps[k, 0, 0] = np.inf
        return maps, scores
    monkeypatch.setattr(PaddlePredictor, "run", call)


def test_non_finite_output_is_never_a_verdict(exported, tmp_path, capsys, monkeypatch):
    _poison(monkeypatch, lambda k: k == 0)
    folder = images_folder(tmp_path)
    out = str(tmp_path / "out")
    code = run_infer(exported[1], folder, out, "--batch_size", "2")
    line = expect_one_line(capsys, code, 1, "1 of 2 images failed", "scores.csv")
    assert line.startswith("error: ")
    bad, good = rows_of(out)
    assert bad["verdict"] == "" and bad["score"] == "" and bad["normalized_score"] == ""
    assert "not finite" in bad["error"] and bad["output"] == ""
    assert good["verdict"] in ("OK", "DEFECT") and good["error"] == "" and good["output"] == "b"
    # nothing claiming a verdict for the bad image: no mask, no picture
    assert sorted(os.listdir(os.path.join(out, "masks"))) == ["b.png"]
    assert not os.path.exists(os.path.join(out, "a.png"))


def test_all_outputs_non_finite_exits_1(exported, tmp_path, capsys, monkeypatch):
    _poison(monkeypatch, lambda k: True)
    out = str(tmp_path / "out")
    code = run_infer(exported[1], images_folder(tmp_path), out)
    expect_one_line(capsys, code, 1, "no image could be processed")
    assert all(r["verdict"] == "" and r["error"] for r in rows_of(out))


def test_a_map_with_inf_but_finite_score_is_not_a_verdict(exported, tmp_path, capsys, monkeypatch):
    original = PaddlePredictor.run

    def call(self, images):
        maps, scores = original(self, images)
        maps = maps.copy()
        maps[:, 3, 3] = -np.inf  # the maximum (the score) stays finite
        return maps, scores
    monkeypatch.setattr(PaddlePredictor, "run", call)
    out = str(tmp_path / "out")
    code = run_infer(exported[1], images_folder(tmp_path, ("a.png",)), out)
    expect_one_line(capsys, code, 1, "no image could be processed")
    assert rows_of(out)[0]["verdict"] == ""


def test_unreadable_image_makes_the_run_exit_1(exported, tmp_path, capsys):
    folder = images_folder(tmp_path, ("a.png",))
    with open(os.path.join(folder, "broken.png"), "wb") as f:
        f.write(b"not an image")
    out = str(tmp_path / "out")
    code = run_infer(exported[1], folder, out)
    expect_one_line(capsys, code, 1, "1 of 2 images failed")
    rows = {os.path.basename(r["image"]): r for r in rows_of(out)}
    assert rows["broken.png"]["verdict"] == "" and "cannot read image" in rows["broken.png"]["error"]
    assert rows["a.png"]["verdict"] in ("OK", "DEFECT")


def test_every_image_scored_exits_0_with_one_row_each(exported, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_infer(exported[1], images_folder(tmp_path), out) == 0
    assert capsys.readouterr().err.strip() == ""
    assert [r["output"] for r in rows_of(out)] == ["a", "b"]
    assert not os.path.exists(os.path.join(out, LOCK_NAME))  # the lock is released


# ------------------------------------------------------------------ names

@pytest.mark.parametrize("names", [("x.png", "x.jpg"), ("a/b_x.png", "a_b/x.png"), ("X.png", "x.png")])
def test_colliding_names_give_distinct_pictures_and_masks(exported, tmp_path, names):
    folder = images_folder(tmp_path, names)
    if names == ("X.png", "x.png") and len(os.listdir(folder)) < 2:  # case-insensitive
        pytest.skip("X.png and x.png are one file on this file system")
    out = str(tmp_path / "out")
    assert run_infer(exported[1], folder, out) == 0
    rows = rows_of(out)
    outputs = [r["output"] for r in rows]
    assert len(rows) == 2 and len(set(o.lower() for o in outputs)) == 2
    for r in rows:  # each row's own picture and mask
        assert os.path.isfile(os.path.join(out, r["output"] + ".png"))
        assert os.path.isfile(os.path.join(out, "masks", r["output"] + ".png"))
    assert len(os.listdir(os.path.join(out, "masks"))) == 2


def test_a_246_character_file_name_works(exported, tmp_path):
    long_name = "n" * 246 + ".png"
    out = str(tmp_path / "out")
    assert run_infer(exported[1], images_folder(tmp_path, (long_name, "short.png")), out) == 0
    rows = {os.path.basename(r["image"]): r for r in rows_of(out)}
    name = rows[long_name]["output"]
    assert len(name.encode()) <= 160 and rows[long_name]["verdict"] in ("OK", "DEFECT")
    assert os.path.isfile(os.path.join(out, name + ".png"))
    assert os.path.isfile(os.path.join(out, "masks", name + ".png"))


# ------------------------------------------------------------------ never reading its own output

def test_output_inside_the_image_folder_is_never_read_back(exported, tmp_path):
    folder = images_folder(tmp_path)
    out = os.path.join(folder, "results")
    counts = []
    for _ in range(3):
        assert run_infer(exported[1], folder, out) == 0
        counts.append(len(rows_of(out)))
    assert counts == [2, 2, 2]
    # also when the output folder is named through a symlink
    link = str(tmp_path / "link")
    os.symlink(out, link)
    assert run_infer(exported[1], folder, link) == 0 and len(rows_of(out)) == 2


def test_output_equal_to_the_image_folder_is_refused(exported, tmp_path, capsys):
    folder = images_folder(tmp_path)
    before = sorted(os.listdir(folder))
    code = run_infer(exported[1], folder, folder)
    expect_one_line(capsys, code, 2, "--output_dir is the --image folder")
    code = run_infer(exported[1], os.path.join(folder, "."), folder + os.sep)
    expect_one_line(capsys, code, 2, "--output_dir is the --image folder")
    assert sorted(os.listdir(folder)) == before


def test_output_inside_the_data_dir_test_folder_is_refused(exported, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(ROOT, "sample_data", "bottle"), data / "bottle")
    out = str(data / "bottle" / "test" / "results")
    code = infer.main(["--model_dir", exported[1], "--data_dir", str(data), "--cls", "bottle",
                       "--output_dir", out])
    expect_one_line(capsys, code, 2, "inside the test folder", out=out)


# ------------------------------------------------------------------ lock and Ctrl-C

def test_a_folder_in_use_is_refused(exported, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(str(out)):
        code = run_infer(exported[1], images_folder(tmp_path), str(out))
    expect_one_line(capsys, code, 2, "in use by another run")
    assert not (out / "scores.csv").exists()


def test_ctrl_c_is_one_line_exit_130(exported, tmp_path, capsys, monkeypatch):
    def interrupted(self, images):
        raise KeyboardInterrupt
    monkeypatch.setattr(PaddlePredictor, "run", interrupted)
    out = tmp_path / "out"
    code = run_infer(exported[1], images_folder(tmp_path), str(out))
    assert expect_one_line(capsys, code, 130) == "error: interrupted"
    assert sorted(os.listdir(out)) == []  # no scores.csv, no lock, no temporary file


# ------------------------------------------------------------------ export

def _checkpoint_missing_parts(path):
    paddle.save({"format": "rd4ad-paddle/1", "arch": "resnet18", "image_size": SIZE, "epoch": 1,
                 "class": "bottle", "teacher_weights": "none"}, path)


def _checkpoint_wrong_types(path):
    net = build_rd4ad("resnet18", teacher_weights="none")
    save_checkpoint(path, net, arch="resnet18", image_size=SIZE, epoch=1, cls="bottle",
                    teacher_weights="none", extra={"calibration": {**CALIBRATION, "count": "20"}})


def _checkpoint_huge_class(path):  # deploy.json would be 2 MB: more than infer.py reads
    net = build_rd4ad("resnet18", teacher_weights="none")
    save_checkpoint(path, net, arch="resnet18", image_size=SIZE, epoch=1, cls="c" * 2_000_000, teacher_weights="none")


def _checkpoint_huge_threshold(path):
    net = build_rd4ad("resnet18", teacher_weights="none")
    save_checkpoint(path, net, arch="resnet18", image_size=SIZE, epoch=1, cls="bottle",
                    teacher_weights="none", extra={"calibration": {**CALIBRATION, "image_threshold": 1e308}})


@pytest.mark.parametrize("make,says", [(_checkpoint_missing_parts, "'bottleneck' must be"),
                                       (_checkpoint_wrong_types, "calibration count"),
                                       (_checkpoint_huge_class, "'class' must be a string of at most 255"),
                                       (_checkpoint_huge_threshold, "calibration image_threshold")])
def test_export_of_a_damaged_checkpoint_writes_nothing(tmp_path, capsys, make, says):
    ckpt = str(tmp_path / "model.pdparams")
    make(ckpt)
    save_dir = str(tmp_path / "inference" / "bottle")
    code = export_model.main(["--checkpoint", ckpt, "--save_dir", save_dir])
    expect_one_line(capsys, code, 2, ckpt, says)
    assert not os.path.exists(tmp_path / "inference")


@pytest.mark.parametrize("flags,says", [
    (["--opset", "99"], "--opset 99"), (["--opset", "0"], "--opset 0"),
    (["--calib_images", "0"], "--calib_images 0"), (["--cls", "../x"], "--cls"),
    (["--cls", "/abs"], "--cls"), (["--int8"], "--int8 needs --onnx"), (["--bogus"], "see"),
])
def test_export_bad_setting_is_one_line_and_writes_nothing(exported, tmp_path, capsys, flags, says):
    save_dir = str(tmp_path / "inference")
    code = export_model.main(["--checkpoint", exported[0], "--save_dir", save_dir, "--onnx", *flags])
    expect_one_line(capsys, code, 2, says)
    assert not os.path.exists(save_dir)


def test_export_to_a_file_is_one_line(exported, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    code = export_model.main(["--checkpoint", exported[0], "--save_dir", str(target)])
    expect_one_line(capsys, code, 2, str(target), "is a file")
    code = export_model.main(["--checkpoint", exported[0], "--save_dir", str(target / "sub")])
    expect_one_line(capsys, code, 2, "sub")
    assert target.read_text() == "keep me"


def test_export_that_fails_midway_removes_the_folder_it_created(exported, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise ExportError("model.onnx: paddle2onnx could not convert the graph")
    monkeypatch.setattr(deploy.export, "export_onnx", fail)
    save_dir = tmp_path / "new" / "bottle"
    code = export_model.main(["--checkpoint", exported[0], "--save_dir", str(save_dir), "--onnx"])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    # the slow stage announces itself (issue 23 §5), then the one-line error
    assert code == 2 and len(lines) == 2 and lines[0].startswith("converting to ONNX"), captured.err
    assert lines[1].startswith("error: ") and "paddle2onnx could not convert" in lines[1]
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ the real command line

def test_command_line_on_a_real_export(exported, tmp_path):
    """python infer.py: exit 0 and a row per image on a good export; exit 2 and exactly
    one stderr line on a broken one (nothing from Paddle's C++ side either)."""
    env = child_environment(PYTHONWARNINGS="ignore")  # as a shell would start it: no thread count of ours
    out = str(tmp_path / "out")
    cmd = [sys.executable, os.path.join(ROOT, "infer.py"), "--model_dir", exported[1], "--image", GOOD,
           "--output_dir", out, "--cpu_threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(rows_of(out)) == len(os.listdir(GOOD))
    folder = clone(exported[1], tmp_path / "model")
    os.remove(os.path.join(folder, "model.pdiparams"))
    cmd[3] = folder
    cmd[7] = str(tmp_path / "out2")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and "model.pdiparams" in lines[0]
    assert not os.path.exists(tmp_path / "out2")


def test_truncated_or_random_deploy_json_is_never_a_run(exported, tmp_path, capsys):
    """deploy.json cut anywhere, or random bytes: one line and exit 2, never a traceback
    and never a run with verdicts."""
    folder = clone(exported[1], tmp_path / "model")
    path = os.path.join(folder, "deploy.json")
    text = open(path, "rb").read()
    rng = np.random.default_rng(0)
    cases = [text[:n] for n in sorted(rng.choice(len(text) - 1, 12, replace=False))]
    cases += [rng.bytes(int(n)) for n in (1, 50, 2000)]
    out = str(tmp_path / "out")
    for data in cases:
        with open(path, "wb") as f:
            f.write(data)
        code = run_infer(folder, GOOD, out)
        expect_one_line(capsys, code, 2, path, out=out)


@pytest.mark.parametrize("graph", ['{"#": "p.data", "A": 5}', '{"A": [{"N": ["x"], "AT": {"D": 1}}], "#": "1.data"}',
                                   '[1, [2, {"#": 3}]]'])
def test_model_json_of_another_shape_is_one_line(exported, tmp_path, capsys, graph):
    """Valid JSON that is no Paddle graph, with a manifest that matches it (as a careless
    re-export would write): one line naming model.json, never an internal error."""
    _, save_dir = exported
    folder = clone(save_dir, tmp_path / "model")
    os.remove(os.path.join(folder, "model.json"))
    with open(os.path.join(folder, "model.json"), "w") as f:
        f.write(graph)
    from deploy.deployment import file_record

    edit_deploy(folder, lambda m: {**m, "files": {**m["files"], "model.json": file_record(os.path.join(folder, "model.json"))}})
    code = run_infer(folder, images_folder(tmp_path), str(tmp_path / "out"))
    line = expect_one_line(capsys, code, 2, "model.json")
    assert "internal error" not in line
