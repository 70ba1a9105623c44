"""RD++ (model/rdpp.py) as a method of the model contract (model/base.py): its parts,
optimiser groups, options, rebuild arguments, eval forward; and the reference's
checkpoint converted, exported and run by infer.py scoring as the reference does."""
import os

import numpy as np
import paddle
import pytest

from model.rdpp import RDPP, SSOT_CHOICES
from reference_weights import projector_keys

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "parity_rdpp_resnet18.npz")


@pytest.fixture(scope="module")
def net():
    paddle.seed(0)
    return RDPP("resnet18", 64)


def test_projector_has_the_references_widths_and_parameters(net):
    """Per scale C -> C/2 -> C/4 -> C/2 -> C, 3x3 convolutions with bias, and no other
    parameter (InstanceNorm without affine): the reference's MultiProjectionLayer."""
    ours = {k: v.shape for k, v in net.projector.state_dict().items()}
    ref = {k.replace(".weight", ".conv.weight"): v for k, v in projector_keys("resnet18").items()}
    assert ours == ref
    big = RDPP("wide_resnet50_2")
    assert big.projector.proj_c.proj[0].conv.weight.shape == [512, 1024, 3, 3]
    assert big.projector.proj_a.proj[9].conv.weight.shape == [256, 128, 3, 3]


def test_parts_groups_and_options(net):
    assert set(net.trainable_parts()) == {"projector", "bottleneck", "student"}
    groups = net.optimizer_groups(0.005)
    assert [(g.name, g.lr, g.betas) for g in groups] == [("projector", 0.001, (0.5, 0.999)),
                                                          ("distillation", 0.005, (0.5, 0.999))]
    trainable = {id(p) for layer in net.trainable_parts().values() for p in layer.parameters() if not p.stop_gradient}
    grouped = [id(p) for g in groups for p in g.parameters]
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable
    assert not any(id(p) in trainable for p in net.teacher.parameters())
    assert net.grad_accumulation == 2 and net.name == "rdpp"
    assert net.options["ssot"].default == "as_coded" and net.options["ssot"].choices == SSOT_CHOICES
    with pytest.raises(ValueError, match="ssot 'nope'"):
        RDPP("resnet18", 64, ssot="nope")


def test_build_args_rebuild_the_same_architecture(net):
    args = net.build_args()
    assert args == {"arch": "resnet18", "image_size": 64, "ssot": "as_coded"}
    again = RDPP(**{**args, "ssot": "pairwise"})
    assert again.ssot == "pairwise"
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


def test_eval_map_compares_unprojected_teacher_with_decoder_through_the_projector(net):
    net.eval()
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype("float32"))
    with paddle.no_grad():
        maps, scores = net(x)
        teacher = net.teacher_features(x)
        decoded = net.student(net.bottleneck(net.projector(teacher)))
        want_maps, want_scores = net.head_for(64, 64)(teacher, decoded)
        np.testing.assert_array_equal(maps.numpy(), want_maps.numpy())
        np.testing.assert_array_equal(scores.numpy(), want_scores.numpy())
        weight = net.projector.proj_b.proj[9].conv.weight
        saved = weight.numpy().copy()
        # the projector is on the path: its weights change the map (not by a scale, which
        # the InstanceNorm after each convolution takes out)
        weight.set_value(saved + np.random.default_rng(2).normal(size=saved.shape).astype("float32") * saved.std())
        changed, _ = net(x)
        weight.set_value(saved)
    assert np.abs(changed.numpy() - maps.numpy()).max() > 1e-4


def test_training_mode_terms_are_logged_and_finite(net):
    net.train()
    np.random.seed(0)
    x = paddle.to_tensor(np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype("float32"))
    inputs = net.train_inputs(x)
    terms = net.loss_terms(inputs, net.teacher_features(inputs["images"]))
    assert set(terms) == {"loss", "kd", "proj", "ssot", "reconstruct", "contrast"}
    assert all(np.isfinite(float(v)) for v in terms.values())
    total = float(terms["kd"]) + 0.2 * (float(terms["ssot"]) + 0.01 * float(terms["reconstruct"])
                                        + 0.1 * float(terms["contrast"])) / 1.11
    assert float(terms["loss"]) == pytest.approx(total, rel=1e-6)
    net.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The reference's RD++ weights (formula) converted by the tool, then exported. Needs the
    model registry (model/registry.py, with its "rdpp" line): exports name their model."""
    pytest.importorskip("model.registry")
    import sys
    from conftest import ROOT
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_torch_checkpoint as tool
    import export_model
    from reference_weights import deterministic_projector, deterministic_state_dicts
    root = tmp_path_factory.mktemp("rdpp")
    w = deterministic_state_dicts("resnet18")
    ckpt = str(root / "bottle" / "model.pdparams")
    _, teacher = tool.convert("resnet18", w["encoder"], {"proj": deterministic_projector("resnet18"),
                              "bn": w["bn"], "decoder": w["decoder"]}, 64, "bottle", ckpt, None)
    save_dir = str(root / "inference" / "bottle")
    assert export_model.main(["--checkpoint", ckpt, "--save_dir", save_dir, "--teacher_weights", teacher]) == 0
    return ckpt, teacher, save_dir


def test_export_and_infer_score_as_the_reference(converted, tmp_path):
    """Through export (Paddle Inference, what infer.py runs) the maps and scores are the
    reference's evaluation_multi_proj ones; infer.py on a picture gives the predictor's."""
    import infer
    from PIL import Image
    from dataset import load_image
    from deploy.deployment import read_deployment
    from deploy.predictor import PredictorOptions, build_predictor
    from reference_weights import deterministic_images
    _, _, save_dir = converted
    fixture = np.load(FIXTURE)
    runner = build_predictor(read_deployment(save_dir), PredictorOptions(cpu_threads=2))
    maps, scores = runner(deterministic_images(2, 64))
    atol = 1e-4 * fixture["eval_anomaly_map"].max()
    np.testing.assert_allclose(maps, fixture["eval_anomaly_map"], rtol=0, atol=atol)
    np.testing.assert_allclose(scores, fixture["eval_scores"], rtol=1e-4)
    picture = tmp_path / "pic.png"
    Image.fromarray((np.random.default_rng(3).uniform(size=(64, 64, 3)) * 255).astype(np.uint8)).save(picture)
    out = tmp_path / "out"
    assert infer.main(["--model_dir", save_dir, "--image", str(picture), "--output_dir", str(out)]) == 0
    import csv
    row = next(csv.DictReader(open(out / "scores.csv")))
    _, want = runner(load_image(str(picture), 64)[None])
    assert float(row["score"]) == pytest.approx(float(want[0]), rel=1e-4)


def test_service_names_the_rdpp_export(converted):
    """serve.py's /model answer and model_id name the exported method (issue 24 §4)."""
    from deploy.deployment import read_deployment
    from deploy.predictor import PredictorOptions
    from deploy.service import Inspector
    from deploy.service_options import ServiceOptions

    inspector = Inspector(read_deployment(converted[2]), PredictorOptions(cpu_threads=1), ServiceOptions(workers=1))
    try:
        summary = inspector.summary()
    finally:
        inspector.pool.close()
    assert summary["model"] == "rdpp" and summary["model_id"].startswith("rdpp-resnet18-bottle-")
