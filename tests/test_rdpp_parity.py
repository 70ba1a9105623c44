"""Parity of RD++ (model/rdpp.py) with the reference (tientrandinh/Revisiting-Reverse-Distillation
@7f2ceb7): same weights -> same projected features, decoder outputs, maps, scores, loss
terms, three optimiser steps with gradient accumulation, and pseudo-anomaly draws.

tests/fixtures/parity_rdpp_resnet18.npz was written by tests/make_rdpp_fixture.py, which runs
the reference's own code (PyTorch, geomloss) on the deterministic weights of
tests/reference_weights.py. As tests/test_parity.py: inference in float32 within 1e-4 of each
tensor's largest value, training in float64 within 1e-6.
"""
import os

import numpy as np
import paddle
import pytest

from model import convert_reference_state_dicts
from model.onednn import use_conv_backend
from model.pseudo_anomaly import PseudoAnomalies
from model.rdpp import IMAGENET_MEAN, IMAGENET_STD, RDPP, contrast_loss, reconstruction_loss
from engine.optim import build_optimizer
from reference_weights import assert_close, deterministic_images, deterministic_projector, deterministic_state_dicts

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "parity_rdpp_resnet18.npz")
RTOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE))


def reference_rdpp(arch="resnet18", dtype="float32", conv_backend="paddle", image_size=64, ssot="as_coded"):
    w = deterministic_state_dicts(arch)
    state = convert_reference_state_dicts(arch, w["encoder"], w["bn"], w["decoder"], deterministic_projector(arch))
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        net = RDPP(arch, image_size, ssot=ssot)
    finally:
        paddle.set_default_dtype(previous)
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("head.")]
    assert not missing, missing[:3]
    state = {k: v.astype(dtype) for k, v in state.items() if k in own}
    net.set_state_dict({**{k: v for k, v in own.items() if k.startswith("head.")}, **state})
    net.conv_backend = use_conv_backend(net, conv_backend)
    return net


def check_eval(net, reference, prefix, dtype="float32", rtol=RTOL):
    net.eval()
    images = paddle.to_tensor(deterministic_images(2, int(reference["image_size"])).astype(dtype))
    with paddle.no_grad():
        teacher = net.teacher_features(images)
        projected = net.projector(teacher)
        student = net.student(net.bottleneck(projected))
        maps, scores = net(images)
    for k in range(3 if prefix + "projected_0" in reference else 0):
        assert_close(projected[k].numpy(), reference[f"{prefix}projected_{k}"], f"projected scale {k}", rtol)
        assert_close(student[k].numpy(), reference[f"{prefix}student_{k}"], f"decoder scale {k}", rtol)
    assert_close(maps.numpy(), reference[prefix + "anomaly_map"], "anomaly map", rtol)
    assert_close(scores.numpy(), reference[prefix + "scores"], "scores", rtol)
    return maps.numpy(), scores.numpy()


@pytest.mark.parametrize("conv_backend", ["paddle", "auto"])
def test_eval_matches_reference(reference, conv_backend):
    """evaluation_multi_proj: maps between the UNprojected teacher features and the decoder's
    outputs, with the projector in the path; both convolution backends."""
    check_eval(reference_rdpp(conv_backend=conv_backend), reference, "eval_")


