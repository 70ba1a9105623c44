"""Loading a file never runs code: every weights file goes through utils/safe_pickle.py.

Crafted files whose unpickling would create a marker file are given to every loader and
entry point (eval, infer, export by folder and by --checkpoint, --resume,
--teacher_weights, the benchmark): each is refused with one line and the marker file is
never created. Plain files, Paddle's own and this project's older ones, still load.
"""
import builtins
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest

import export_model
import main
from conftest import ROOT
from engine.checkpoint import load_checkpoint
from utils.safe_pickle import UnsafeWeightsError, WeightsFileError, load_plain_pickle

SAMPLE = os.path.join(ROOT, "sample_data", "bottle")
TINY = ["--arch", "resnet18", "--image_size", "64", "--batch_size", "1", "--epochs", "2",
        "--eval_interval", "0", "--log_interval", "0", "--no_report", "--save_interval", "1"]
REFUSED = "not a plain weights file (refusing to unpickle code)"


class RunsShell:
    """Unpickling this calls os.system: what a malicious .pdparams does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpensFile:
    """Unpickling this calls builtins.open(marker, 'w'): creates the marker without a shell."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


class CallsSubprocess:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return subprocess.call, (["touch", self.marker],)


PAYLOADS = [RunsShell, OpensFile, CallsSubprocess]


def write_pickle(path, obj, protocol=4):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def one_error_line(capsys, code, expected_code=2):
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert code == expected_code, err[-2000:]
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, err
    assert "Traceback" not in err
    return lines[-1]


# ------------------------------------------------------------------ the reader itself

@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("where", ["top", "nested", "in_list", "as_key_value"])
def test_reader_refuses_code_anywhere_in_the_file(tmp_path, payload, where):
    marker = tmp_path / "marker"
    evil = payload(marker)
    obj = {"top": evil,
           "nested": {"student": {"conv.weight": np.zeros(3, np.float32), "x": evil}},
           "in_list": [1, 2, [evil]],
           "as_key_value": {"a": (evil, np.zeros(1))}}[where]
    path = tmp_path / "evil.pdparams"
    write_pickle(path, obj if where != "top" else {"top": obj})
    with pytest.raises(UnsafeWeightsError) as info:
        load_plain_pickle(str(path))
    assert str(info.value) == f"{path}: {REFUSED}"
    assert not marker.exists()


def test_reader_refuses_object_arrays_and_classes(tmp_path):
    path = tmp_path / "objects.pdparams"
    write_pickle(path, {"w": np.array([{"a": 1}], dtype=object)}, protocol=2)
    with pytest.raises(UnsafeWeightsError):
        load_plain_pickle(str(path))
    write_pickle(path, {"cls": np.random.Generator})  # a class is not data either
    with pytest.raises(UnsafeWeightsError):
        load_plain_pickle(str(path))


def test_reader_matches_paddle_load_on_paddles_own_files(tmp_path):
    """What paddle.save writes (tensors as (name, array) pairs, optimizer state, numbers,
    strings) reads back as paddle.load(return_numpy=True) gives it."""
    layer = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4))
    opt = paddle.optimizer.Adam(parameters=layer.parameters())
    layer(paddle.rand([1, 3, 8, 8])).mean().backward()
    opt.step()
    state = {"format": "x", "n": 3, "f": 0.5, "flag": True, "none": None, "list": [1, "a"],
             "layer": layer.state_dict(), "opt": opt.state_dict()}
    path = str(tmp_path / "plain.pdparams")
    paddle.save(state, path)
    ours = load_plain_pickle(path)
    theirs = paddle.load(path, return_numpy=True)
    assert set(ours) == set(theirs)
    for part in ("layer", "opt"):
        assert set(ours[part]) == set(theirs[part])
        for key, value in theirs[part].items():
            assert isinstance(ours[part][key], np.ndarray)
            np.testing.assert_array_equal(ours[part][key], value)
    assert [ours[k] for k in ("format", "n", "f", "flag", "none", "list")] == ["x", 3, 0.5, True, None, [1, "a"]]


