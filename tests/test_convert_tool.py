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


def _rdpp_reference(arch="resnet18"):
    from reference_weights import deterministic_projector
    w = deterministic_state_dicts(arch)
    return w, {"proj": deterministic_projector(arch), "bn": w["bn"], "decoder": w["decoder"]}


@pytest.mark.parametrize("bad, message", [
    ({"extra": {}}, "unknown 'extra'"),              # a part the tool does not convert
    ({"decoder": None}, "'decoder' missing"),
])
def test_unknown_or_missing_parts_are_refused_and_nothing_is_written(tmp_path, bad, message):
    """Today's RD++ checkpoints hold 'proj': a part left out would write a model that
    scores differently, so a file with a part the tool does not know is refused."""
    _, ref = _rdpp_reference()
    ref = {**ref, **bad}
    ref = {k: v for k, v in ref.items() if v is not None}
    out = tmp_path / "m.pdparams"
    with pytest.raises(tool.ConvertError, match=message):
        tool.convert("resnet18", None, ref, 64, "x", str(out), None)
    assert not out.exists()


def test_a_weight_the_model_lacks_is_refused(tmp_path):
    w, ref = _rdpp_reference()
    ref["proj"] = {**ref["proj"], "proj_d.proj.0.weight": np.zeros((2, 2, 3, 3), np.float32)}
    with pytest.raises(tool.ConvertError, match="projector.proj_d.proj.0.conv.weight: not a weight"):
        tool.convert("resnet18", None, ref, 64, "x", str(tmp_path / "m.pdparams"), None)
    with pytest.raises(tool.ConvertError, match="student.layer9.weight: not a weight"):
        tool.convert("resnet18", None, {"bn": w["bn"], "decoder": {**w["decoder"], "layer9.weight": np.zeros(2)}},
                     64, "x", str(tmp_path / "m.pdparams"), None)


def test_rdpp_checkpoint_converts_into_rdpp_scoring_as_the_reference(tmp_path):
    """An RD++ checkpoint becomes an RD++ one (projector included) whose maps and scores,
    loaded back as every command loads a class, are the reference's evaluation_multi_proj
    ones (tests/fixtures/parity_rdpp_resnet18.npz). Needs the model registry (model/registry.py,
    with its "rdpp" line): checkpoints name their model."""
    pytest.importorskip("model.registry")
    from engine.checkpoint import load_trained
    from reference_weights import deterministic_images
    w, ref = _rdpp_reference()
    out = str(tmp_path / "bottle" / "model.pdparams")
    written = tool.convert("resnet18", w["encoder"], ref, 64, "bottle", out, None)
    state = load_checkpoint(out)
    assert state["model"] == "rdpp" and "projector" in state["parts"]
    net, _ = load_trained(out, teacher_weights=written[1], conv_backend="paddle")
    with paddle.no_grad():
        maps, scores = net(paddle.to_tensor(deterministic_images(2, 64)))
    fixture = np.load(os.path.join(ROOT, "tests", "fixtures", "parity_rdpp_resnet18.npz"))
    np.testing.assert_allclose(maps.numpy(), fixture["eval_anomaly_map"], rtol=0, atol=1e-4 * fixture["eval_anomaly_map"].max())
    np.testing.assert_allclose(scores.numpy(), fixture["eval_scores"], rtol=1e-4)