def test_loss_terms_and_three_accumulated_steps_match_reference(reference):
    """main.py's loop in float64: six iterations, both Adams stepping every second one (loss
    not divided); every term of every iteration, BatchNorm buffers, trained maps."""
    net = reference_rdpp(dtype="float64")
    images = deterministic_images(2, 64).astype("float64")
    noisy = reference["noisy"].astype("float64")
    groups = net.optimizer_groups(0.005)
    assert [(g.name, g.lr, g.betas) for g in groups] == [("projector", 0.001, (0.5, 0.999)),
                                                          ("distillation", 0.005, (0.5, 0.999))]
    optimizers = [build_optimizer(g.parameters, g.lr, *g.betas) for g in groups]
    net.train()
    assert not net.teacher.training and net.projector.training and net.student.training
    got = {k: [] for k in ("loss", "kd", "proj", "ssot", "reconstruct", "contrast")}
    for i in range(len(reference["train_loss"])):
        flip = (lambda x: x[..., ::-1].copy()) if i % 2 else (lambda x: x)
        inputs = {"images": paddle.to_tensor(flip(images)), "noisy": paddle.to_tensor(flip(noisy))}
        terms = net.loss_terms(inputs, net.teacher_features(inputs["images"]))
        terms["loss"].backward()
        if (i + 1) % net.grad_accumulation == 0:
            for opt in optimizers:
                opt.step()
                opt.clear_grad()
        for key in got:
            got[key].append(float(terms[key]))
    assert net.grad_accumulation == 2
    for key in ("loss", "kd", "proj", "reconstruct"):
        assert_close(got[key], reference["train_" + key], key, 1e-6)
    # As coded, SSOT and (on these weights) the contrast hinge are zero on both sides.
    assert np.abs(got["ssot"]).max() < 1e-12 and np.abs(reference["train_ssot"]).max() < 1e-12
    assert np.array_equal(got["contrast"], reference["train_contrast"])
    parts = {"bn": net.bottleneck, "decoder": net.student}
    suffix = {"running_mean": "_mean", "running_var": "_variance"}
    for key in [k for k in reference if k.startswith("buffer:")]:
        part, name = key[len("buffer:"):].split(".", 1)
        layer, buf = name.rsplit(".", 1)
        assert_close(parts[part].state_dict()[f"{layer}.{suffix[buf]}"].numpy(), reference[key], key, 1e-6)
    check_eval(net, reference, "trained_", "float64", 1e-6)


def test_reconstruction_and_contrast_terms_match_reference(reference):
    """On correlated features where the contrast's hinge is active: values and the gradient
    with respect to the projected (second) features, as torch's CosineSimilarity and
    CosineEmbeddingLoss(margin 0.5, target -1)."""
    first = [paddle.to_tensor(reference[f"terms_first_{k}"]) for k in range(3)]
    second = [paddle.to_tensor(reference[f"terms_second_{k}"], stop_gradient=False) for k in range(3)]
    reconstruct, contrast = reconstruction_loss(first, second), contrast_loss(first, second)
    assert float(contrast) > 0.1  # the hinge is active: the term is tested, not a zero
    assert_close(float(reconstruct), reference["terms_reconstruct"], "reconstruction", 1e-10)
    assert_close(float(contrast), reference["terms_contrast"], "contrast", 1e-10)
    (reconstruct + contrast).backward()
    for k in range(3):
        assert_close(second[k].grad.numpy(), reference[f"terms_grad_second_{k}"], f"gradient scale {k}", 1e-8)


@pytest.mark.parametrize("seed", [0, 1])
def test_pseudo_anomalies_are_the_references_draws(reference, seed):
    """Seeded alike, the same boxes (h, w, top, left) and the same simplex-noise patches as
    the reference's MVTecDataset_train at 256 px."""
    pytest.importorskip("opensimplex")
    boxes = reference[f"noise{seed}_boxes"]
    np.random.seed(seed)
    gen = PseudoAnomalies(IMAGENET_MEAN, IMAGENET_STD)
    patches = gen.patches(len(boxes), 256)
    flat = []
    for patch, (h, w, top, left) in zip(patches, boxes):
        inside = np.zeros(patch.shape, bool)
        inside[:, top:top + h, left:left + w] = True
        assert not patch[~inside].any(), "noise outside the reference's box"
        flat.append(patch[:, top:top + h, left:left + w].ravel())
    np.testing.assert_allclose(np.concatenate(flat), reference[f"noise{seed}_patches"], rtol=0, atol=1e-12)