def test_reader_undoes_paddles_bookkeeping_and_reads_protocol_2(tmp_path):
    """Old Paddle files (like the official ImageNet weights) carry a name table and may be
    protocol 2, where bytes are stored through _codecs.encode; big arrays may be sliced."""
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    obj = {"conv1.weight": weight, "StructuredToParameterName@@": {"conv1.weight": "conv2d_0.w_0"},
           "big": np.zeros(0), "big@@.0": weight[:2].ravel(), "big@@.1": weight[2:].ravel(),
           "UnpackBigParamInfor@@": {"big": {"OriginShape": (3, 4), "slices": ["big@@.0", "big@@.1"]}},
           "raw": b"\x00\xffbytes"}
    path = tmp_path / "old.pdparams"
    write_pickle(path, obj, protocol=2)
    got = load_plain_pickle(str(path))
    assert set(got) == {"conv1.weight", "big", "raw"}
    np.testing.assert_array_equal(got["conv1.weight"], weight)
    np.testing.assert_array_equal(got["big"], weight)
    assert got["raw"] == b"\x00\xffbytes"


def test_reader_refuses_other_codecs(tmp_path):
    """_codecs.encode is allowed for latin1 only (what protocol 2 needs)."""
    import codecs

    class Encodes:
        def __reduce__(self):
            return codecs.encode, ("text", "rot13")

    path = tmp_path / "codec.pdparams"
    write_pickle(path, {"x": Encodes()}, protocol=2)
    with pytest.raises(UnsafeWeightsError, match="refusing to unpickle code"):
        load_plain_pickle(str(path))


@pytest.mark.parametrize("content, message", [
    (b"", "empty weights file"),
    (b"PK\x03\x04 not a pickle", "not a Paddle weights file (not a pickle)"),
    (b"\x80\x04\x95\x10\x00", "unreadable or truncated weights file"),
])
def test_reader_names_empty_foreign_and_truncated_files(tmp_path, content, message):
    path = tmp_path / "bad.pdparams"
    path.write_bytes(content)
    with pytest.raises(WeightsFileError) as info:
        load_plain_pickle(str(path))
    assert str(info.value).startswith(f"{path}: {message}")


# ------------------------------------------------------------------ every entry point

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained widget class with its training state kept (killed before the end)."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    shutil.copytree(SAMPLE, data / "widget")
    out = root / "out"
    assert main.main([*TINY, "--teacher_weights", "none", "--data_dir", str(data), "--output_dir", str(out)]) == 0
    return data, out


def poisoned_checkpoint(path, marker, payload=RunsShell):
    """A real checkpoint of this project with one student weight replaced by code."""
    state = load_plain_pickle(str(path))
    key = sorted(state["student"])[0]
    state["student"][key] = payload(marker)
    write_pickle(path, state)


@pytest.mark.parametrize("mode", ["eval", "infer"])
def test_eval_and_infer_refuse_a_poisoned_checkpoint(trained, tmp_path, capsys, mode):
    data, out = trained
    work = tmp_path / "out"
    shutil.copytree(out, work)
    marker = tmp_path / "marker"
    ckpt = work / "widget" / "model.pdparams"
    poisoned_checkpoint(ckpt, marker)
    code = main.main([*TINY, "--teacher_weights", "none", "--data_dir", str(data), "--output_dir", str(work),
                      "--mode", mode])
    assert one_error_line(capsys, code) == f"error: {ckpt}: {REFUSED}"
    assert not marker.exists()
    assert not (work / "widget" / "infer").exists() and not (work / "config_eval.yaml").exists()


@pytest.mark.parametrize("by", ["folder", "checkpoint"])
def test_export_refuses_a_poisoned_checkpoint(trained, tmp_path, capsys, by):
    _, out = trained
    work = tmp_path / "out"
    shutil.copytree(out, work)
    marker = tmp_path / "marker"
    ckpt = work / "widget" / "model.pdparams"
    poisoned_checkpoint(ckpt, marker, OpensFile)
    args = (["--output_dir", str(work), "--cls", "widget"] if by == "folder"
            else ["--checkpoint", str(ckpt), "--save_dir", str(tmp_path / "export")])
    code = export_model.main(args)
    assert one_error_line(capsys, code) == f"error: {ckpt}: {REFUSED}"
    assert not marker.exists()
    assert not (work / "inference").exists() and not (tmp_path / "export").exists()


