"""Checkpoints: round trip, refusal of foreign or damaged files, atomic writes."""
import os

import numpy as np
import paddle
import pytest

from model import build_rd4ad
from engine.checkpoint import CheckpointError, apply_checkpoint, load_checkpoint, save_checkpoint
from utils.io import atomic_write_text


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    paddle.seed(3)
    net = build_rd4ad("resnet18", teacher_weights="none")
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pdparams")
    save_checkpoint(path, net, arch="resnet18", image_size=64, epoch=7, cls="bottle",
                    teacher_weights="none")
    return net, path


def test_round_trip_restores_every_weight(saved):
    net, path = saved
    state = load_checkpoint(path, arch="resnet18", image_size=64)
    assert (state["epoch"], state["class"], state["image_size"]) == (7, "bottle", 64)
    paddle.seed(99)
    other = build_rd4ad("resnet18", teacher_weights="none")
    apply_checkpoint(other, state, path)
    for (name, a), b in zip(net.state_dict().items(), other.state_dict().values()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_other_arch_or_size_is_refused(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="--arch resnet18, not wide_resnet50_2"):
        load_checkpoint(path, arch="wide_resnet50_2", image_size=64)
    with pytest.raises(CheckpointError, match="--image_size 64, not 256"):
        load_checkpoint(path, arch="resnet18", image_size=256)


def test_truncated_or_foreign_files_are_refused(saved, tmp_path):
    _, path = saved
    truncated = tmp_path / "truncated.pdparams"
    truncated.write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pdparams: unreadable or truncated"):
        load_checkpoint(str(truncated))
    foreign = tmp_path / "weights.pdparams"
    paddle.save({"conv1.weight": paddle.zeros([2, 2])}, str(foreign))
    with pytest.raises(CheckpointError, match="weights.pdparams: not an RD4AD-Paddle checkpoint"):
        load_checkpoint(str(foreign))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "absent.pdparams"))


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "results.md"
    atomic_write_text(str(target), "first version")

    class Boom(Exception):
        pass

    from utils.io import atomic_write

    def half_write(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise Boom()
    with pytest.raises(Boom):
        atomic_write(str(target), half_write)
    assert target.read_text() == "first version"
    assert os.listdir(tmp_path) == ["results.md"]  # no temporary file left behind
