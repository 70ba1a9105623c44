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


# ------------------------------------------------------------- files written before model/registry.py

def old_checkpoint(path, net, arch, image_size, teacher_weights="none"):
    """A checkpoint exactly as main's save_checkpoint wrote it before model/registry.py
    (commit e8b5a60): no model name, RD4AD's parts at the top level."""
    state = {"format": "rd4ad-paddle/1", "arch": arch, "image_size": int(image_size), "epoch": 3,
             "class": "bottle", "bottleneck": net.bottleneck.state_dict(), "student": net.student.state_dict(),
             "teacher_weights": teacher_weights}
    if teacher_weights == "none":
        state["teacher"] = net.teacher.state_dict()
    paddle.save(state, path)


def test_a_checkpoint_without_a_model_name_loads_as_rd4ad(tmp_path):
    from engine.checkpoint import load_trained
    from model.rd4ad import RD4AD

    paddle.seed(11)
    net = build_rd4ad("resnet18", teacher_weights="none", image_size=64)
    path = str(tmp_path / "model.pdparams")
    old_checkpoint(path, net, "resnet18", 64)
    state = load_checkpoint(path)
    assert (state["model"], state["parts"]) == ("rd4ad", ["bottleneck", "student"])
    assert state["model_args"] == {"arch": "resnet18", "image_size": 64}
    loaded, _ = load_trained(path, conv_backend="paddle")
    assert type(loaded) is RD4AD and loaded.image_size == 64
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_a_training_state_without_a_model_name_resumes(tmp_path):
    """A state as main wrote it (one "optimizer", "param_names" a list, a fingerprint
    without the model) resumes: weights and Adam moments land on the right parameters."""
    import json
    import random

    from engine.config import Config
    from engine.optim import build_optimizer
    from engine.train_state import load_train_state, restore_train_state
    from model.loss import cosine_distillation_loss

    cfg = Config(arch="resnet18", image_size=64, output_dir=str(tmp_path), teacher_weights="none")
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32))

    def setup():
        paddle.seed(1)
        net = build_rd4ad("resnet18", "none", conv_backend="paddle")
        return net, build_optimizer(net.trainable_parameters(), 0.005)

    def step(net, optimizer):
        net.train()
        feats = net.teacher_features(x)
        loss = cosine_distillation_loss(feats, net.student_features(feats))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        return float(loss)

    net, opt = setup()
    step(net, opt)
    fingerprint = {"arch": "resnet18", "image_size": 64, "epochs": 200, "batch_size": 16, "lr": 0.005,
                   "beta1": 0.5, "beta2": 0.999, "seed": 111, "teacher_weights": "none", "val_ratio": 0.1,
                   "feature_cache": True, "feature_cache_dtype": "float16", "amp": False}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    os.makedirs(tmp_path / "c")
    paddle.save({  # main's save_train_state (commit e8b5a60), field by field
        "format": "rd4ad-paddle-train-state/1", "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "epoch": 1, "bottleneck": net.bottleneck.state_dict(), "student": net.student.state_dict(),
        "optimizer": opt.state_dict(), "param_names": [p.name for p in net.trainable_parameters()],
        "sampler_rng": json.dumps(np.random.default_rng(3).bit_generator.state),
        "python_rng": json.dumps(random.getstate()),
        "numpy_rng": json.dumps([name, keys.tolist(), int(pos), int(has_gauss), float(cached)]),
        "loss_history": json.dumps([[1.0]]), "extra": json.dumps({})}, str(tmp_path / "c" / "train_state.pdparams"))
    expected = step(net, opt)

    net2, opt2 = setup()
    epoch, history, _ = restore_train_state(load_train_state(cfg, "c"), net2, {"distillation": opt2}, cfg.lr,
                                            np.random.default_rng(0))
    assert (epoch, history) == (1, [[1.0]])
    assert step(net2, opt2) == expected
    for a, b in zip(net.trainable_parameters(), net2.trainable_parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_class_finished_before_the_registry_still_counts_as_finished(tmp_path):
    """status.json's fingerprint without a model is RD4AD's: the class is skipped, not
    refused as 'finished with other settings'."""
    import json

    from engine.config import Config
    from engine.train_state import finished_metrics, fingerprint

    cfg = Config(arch="resnet18", image_size=64, output_dir=str(tmp_path), teacher_weights="none")
    old = fingerprint(cfg, "c")
    assert "model" not in old  # RD4AD's fingerprint is the one main wrote
    os.makedirs(tmp_path / "c")
    (tmp_path / "c" / "model.pdparams").write_bytes(b"x")
    (tmp_path / "c" / "status.json").write_text(json.dumps({"finished": True, "fingerprint": old,
                                                            "metrics": {"pixel_auroc": 0.5}}))
    assert finished_metrics(cfg, "c") == {"pixel_auroc": 0.5}
    with pytest.raises(Exception, match=r"epochs=200 \(now 7\)"):
        finished_metrics(Config(**{**cfg.to_dict(), "epochs": 7, "explicit": frozenset()}), "c")


@pytest.mark.parametrize("change, message", [
    ({"model": "nope"}, "trained with --model 'nope', which this version does not know (known: rd4ad, rdpp)"),
    ({"model": ["rd4ad"]}, "which this version does not know"),
    ({"parts": ["format"]}, "damaged checkpoint: 'parts' must list the trained parts"),
    ({"parts": ["bottleneck"]}, "holds parts bottleneck, the rd4ad model trains bottleneck, student"),
    ({"model_args": "resnet18"}, "damaged checkpoint: 'model_args' must be a dict naming its arch and image_size"),
    ({"model_args": {"arch": "resnet34", "image_size": 64}}, "'model_args' must be a dict naming its arch"),
    ({"model_args": {"arch": "resnet18", "image_size": 64, "evil": 1}},
     "damaged checkpoint: model_args 'evil': not options of --model rd4ad"),
])
def test_damaged_model_fields_are_one_line(saved, tmp_path, change, message):
    from engine.checkpoint import load_trained
    from utils.safe_pickle import load_plain_pickle

    _, path = saved
    state = {**load_plain_pickle(path), **change}
    bad = str(tmp_path / "bad.pdparams")
    paddle.save(state, bad)
    with pytest.raises(CheckpointError) as err:
        load_trained(bad, conv_backend="paddle")
    assert str(err.value).startswith(bad + ": ") and message in str(err.value) and "\n" not in str(err.value)