def test_resume_refuses_a_poisoned_training_state(trained, tmp_path, capsys):
    data, out = trained
    work = tmp_path / "out"
    shutil.copytree(out, work)
    # a run killed after epoch 1 leaves train_state.pdparams: make one, then poison it
    state_file = work / "widget" / "train_state.pdparams"
    code = main.main([*TINY, "--teacher_weights", "none", "--data_dir", str(data), "--output_dir", str(work),
                      "--epochs", "1", "--force"])
    assert code == 0
    os.remove(work / "widget" / "status.json")  # unfinished, so --resume reads the state
    write_pickle(state_file, {"format": "rd4ad-paddle-train-state/1", "optimizer": CallsSubprocess(tmp_path / "m")})
    capsys.readouterr()
    code = main.main([*TINY, "--teacher_weights", "none", "--data_dir", str(data), "--output_dir", str(work),
                      "--resume"])
    assert one_error_line(capsys, code).startswith(f"error: {state_file}: {REFUSED}")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_teacher_weights_file_is_refused_before_anything_is_written(tmp_path, capsys, payload):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data / "widget")
    marker = tmp_path / "marker"
    weights = tmp_path / "resnet18.pdparams"
    write_pickle(weights, {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "bn1.weight": payload(marker)})
    out = tmp_path / "out"
    code = main.main([*TINY, "--teacher_weights", str(weights), "--data_dir", str(data), "--output_dir", str(out)])
    assert one_error_line(capsys, code) == f"error: {weights}: {REFUSED}"
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("named_by", ["checkpoint", "flag"])
def test_export_refuses_a_poisoned_teacher_file(trained, tmp_path, capsys, named_by):
    """A checkpoint trained with a teacher file names it (or --teacher_weights does):
    export reads that file through the same reader."""
    _, out = trained
    marker = tmp_path / "marker"
    weights = tmp_path / "teacher.pdparams"
    write_pickle(weights, {"conv1.weight": RunsShell(marker)})
    state = load_plain_pickle(str(out / "widget" / "model.pdparams"))
    del state["teacher"]
    state["teacher_weights"] = str(weights) if named_by == "checkpoint" else "imagenet"
    ckpt = tmp_path / "model.pdparams"
    paddle.save(state, str(ckpt))
    flag = ["--teacher_weights", str(weights)] if named_by == "flag" else []
    code = export_model.main(["--checkpoint", str(ckpt), *flag, "--save_dir", str(tmp_path / "export")])
    assert one_error_line(capsys, code) == f"error: {weights}: {REFUSED}"
    assert not marker.exists() and not (tmp_path / "export").exists()


