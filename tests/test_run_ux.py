"""How runs stop, resume and answer, as a newcomer meets them: SIGTERM ends training like
Ctrl-C (exit 143, one line, resumable), --resume and --mode eval take the run's saved
settings, an unfinished run says so in every report, --help loads no Paddle, no flag is
matched by its prefix."""
import ast
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import main
from conftest import ROOT
from engine.config import parse_config
from test_settings import one_error_line
from utils.config import ConfigError
from utils.runtime import child_environment

SAMPLE = os.path.join(ROOT, "sample_data")
TINY = ["--data_dir", SAMPLE, "--cls", "bottle", "--arch", "resnet18", "--image_size", "64",
        "--teacher_weights", "none", "--batch_size", "1", "--eval_interval", "0", "--save_interval", "1",
        "--log_interval", "0", "--no_report"]


PROGRESS_BAR = re.compile(r"^\s*$|\|.*\| *\d+/\d+ \[")  # tqdm's, redrawn in place on stderr


def said_lines(stderr):
    """stderr's lines but the progress bars'."""
    return [line for line in re.split(r"[\r\n]", stderr) if not PROGRESS_BAR.search(line)]


def test_sigterm_mid_training_is_one_line_exit_143_and_resumable(tmp_path):
    out = str(tmp_path / "run")
    state = os.path.join(out, "bottle", "train_state.pdparams")
    proc = subprocess.Popen([sys.executable, "main.py", *TINY, "--epochs", "6", "--output_dir", out], cwd=ROOT,
                            env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and not os.path.exists(state) and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "training ended before it could be stopped"
    time.sleep(0.5)  # mid-epoch, inside Paddle's kernels
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "FatalError" not in stdout + stderr and "Traceback" not in stdout + stderr
    lines = said_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: stopped by SIGTERM")
    assert f"python main.py --resume --output_dir {out}" in lines[0]
    # the command it names, as given: the run's own settings, continued from the saved state
    again = subprocess.run([sys.executable, "main.py", "--resume", "--output_dir", out],
                           cwd=ROOT, env=child_environment(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resumed after epoch" in again.stdout, (again.stdout + again.stderr)[-2000:]
    assert json.loads(open(os.path.join(out, "bottle", "status.json")).read())["finished"]


def test_resume_and_eval_take_the_runs_saved_settings(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(f"data_dir: {SAMPLE}\ncls: bottle\narch: resnet18\nimage_size: 64\n"
                                     f"epochs: 7\nbatch_size: 1\nlog_interval: 0\nmode: train\nresume: false\n")
    cfg = parse_config(["--resume", "--output_dir", str(out), "--log_interval", "3"])
    assert (cfg.data_dir, cfg.cls, cfg.arch, cfg.image_size, cfg.epochs, cfg.batch_size) == \
        (SAMPLE, "bottle", "resnet18", 64, 7, 1)
    assert cfg.log_interval == 3 and cfg.resume and cfg.mode == "train"  # flags override; its own mode
    cfg = parse_config(["--mode", "eval", "--output_dir", str(out)])
    assert (cfg.epochs, cfg.data_dir, cfg.mode, cfg.resume) == (7, SAMPLE, "eval", False)
    # a new training run in the same folder starts from the defaults
    assert parse_config(["--output_dir", str(out)]).epochs == 200


@pytest.mark.parametrize("line, message", [
    ("image_size: 65", "--image_size 65: must be a multiple of 32"),
    ("epochs: 0", "--epochs 0: must be at least 1"),
    ("lr: .nan", "lr nan must be a finite number"),
    ("arch: evil", "arch must be one of"),
])
def test_a_hostile_saved_value_is_refused_as_the_command_line_would(tmp_path, capsys, line, message):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(f"data_dir: {SAMPLE}\n{line}\n")
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(["--resume", "--output_dir", str(out)])
    assert str(out / "config.yaml") in str(err.value)
    error = one_error_line(main.main(["--resume", "--output_dir", str(out)]), *capsys.readouterr())
    assert str(out / "config.yaml") in error and not (out / "bottle").exists()


def test_eval_of_an_unfinished_run_says_so_in_every_report(tmp_path, capsys):
    from engine.checkpoint import save_checkpoint
    from model import build_rd4ad

    out = tmp_path / "run"
    (out / "bottle").mkdir(parents=True)
    (out / "config.yaml").write_text(f"data_dir: {SAMPLE}\ncls: bottle\narch: resnet18\nimage_size: 64\n"
                                     f"epochs: 10\nteacher_weights: none\n")
    # what training leaves at its epoch-3 evaluation: a model without thresholds, no status.json
    save_checkpoint(str(out / "bottle" / "model.pdparams"), build_rd4ad("resnet18", "none", 64), arch="resnet18",
                    image_size=64, epoch=3, cls="bottle", teacher_weights="none")
    assert main.main(["--mode", "eval", "--output_dir", str(out)]) == 0
    said = capsys.readouterr().out
    assert "UNFINISHED" in said and "epoch 3 of 10" in said and f"--resume --output_dir {out}" in said
    assert json.loads((out / "results.json").read_text())["unfinished"] == {"bottle": "epoch 3 of 10"}
    assert "UNFINISHED training run (bottle at epoch 3 of 10)" in (out / "results.md").read_text()
    assert 'class="unfinished"' in (out / "report.html").read_text()


def test_eval_before_the_first_model_names_the_run_unfinished(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "bottle").mkdir(parents=True)
    (out / "config.yaml").write_text(f"data_dir: {SAMPLE}\ncls: bottle\n")
    (out / "bottle" / "train_state.pdparams").write_bytes(b"state")
    error = one_error_line(main.main(["--mode", "eval", "--output_dir", str(out)]), *capsys.readouterr())
    assert "UNFINISHED" in error and "--resume" in error


def imported_modules(script, *args):
    """The modules a command imports, from python -X importtime (no timing is judged)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    return proc.stdout, names


@pytest.mark.parametrize("script, example", [("main.py", "configs/sample_bottle.yaml"),
                                             ("export_model.py", "--onnx"), ("infer.py", "--image"),
                                             ("serve.py", "--model_dir")])
def test_help_loads_no_paddle_and_ends_with_examples(script, example):
    text, names = imported_modules(script, "--help")
    assert "core.paths" in names  # the trace is real: the command's own light modules are in it
    assert not [n for n in names if n.split(".")[0] == "paddle"]
    examples = text.split("examples:")[1].strip().splitlines()
    assert len(examples) == 2 and all(line.strip().startswith(f"python {script}") for line in examples)
    assert example in text.split("examples:")[1]


def test_the_plain_choices_match_the_modules_that_give_them_meaning():
    from deploy.options import BACKEND_NAMES
    from deploy.predictor import BACKENDS
    from model.arch import ARCHS
    from model.choices import ARCH_NAMES

    assert BACKEND_NAMES == tuple(BACKENDS) and ARCH_NAMES == tuple(ARCHS)


def test_a_flag_is_never_matched_by_its_prefix(capsys):
    error = one_error_line(main.main(["--epoch", "2"]), *capsys.readouterr())
    assert "unrecognized arguments: --epoch 2" in error


def test_every_argument_parser_of_the_repo_refuses_prefixes():
    """Each ArgumentParser(...) call outside tests is ours (which sets allow_abbrev=False) or
    passes allow_abbrev=False itself."""
    from utils.cli import OneLineArgumentParser

    assert OneLineArgumentParser().allow_abbrev is False
    offenders, seen = [], 0
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        if os.sep + "tests" + os.sep in path:
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                    "ArgumentParser":
                seen += 1
                if not any(k.arg == "allow_abbrev" and getattr(k.value, "value", None) is False
                           for k in node.keywords):
                    offenders.append(os.path.relpath(path, ROOT))
    assert seen >= 3 and not offenders, offenders


def test_the_own_data_walkthrough_runs_on_five_images(tmp_path):
    """doc/own_data.md's two commands, as written, on photos/train (5 good images) and
    photos/line (2 new images, unlabelled); only the teacher is pinned (no network in tests)."""
    import shutil

    bottle = os.path.join(SAMPLE, "bottle")
    train, line = tmp_path / "photos" / "train", tmp_path / "photos" / "line"
    train.mkdir(parents=True)
    line.mkdir()
    goods = sorted(glob.glob(os.path.join(bottle, "train", "good", "*.png")))
    goods.append(os.path.join(bottle, "test", "good", "000.png"))
    for i, path in enumerate(goods):
        shutil.copy(path, train / f"{i}.png")
    shutil.copy(os.path.join(bottle, "test", "good", "001.png"), line / "a.png")
    shutil.copy(os.path.join(bottle, "test", "crack", "000.png"), line / "b.png")
    assert len(os.listdir(train)) == 5
    offline = ["--teacher_weights", "none"]
    walkthrough = [["main.py", "--config", os.path.join(ROOT, "configs", "own_data_small.yaml"),
                    "--train_dir", "photos/train", "--test_dir", "photos/line", "--output_dir", "output/photos",
                    *offline],
                   ["main.py", "--mode", "infer", "--output_dir", "output/photos"]]
    for args in walkthrough:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *args[1:]], cwd=tmp_path,
                              env=child_environment(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = (tmp_path / "output" / "photos" / "photos" / "infer" / "scores.csv").read_text().splitlines()
    assert len(rows) == 3 and all(("OK" in r or "DEFECT" in r) for r in rows[1:])  # the class named photos


def test_infer_and_serve_name_a_class_that_does_not_exist_and_list_those_that_do(tmp_path, monkeypatch, capsys):
    import infer
    import serve

    (tmp_path / "output" / "inference" / "bottle").mkdir(parents=True)
    (tmp_path / "output" / "inference" / "bottle" / "deploy.json").write_text("{}")
    (tmp_path / "output" / "carpet").mkdir()
    (tmp_path / "output" / "carpet" / "model.pdparams").write_bytes(b"")
    image = os.path.join(SAMPLE, "bottle", "test", "good", "000.png")
    monkeypatch.chdir(tmp_path)
    for command in (lambda cls: infer.main(["--cls", cls, "--image", image]), lambda cls: serve.main(["--cls", cls])):
        error = one_error_line(command("nosuch"), *capsys.readouterr())
        assert "--cls nosuch: no such class" in error and "exported: bottle" in error and "trained: carpet" in error
        error = one_error_line(command("carpet"), *capsys.readouterr())
        assert "trained but not exported" in error
        assert "python export_model.py --output_dir output --cls carpet" in error
    assert not (tmp_path / "output" / "inference" / "nosuch").exists()


def test_export_announces_each_stage_before_it_runs(tmp_path):
    """The silent minute of a first --onnx export, now one line per slow stage on stderr (the
    static graph, seconds, says nothing: a plain export stays one line), and the converters'
    own logging still kept out."""
    out = str(tmp_path / "run")
    trained = subprocess.run([sys.executable, "main.py", *TINY, "--epochs", "1", "--output_dir", out], cwd=ROOT,
                             env=child_environment(), capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    proc = subprocess.run([sys.executable, "export_model.py", "--output_dir", out, "--onnx"], cwd=ROOT,
                          env=child_environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert said_lines(proc.stderr) == [
        "converting to ONNX (paddle2onnx; the first conversion of a process takes longest) ..."]
    assert proc.stdout.startswith("exported rd4ad resnet18") and "model.onnx" in proc.stdout
