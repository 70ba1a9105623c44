"""Where settings come from after training: eval takes the data folder from the run's
config.yaml and the model's settings from the checkpoint; export takes the run's class;
infer writes next to the model and replaces its previous outputs (never anything else);
teacher_weights auto works offline; a first run without data says how to start."""
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import export_model
import infer
import main
from conftest import ROOT

SAMPLE = os.path.join(ROOT, "sample_data", "bottle")
CLASS = "widget"
TINY = ["--arch", "resnet18", "--image_size", "64", "--teacher_weights", "none", "--epochs", "1",
        "--batch_size", "1", "--eval_interval", "0", "--log_interval", "0", "--no_report"]


def lines_of(text):
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]  # progress bars use \r


def one_error_line(code, out, err):
    assert code == 2, (out + err)[-2000:]
    lines = lines_of(err)
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in out + err
    return errors[0]


def make_data(root):
    data = root / "data"
    shutil.copytree(SAMPLE, data / CLASS)
    return data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run (non-default arch and size) on a one-class copy of the sample: (data, out)."""
    root = tmp_path_factory.mktemp("settings")
    data = make_data(root)
    out = root / "out"
    code = main.main([*TINY, "--data_dir", str(data), "--output_dir", str(out)])
    assert code == 0
    assert os.path.isfile(out / CLASS / "model.pdparams")
    return data, out


@pytest.fixture(scope="module")
def exported(trained):
    """The run's class exported to OUT/inference/CLASS (naming the class explicitly)."""
    data, out = trained
    model_dir = out / "inference" / CLASS
    if not os.path.isfile(model_dir / "deploy.json"):
        assert export_model.main(["--output_dir", str(out), "--cls", CLASS]) == 0
    return data, out, model_dir


# ------------------------------------------------------------------ 5, 6: eval takes the run's settings

def test_eval_needs_only_the_output_dir(trained, capsys, tmp_path, monkeypatch):
    data, out = trained
    monkeypatch.chdir(tmp_path)  # no mvtec/ here: the data folder must come from OUT/config.yaml
    os.remove(out / "results.json")
    code = main.main(["--mode", "eval", "--output_dir", str(out)])
    text = capsys.readouterr()
    assert code == 0, (text.out + text.err)[-2000:]
    results = json.load(open(out / "results.json"))
    assert results["config"]["mode"] == "eval"
    assert results["config"]["data_dir"] == str(data)
    assert list(results["classes"]) == [CLASS]
    pixel_auroc = results["classes"][CLASS]["pixel_auroc"]
    assert isinstance(pixel_auroc, float) and math.isfinite(pixel_auroc) and 0.0 <= pixel_auroc <= 1.0
    assert not os.listdir(tmp_path)  # nothing written in the working folder


def test_eval_refuses_flags_that_contradict_the_checkpoint(trained, capsys):
    _, out = trained
    before = sorted(os.listdir(out))
    code = main.main(["--mode", "eval", "--output_dir", str(out), "--arch", "resnet34", "--image_size", "96"])
    captured = capsys.readouterr()
    line = one_error_line(code, captured.out, captured.err)
    assert "--arch resnet18, not resnet34" in line, line
    assert "--image_size 64, not 96" in line, line
    assert sorted(os.listdir(out)) == before  # refused before anything is written


# ------------------------------------------------------------------ 7: export, quietly