def test_benchmark_refuses_a_poisoned_checkpoint(trained, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_tool", os.path.join(ROOT, "tools", "benchmark.py"))
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    _, out = trained
    ckpt = tmp_path / "model.pdparams"
    shutil.copy(out / "widget" / "model.pdparams", ckpt)
    marker = tmp_path / "marker"
    poisoned_checkpoint(ckpt, marker)
    code = benchmark.main(["--quick", "--checkpoint", str(ckpt), "--stages", "aupro"])
    assert one_error_line(capsys, code) == f"error: {ckpt}: {REFUSED}"
    assert not marker.exists()


# ------------------------------------------------------------------ plain files still load

def test_checkpoints_written_by_paddle_save_keep_loading(trained, tmp_path):
    """This project's checkpoints have always been paddle.save pickles of plain data: a
    file written the old way (paddle.save of Tensors) loads and evaluates as before."""
    data, out = trained
    state = load_plain_pickle(str(out / "widget" / "model.pdparams"))
    as_tensors = {k: ({n: paddle.to_tensor(v) for n, v in v.items()} if isinstance(v, dict) and k in
                      ("bottleneck", "student", "teacher") else v) for k, v in state.items()}
    old = tmp_path / "old.pdparams"
    paddle.save(as_tensors, str(old))
    again = load_checkpoint(str(old))
    for part in ("bottleneck", "student", "teacher"):
        for name, value in state[part].items():
            np.testing.assert_array_equal(again[part][name], value)


def test_damaged_checkpoint_parts_are_one_line(trained, tmp_path, capsys):
    data, out = trained
    work = tmp_path / "out"
    shutil.copytree(out, work)
    ckpt = work / "widget" / "model.pdparams"
    good = load_plain_pickle(str(ckpt))
    cases = {
        "image_size": ({**good, "image_size": "64"}, "'image_size' must be a multiple of 32"),
        "student": ({**good, "student": [1, 2]}, "'student' must be a dict of weight arrays"),
        "weight": ({**good, "student": {**good["student"], sorted(good["student"])[0]: "x"}}, "is not a float array"),
        "nan": ({**good, "student": {k: v * np.nan for k, v in good["student"].items()}}, "is not finite"),
        "calibration": ({**good, "calibration": {**good["calibration"], "image_threshold": float("nan")}},
                        "calibration image_threshold is nan"),
        "missing": ({k: v for k, v in good.items() if k != "arch"}, "'arch' must be one of"),
    }
    for name, (state, message) in cases.items():
        write_pickle(ckpt, state)
        code = main.main([*TINY, "--teacher_weights", "none", "--data_dir", str(data), "--output_dir", str(work),
                          "--mode", "eval"])
        line = one_error_line(capsys, code)
        assert line.startswith(f"error: {ckpt}: ") and message in line, (name, line)


# ------------------------------------------------------------------ files that cost more than their size

def _laughs(levels=25, fan=10):
    """A list nested `levels` deep, each level holding the one below `fan` times: a few
    hundred bytes as a pickle (shared references), fan**levels items if walked as a tree."""
    node = ["lol"]
    for _ in range(levels):
        node = [node] * fan
    return node


def test_billion_laughs_pickle_is_refused_in_time_proportional_to_its_size(tmp_path):
    """A value shared through the memo is walked once per path, each visit counted against
    the work the file's size allows: 10**25 paths are refused after a few thousand visits
    (so nothing the reader returns can cost more to walk, print or compare than its size)."""
    path = tmp_path / "laughs.pdparams"
    write_pickle(path, {"conv1.weight": _laughs()})
    assert path.stat().st_size < 1000
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from utils.safe_pickle import load_plain_pickle;"
            "load_plain_pickle(sys.argv[2])")
    done = subprocess.run([sys.executable, "-c", code, ROOT, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.strip().endswith(REFUSED), done.stderr[-2000:]


@pytest.mark.parametrize("case", ["tuple_key", "frozenset", "set", "ndarray_called", "void_array"])
def test_structures_whose_building_is_costly_are_refused(tmp_path, case):
    path = tmp_path / f"{case}.pdparams"
    if case == "tuple_key":  # hashing a shared nested tuple walks it as a tree
        node = ("x",)
        for _ in range(16):  # 2**16 paths: enough to show the refusal, cheap to build here
            node = (node, node)
        obj = {node: 1}
    elif case == "frozenset":
        obj = {"w": frozenset({1, 2})}
    elif case == "set":
        obj = {"w": {1, 2}}
    elif case == "ndarray_called":  # numpy.ndarray(shape, dtype, buffer, offset, strides): 4 bytes, 8 GB
        class Strided:
            def __reduce__(self):
                return np.ndarray, ((2_000_000_000,), np.dtype("float32"), b"\0" * 4, 0, (0,))
        obj = {"w": Strided()}
    else:
        obj = {"w": np.zeros(3, dtype=[("a", "f4"), ("b", "i4")])}
    write_pickle(path, obj)
    with pytest.raises(UnsafeWeightsError):
        load_plain_pickle(str(path))


def test_a_length_field_claiming_terabytes_is_a_truncated_file(tmp_path):
    import struct

    path = tmp_path / "claims.pdparams"
    path.write_bytes(b"\x80\x04" + b"\x8e" + struct.pack("<Q", 1 << 40) + b"tiny")  # BINBYTES8
    with pytest.raises(WeightsFileError, match="unreadable or truncated"):
        load_plain_pickle(str(path))
