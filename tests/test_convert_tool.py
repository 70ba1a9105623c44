"""tools/convert_torch_checkpoint.py: reference weights -> a checkpoint main.py evaluates."""
import os
import sys

import numpy as np
import paddle
import pytest

from conftest import ROOT
from model import build_rd4ad, convert_reference_state_dicts
from reference_weights import deterministic_state_dicts
from engine.checkpoint import apply_checkpoint, load_checkpoint

sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_torch_checkpoint as tool  # noqa: E402


def _check_outputs(weights, ckpt_path, teacher_path):
    state = load_checkpoint(ckpt_path, arch="resnet18", image_size=64)
    net = build_rd4ad("resnet18", teacher_weights=teacher_path)
    apply_checkpoint(net, state, ckpt_path)
    expected = build_rd4ad("resnet18", teacher_weights="none")
    expected.set_state_dict(convert_reference_state_dicts(
        "resnet18", weights["encoder"], weights["bn"], weights["decoder"]))
    for (name, a), b in zip(net.state_dict().items(), expected.state_dict().values()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_convert_numpy_dicts_to_checkpoint_and_teacher(tmp_path):
    w = deterministic_state_dicts("resnet18")
    out = str(tmp_path / "bottle" / "model.pdparams")
    written = tool.convert("resnet18", w["encoder"], {"bn": w["bn"], "decoder": w["decoder"]},
                           64, "bottle", out, None)
    teacher = str(tmp_path / "bottle" / "resnet18_teacher.pdparams")
    assert written == [out, teacher]
    _check_outputs(w, out, teacher)


def test_wrong_arch_weights_are_refused(tmp_path):
    w = deterministic_state_dicts("wide_resnet50_2")
    with pytest.raises(tool.ConvertError, match="are these resnet18 weights"):
        tool.convert("resnet18", None, {"bn": w["bn"], "decoder": w["decoder"]}, 64, "x",
                     str(tmp_path / "m.pdparams"), None)


def test_cli_reads_real_pth_files(tmp_path):
    torch = pytest.importorskip("torch")  # optional dependency: only this tool uses it
    w = deterministic_state_dicts("resnet18")
    t = lambda d: {k: torch.from_numpy(np.asarray(v)) for k, v in d.items()}  # noqa: E731
    torch.save(t(w["encoder"]), tmp_path / "backbone.pth")
    torch.save({"bn": t(w["bn"]), "decoder": t(w["decoder"])}, tmp_path / "ref.pth")
    out = str(tmp_path / "model.pdparams")
    teacher = str(tmp_path / "teacher.pdparams")
    assert tool.main(["--arch", "resnet18", "--backbone", str(tmp_path / "backbone.pth"),
                      "--reference", str(tmp_path / "ref.pth"), "--image_size", "64",
                      "--out", out, "--teacher_out", teacher]) == 0
    _check_outputs(w, out, teacher)
    assert isinstance(paddle.load(teacher), dict)


def test_cli_mistakes_are_one_line(tmp_path, capsys):
    """Without torch, or with a class name that is a path: one line, exit 2."""
    code = tool.main(["--arch", "resnet18", "--reference", str(tmp_path / "ref.pth"), "--cls", "../x",
                      "--out", str(tmp_path / "m.pdparams")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --cls '../x'")
