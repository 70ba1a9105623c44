"""Property: random, truncated and bit-flipped bytes given as a checkpoint, teacher weights,
training state, config file, deploy.json or model.json never give a traceback, never an
internal error, and never exit 0 with a verdict. Each runs the command-line entry in
process (main.main / infer.main) on hypothesis' derandomised examples."""
import csv
import os
import re
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import export_model
import infer
import main
from conftest import ROOT

SAMPLE = os.path.join(ROOT, "sample_data", "bottle")
TINY = ["--arch", "resnet18", "--image_size", "64", "--batch_size", "1", "--epochs", "1",
        "--eval_interval", "0", "--log_interval", "0", "--no_report"]
FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def damaged(original: bytes):
    """Random bytes, a truncated copy, or a copy with a few bytes overwritten."""
    return st.one_of(
        st.binary(max_size=600),
        st.integers(0, max(0, len(original) - 1)).map(lambda n: original[:n]),
        st.lists(st.tuples(st.integers(0, max(0, len(original) - 1)), st.integers(0, 255)), min_size=1,
                 max_size=6).map(lambda edits: _overwrite(original, edits)),
    )


def _overwrite(original: bytes, edits) -> bytes:
    data = bytearray(original)
    for pos, value in edits:
        data[pos] = value
    return bytes(data)


