"""Parity with the reference RD4AD (PyTorch): same weights -> same features, loss, maps.

tests/fixtures/parity_resnet18.npz was written by tests/make_parity_fixture.py, which runs
the reference's own model, loss and anomaly-map code on the deterministic weights of
tests/reference_weights.py. Inference is compared in float32 within 1e-4 relative to each
tensor's largest value. Training is compared in float64 within 1e-6: in float32 a
pre-activation within rounding noise of zero can flip a ReLU, and Adam's first steps (about
lr * sign(grad)) blow that up to 1e-3, which would hide the semantics under noise.
"""
import os

import numpy as np
import paddle
import pytest

from model import build_rd4ad, convert_reference_state_dicts
from reference_weights import assert_close, deterministic_images, deterministic_state_dicts
from model.loss import cosine_distillation_loss
from engine.optim import build_optimizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
RTOL = 1e-4


def load_fixture(arch):
    return dict(np.load(os.path.join(FIXTURES, f"parity_{arch}.npz")))


def reference_model(arch="resnet18", dtype="float32", conv_backend="auto"):
    w = deterministic_state_dicts(arch)
    state = convert_reference_state_dicts(arch, w["encoder"], w["bn"], w["decoder"])
    del w
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        model = build_rd4ad(arch, teacher_weights="none", conv_backend=conv_backend)
    finally:
        paddle.set_default_dtype(previous)
    model.set_state_dict({k: v.astype(dtype) for k, v in state.items()})
    return model


@pytest.fixture(scope="module")
def reference():
    return load_fixture("resnet18")


def _check_eval(net, reference, prefix, dtype="float32", rtol=RTOL):
    net.eval()
    size = int(reference["image_size"])
    channels = int(reference["channels"]) or None  # the fixture may hold the first channels only
    images = paddle.to_tensor(deterministic_images(2, size).astype(dtype))
    with paddle.no_grad():
        teacher_feats, student_feats = net.features(images)
        loss = cosine_distillation_loss(teacher_feats, student_feats)
        maps, scores = net(images)  # eval mode: the model's own anomaly-map head
    np.testing.assert_array_equal(scores.numpy(), maps.numpy().reshape(len(maps), -1).max(1))
    for i in range(3):
        assert_close(teacher_feats[i][:, :channels].numpy(), reference[f"teacher_{i}"],
                     f"teacher scale {i}", rtol)
        assert_close(student_feats[i][:, :channels].numpy(), reference[f"{prefix}student_{i}"],
                     f"student scale {i}", rtol)
    assert_close(float(loss), reference[prefix + "loss"], "loss", rtol)
    assert_close(maps.numpy(), reference[prefix + "anomaly_map"], "anomaly map", rtol)


def _check_buffers(net, reference, rtol):
    parts = {"bn": net.bottleneck, "decoder": net.student}
    suffix = {"running_mean": "_mean", "running_var": "_variance"}
    keys = [k for k in reference if k.startswith("buffer:")]
    assert keys
    for key in keys:
        part, name = key[len("buffer:"):].split(".", 1)
        layer_name, buf = name.rsplit(".", 1)
        ours = parts[part].state_dict()[f"{layer_name}.{suffix[buf]}"].numpy()
        assert_close(ours, reference[key], key, rtol)


@pytest.mark.parametrize("conv_backend", ["paddle", "auto"])
def test_eval_outputs_match_reference(reference, conv_backend):
    """Both backends of the 3x3 convolutions (auto: oneDNN where Paddle carries it)."""
    net = reference_model("resnet18", conv_backend=conv_backend)
    assert conv_backend == "paddle" or net.conv_backend == load_library_backend()
    _check_eval(net, reference, "eval_")


def load_library_backend() -> str:
    from model.onednn import OneDNNLibrary, load_library
    return "onednn" if isinstance(load_library(), OneDNNLibrary) else "paddle"


def test_wide_resnet50_2_matches_reference():
    """The default arch uses other blocks (bottleneck blocks, width 128, the student's
    stride-2 transposed conv in conv2): inference, and one train-mode forward (batch
    statistics and running-statistics update), in float32."""
    reference = load_fixture("wide_resnet50_2")
    net = reference_model("wide_resnet50_2")
    _check_eval(net, reference, "eval_")
    net.train()
    images = paddle.to_tensor(deterministic_images(2, int(reference["image_size"])))
    with paddle.no_grad():
        loss = cosine_distillation_loss(*net(images))
    assert_close(float(loss), reference["train_mode_loss"], "train-mode loss")
    _check_buffers(net, reference, RTOL)


def test_training_matches_reference(reference):
    """Three Adam steps in train mode (float64): losses, BatchNorm running statistics
    (torch's unbiased-variance update) and the trained model's outputs all match. (float64
    runs Paddle's own convolutions: model/onednn.py is float32 only; its float32 gradients
    are checked against float64 in tests/test_onednn.py.)"""
    net = reference_model("resnet18", "float64")
    size = int(reference["image_size"])
    images = paddle.to_tensor(deterministic_images(2, size).astype("float64"))
    optimizer = build_optimizer(net.trainable_parameters(), lr=0.005, beta1=0.5, beta2=0.999)
    net.train()
    assert not net.teacher.training and net.bottleneck.training and net.student.training
    losses = []
    for step in range(len(reference["train_losses"])):
        batch = images if step % 2 == 0 else images.flip([-1])
        loss = cosine_distillation_loss(*net(batch))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    assert_close(losses, reference["train_losses"], "training losses", 1e-6)
    _check_buffers(net, reference, 1e-6)
    _check_eval(net, reference, "trained_", "float64", 1e-6)