def run_export(*args):
    from utils.runtime import child_environment

    proc = subprocess.run([sys.executable, "export_model.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=child_environment())
    return proc, proc.stdout + proc.stderr


def assert_one_clean_line(text):
    lines = lines_of(text)
    assert len(lines) == 1, text
    assert not re.match(r"^[IWEF]\d{4} ", lines[0]), text  # glog lines such as W1126 ...
    assert ".export-" not in text and "paddle2onnx" not in text.lower(), text


def test_export_takes_the_runs_one_class(trained):
    """The run trained exactly one class (its data folder holds one); export needs no --cls."""
    _, out = trained
    proc, text = run_export("--output_dir", str(out))
    assert proc.returncode == 0, text
    assert_one_clean_line(text)
    model_dir = out / "inference" / CLASS
    assert str(model_dir) in text
    assert json.load(open(model_dir / "deploy.json"))["class"] == CLASS


def test_export_prints_one_line(trained):
    _, out = trained
    proc, text = run_export("--output_dir", str(out), "--cls", CLASS)
    assert proc.returncode == 0, text
    assert_one_clean_line(text)
    model_dir = out / "inference" / CLASS
    assert os.path.isfile(model_dir / "deploy.json")
    assert not [n for n in os.listdir(model_dir) if n.startswith(".export-")]  # staging removed


# ------------------------------------------------------------------ 8: infer's default output

def scores_rows(folder):
    with open(folder / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_infer_replaces_its_previous_outputs_only(exported, capsys, tmp_path):
    data, _, model_dir = exported
    code = infer.main(["--model_dir", str(model_dir), "--data_dir", str(data), "--cls", CLASS])
    captured = capsys.readouterr()
    assert code == 0, (captured.out + captured.err)[-2000:]
    folder = model_dir / "infer"  # the default output: inside the model's folder
    first = [r["output"] for r in scores_rows(folder)]
    assert len(first) == 10 and all(first)
    assert {n for n in os.listdir(folder) if n.endswith(".png")} == {n + ".png" for n in first}
    assert set(os.listdir(folder / "masks")) == {n + ".png" for n in first}

    (folder / "mine.png").write_bytes(b"the user's own file")
    (folder / "masks" / "keep.png").write_bytes(b"also the user's")
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(os.path.join(SAMPLE, "test", "good", "000.png"), one / "solo.png")
    code = infer.main(["--model_dir", str(model_dir), "--image", str(one)])
    captured = capsys.readouterr()
    assert code == 0, (captured.out + captured.err)[-2000:]
    listed = [r["output"] for r in scores_rows(folder)]
    assert listed == ["solo"]
    pictures = {n for n in os.listdir(folder) if n.endswith(".png")}
    assert pictures == {"solo.png", "mine.png"}, pictures  # earlier pictures gone, the user's file kept
    assert set(os.listdir(folder / "masks")) == {"solo.png", "keep.png"}
    assert (folder / "mine.png").read_bytes() == b"the user's own file"


# ------------------------------------------------------------------ 9: a hostile scores.csv

def write_scores(path, outputs):
    from report.per_image import CSV_FIELDS

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for name in outputs:
            writer.writerow({k: "" for k in CSV_FIELDS} | {"image": "x.png", "output": name})


def test_previous_outputs_are_plain_names_only(tmp_path):
    from report.per_image import previous_outputs

    path = tmp_path / "scores.csv"
    write_scores(path, ["../x", "/etc/passwd", ".hidden", "a/b", "ok"])
    assert previous_outputs(str(path)) == ["ok"]


def test_clear_previous_never_leaves_its_folder(tmp_path):
    from report.per_image import ImageWriter

    folder = tmp_path / "out"
    (folder / "masks").mkdir(parents=True)
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not ours")
    (tmp_path / "masks").mkdir()
    outside_mask = tmp_path / "masks" / "outside.png"
    outside_mask.write_bytes(b"not ours either")
    for name in ("ok.png", os.path.join("masks", "ok.png")):
        (folder / name).write_bytes(b"ours")
    write_scores(folder / "scores.csv", ["../outside", os.path.join("..", "masks", "outside"), "ok"])
    ImageWriter(str(folder), None).clear_previous()
    assert outside.read_bytes() == b"not ours" and outside_mask.exists()
    assert not (folder / "ok.png").exists() and not (folder / "masks" / "ok.png").exists()  # its own: removed
    assert not (folder / "scores.csv").exists()


# ------------------------------------------------------------------ 10: teacher_weights auto, offline

@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network, an empty Paddle weights cache: returns the cache folder."""
    import paddle.utils.download as download

    import model.teacher as teacher

    home = tmp_path / "weights_home"
    home.mkdir()
    monkeypatch.setattr(download, "WEIGHTS_HOME", str(home))
    monkeypatch.setattr(teacher, "can_download", lambda *args, **kwargs: "URLError: offline")

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(download, "_download", no_download)
    return home


def test_auto_without_weights_or_network_is_a_random_teacher(offline):
    from model.teacher import resolve_teacher_weights

    warnings = []
    assert resolve_teacher_weights("auto", "resnet18", warn=warnings.append) == "none"
    assert len(warnings) == 1 and "RANDOM teacher" in warnings[0], warnings
    assert resolve_teacher_weights("none", "resnet18", warn=warnings.append) == "none"
    assert len(warnings) == 1  # only 'auto' falls back, and says so


def test_auto_uses_cached_weights_offline(offline, monkeypatch):
    import paddle
    from paddle.vision.models import resnet as paddle_resnet

    from model.teacher import Teacher, cached_imagenet_weights, load_teacher_weights, resolve_teacher_weights

    url = paddle_resnet.model_urls["resnet18"][0]
    monkeypatch.setitem(paddle_resnet.model_urls, "resnet18", (url, None))  # no md5 of the real file
    rng = np.random.default_rng(7)
    state = {k: v.numpy() for k, v in Teacher("resnet18").state_dict().items()}
    state["conv1.weight"] = rng.standard_normal(state["conv1.weight"].shape).astype(np.float32)
    path = cached_imagenet_weights("resnet18")
    assert os.path.dirname(path) == str(offline)
    paddle.save(state, path)

    warnings = []
    assert resolve_teacher_weights("auto", "resnet18", warn=warnings.append) == "imagenet"
    assert not warnings
    teacher = Teacher("resnet18")
    assert not np.allclose(teacher.state_dict()["conv1.weight"].numpy(), state["conv1.weight"])
    load_teacher_weights(teacher, "auto")
    loaded = teacher.state_dict()
    np.testing.assert_array_equal(loaded["conv1.weight"].numpy(), state["conv1.weight"])
    key = "layer3.0.conv1.weight"
    np.testing.assert_array_equal(loaded[key].numpy(), state[key])


def test_training_with_auto_offline_records_a_random_teacher(offline, tmp_path, capsys):
    from engine.checkpoint import load_checkpoint

    data = make_data(tmp_path)
    out = tmp_path / "out"
    args = [a for a in TINY]
    args[args.index("--teacher_weights") + 1] = "auto"
    code = main.main([*args, "--data_dir", str(data), "--output_dir", str(out)])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 0, text[-2000:]
    assert text.count("RANDOM teacher") == 1, text[-3000:]
    assert load_checkpoint(str(out / CLASS / "model.pdparams"))["teacher_weights"] == "none"


# ------------------------------------------------------------------ 11: the first run

def test_first_run_without_data_says_how_to_start(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main.main([])
    captured = capsys.readouterr()
    line = one_error_line(code, captured.out, captured.err)
    assert "data directory not found" in line, line
    assert "python main.py --config configs/sample_bottle.yaml" in line, line
    assert not os.listdir(tmp_path)  # nothing created