def assert_clean_failure(code, err, allowed=(1, 2)):
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert code in allowed, err[-2000:]
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    assert lines and lines[-1].startswith("error: "), err[-2000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(SAMPLE, root / "data" / "widget")
    out = root / "out"
    assert main.main([*TINY, "--teacher_weights", "none", "--save_interval", "1", "--data_dir",
                      str(root / "data"), "--output_dir", str(out)]) == 0
    save_dir = root / "export"
    assert export_model.main(["--checkpoint", str(out / "widget" / "model.pdparams"), "--save_dir",
                              str(save_dir)]) == 0
    return root


@FUZZ
@given(data=st.data())
def test_fuzzed_checkpoint_in_eval_and_infer(trained, capsys, data):
    ckpt = trained / "out" / "widget" / "model.pdparams"
    original = ckpt.read_bytes()
    content = data.draw(damaged(original))
    mode = data.draw(st.sampled_from(["eval", "infer"]))
    work = trained / "work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "widget").mkdir(parents=True)
    (work / "widget" / "model.pdparams").write_bytes(content)
    try:
        code = main.main([*TINY, "--teacher_weights", "none", "--data_dir", str(trained / "data"),
                          "--output_dir", str(work), "--mode", mode])
        err = capsys.readouterr().err
        if still_a_checkpoint(work / "widget" / "model.pdparams"):
            return  # e.g. the pickle's protocol byte changed: the same checkpoint
        assert_clean_failure(code, err, allowed=(2,))
        assert not (work / "widget" / "infer").exists()  # no verdict written
    finally:
        shutil.rmtree(work, ignore_errors=True)


def still_a_checkpoint(path) -> bool:
    from engine.checkpoint import CheckpointError, load_checkpoint

    try:
        load_checkpoint(str(path), arch="resnet18", image_size=64)
    except CheckpointError:
        return False
    return True


@FUZZ
@given(data=st.data())
def test_fuzzed_teacher_weights_and_training_state(trained, capsys, data):
    import paddle
    from model.teacher import Teacher

    teacher_file = trained / "teacher.pdparams"
    if not teacher_file.exists():
        paddle.save(Teacher("resnet18").state_dict(), str(teacher_file))
    which = data.draw(st.sampled_from(["teacher", "state"]))
    out = trained / "work"
    shutil.rmtree(out, ignore_errors=True)
    try:
        if which == "teacher":
            content = data.draw(damaged(teacher_file.read_bytes()))
            bad = trained / "bad_teacher.pdparams"
            bad.write_bytes(content)
            args = ["--teacher_weights", str(bad)]
        else:
            source = trained / "state_source.pdparams"
            if not source.exists():
                _make_training_state(trained, source)
            content = data.draw(damaged(source.read_bytes()))
            (out / "widget").mkdir(parents=True)
            (out / "widget" / "train_state.pdparams").write_bytes(content)
            args = ["--teacher_weights", "none", "--resume"]
            if content == source.read_bytes():
                return
        code = main.main([*TINY, *args, "--data_dir", str(trained / "data"), "--output_dir", str(out)])
        err = capsys.readouterr().err
        if which == "teacher":
            # a fuzzed copy can still be valid weights (a flipped bit inside a float): then it trains
            if code == 0:
                return
            assert_clean_failure(code, err, allowed=(2,))
            assert not out.exists()
        else:
            if code == 0:  # e.g. bytes flipped inside an RNG string that still parses: resumed
                return
            assert_clean_failure(code, err, allowed=(1, 2))
            assert not (out / "config.yaml").exists() or code == 1
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _make_training_state(trained, target):
    """A real training state, written the way training writes it (a finished class's own
    state is removed, so one is made here)."""
    import numpy as np

    from model import build_rd4ad
    from engine.config import parse_config
    from engine.optim import build_optimizer
    from engine.train_state import save_train_state

    run = trained / "state_run"
    cfg = parse_config([*TINY, "--teacher_weights", "none", "--output_dir", str(run)])
    net = build_rd4ad("resnet18", "none")
    params = net.trainable_parameters()
    save_train_state(cfg, "widget", epoch=1, net=net,
                     optimizers={"distillation": build_optimizer(params, 0.005, 0.5, 0.999)},
                     sampler_rng=np.random.default_rng(0), loss_history=[[0.5]])
    shutil.copy(run / "widget" / "train_state.pdparams", target)


@FUZZ
@given(content=st.one_of(st.binary(max_size=400),
                         st.integers(0, 200).map(lambda n: b"arch: resnet18\nimage_size: 64\nepochs: 1\n"
                                                 b"cls: widget\nlr: 0.005\nval_ratio: 0.1\n"[:n]),
                         st.text(max_size=200).map(lambda t: t.encode("utf-8"))))
def test_fuzzed_config_file(trained, tmp_path_factory, capsys, content):
    config = trained / "fuzz.yaml"
    config.write_bytes(content)
    out = trained / "no_checkpoints_here"
    code = main.main(["--config", str(config), *TINY, "--teacher_weights", "none", "--data_dir",
                      str(trained / "data"), "--output_dir", str(out), "--mode", "eval"])
    err = capsys.readouterr().err
    # with no checkpoint in the output folder, the only success would be a wrong one
    assert_clean_failure(code, err, allowed=(2,))
    assert not out.exists()


@FUZZ
@given(data=st.data())
def test_fuzzed_deploy_json_and_model_json(trained, capsys, data):
    which = data.draw(st.sampled_from(["deploy.json", "model.json"]))
    source = trained / "export"
    original = (source / which).read_bytes()
    content = data.draw(damaged(original[:4000] if which == "model.json" else original))
    model_dir = trained / "fuzz_model"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(source, model_dir)
    (model_dir / which).write_bytes(content)
    out = trained / "fuzz_out"
    shutil.rmtree(out, ignore_errors=True)
    try:
        code = infer.main(["--model_dir", str(model_dir), "--image", os.path.join(SAMPLE, "test", "crack"),
                           "--output_dir", str(out)])
        err = capsys.readouterr().err
        if content == original:
            return
        if code == 0:  # only a deploy.json whose edit changed nothing that matters may pass
            assert which == "deploy.json", err[-2000:]
            rows = list(csv.DictReader(open(out / "scores.csv")))
            assert all(r["verdict"] in ("OK", "DEFECT") and r["error"] == "" for r in rows)
            return
        assert_clean_failure(code, err, allowed=(1, 2))
        if (out / "scores.csv").exists():
            rows = list(csv.DictReader(open(out / "scores.csv")))
            assert not any(r["verdict"] for r in rows)  # a failure never comes with verdicts
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
