"""Model structure: parameter counts, reference names, teacher freezing and weight loading."""
import numpy as np
import paddle
import pytest

from model import TeacherWeightsError, build_rd4ad, convert_reference_state_dicts
from model import teacher as teacher_module
from reference_weights import deterministic_state_dicts, reference_keys


def trainable_count(layer):
    return sum(int(np.prod(p.shape)) for p in layer.parameters() if not p.stop_gradient)


@pytest.mark.parametrize("arch,bottleneck,student", [
    ("resnet18", 12_205_312, 3_703_168),
    ("wide_resnet50_2", 67_277_824, 24_917_504),
])
def test_parameter_counts_equal_reference(arch, bottleneck, student):
    net = build_rd4ad(arch, teacher_weights="none")  # built, never run
    assert trainable_count(net.bottleneck) == bottleneck
    assert trainable_count(net.student) == student
    assert trainable_count(net.teacher) == 0  # frozen
    assert not hasattr(net.teacher, "layer4") and not hasattr(net.teacher, "fc")


@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet50_2"])
def test_reference_names_and_shapes_convert_onto_every_parameter(arch):
    keys = reference_keys(arch)
    zeros = {part: {k: np.zeros(s, np.float32) for k, s in names.items()} for part, names in keys.items()}
    state = convert_reference_state_dicts(arch, zeros["encoder"], zeros["bn"], zeros["decoder"])
    own = build_rd4ad(arch, teacher_weights="none").state_dict()
    assert set(own) <= set(state), sorted(set(own) - set(state))[:5]
    leftovers = set(state) - set(own)
    assert leftovers and all(k.startswith(("teacher.layer4.", "teacher.fc.")) for k in leftovers)
    for key, value in own.items():
        assert list(state[key].shape) == list(value.shape), key


def test_converted_weights_land_in_the_right_places():
    w = deterministic_state_dicts("resnet18")
    net = build_rd4ad("resnet18", teacher_weights="none")
    net.set_state_dict(convert_reference_state_dicts("resnet18", w["encoder"], w["bn"], w["decoder"]))
    np.testing.assert_array_equal(net.teacher.layer2[0].downsample[1]._variance.numpy(),
                                  w["encoder"]["layer2.0.downsample.1.running_var"])
    np.testing.assert_array_equal(net.bottleneck.bn_layer[1].conv2.weight.numpy(),
                                  w["bn"]["bn_layer.1.conv2.weight"])
    np.testing.assert_array_equal(net.student.layer1[0].upsample[0].weight.numpy(),
                                  w["decoder"]["layer1.0.upsample.0.weight"])


def test_features_have_teacher_shapes_and_teacher_stays_frozen():
    net = build_rd4ad("resnet18", teacher_weights="none")
    net.train()
    assert not net.teacher.training
    assert all(not layer.training for layer in net.teacher.sublayers())
    assert net.bottleneck.training and net.student.training
    teacher_feats, student_feats = net(paddle.randn([2, 3, 64, 64]))
    assert [list(t.shape) for t in teacher_feats] == [[2, 64, 16, 16], [2, 128, 8, 8], [2, 256, 4, 4]]
    assert [list(s.shape) for s in student_feats] == [list(t.shape) for t in teacher_feats]
    assert all(t.stop_gradient for t in teacher_feats)
    # Running statistics of the teacher must not move in training mode.
    before = net.teacher.bn1._mean.numpy().copy()
    net(paddle.randn([2, 3, 64, 64]) * 3 + 1)
    np.testing.assert_array_equal(net.teacher.bn1._mean.numpy(), before)


def test_teacher_weights_from_a_local_file(tmp_path):
    paddle.seed(1)
    source = paddle.vision.models.resnet18(pretrained=False)  # plain Paddle ResNet, with layer4/fc
    path = str(tmp_path / "resnet18_imagenet.pdparams")
    paddle.save(source.state_dict(), path)
    net = build_rd4ad("resnet18", teacher_weights=path)
    np.testing.assert_array_equal(net.teacher.layer3[1].conv2.weight.numpy(),
                                  source.layer3[1].conv2.weight.numpy())
    np.testing.assert_array_equal(net.teacher.bn1._variance.numpy(), source.bn1._variance.numpy())


def test_teacher_weights_of_another_arch_are_refused(tmp_path):
    path = str(tmp_path / "r34.pdparams")
    paddle.save(paddle.vision.models.resnet34(pretrained=False).state_dict(), path)
    with pytest.raises(TeacherWeightsError, match="r34.pdparams"):
        build_rd4ad("resnet18", teacher_weights=path)
    with pytest.raises(TeacherWeightsError, match="not found"):
        build_rd4ad("resnet18", teacher_weights=str(tmp_path / "missing.pdparams"))
    junk = tmp_path / "junk.pdparams"
    junk.write_text("not weights")
    with pytest.raises(TeacherWeightsError, match="junk.pdparams"):
        build_rd4ad("resnet18", teacher_weights=str(junk))


def test_imagenet_weights_offline_gives_one_clear_line(monkeypatch, tmp_path):
    import paddle.utils.download as download

    def no_network(url, md5sum=None):
        raise ConnectionError("Name or service not known")
    monkeypatch.setattr(download, "get_weights_path_from_url", no_network)
    with pytest.raises(TeacherWeightsError) as info:
        build_rd4ad("resnet18", teacher_weights="imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert "resnet18.pdparams" in message and "--teacher_weights" in message
    assert teacher_module.paddle_resnet.model_urls["resnet18"][0] in message


def test_the_model_owns_its_anomaly_map_head():
    """Training mode: features; eval mode: (maps, scores) from the same forward, for the
    image size it was built for (the exported head) and for any other size."""
    net = build_rd4ad("resnet18", teacher_weights="none", image_size=64)
    images = paddle.randn([2, 3, 64, 64])
    net.eval()
    with paddle.no_grad():
        maps, scores = net(images)
        teacher_feats, student_feats = net.features(images)
    assert list(maps.shape) == [2, 64, 64] and list(scores.shape) == [2]
    np.testing.assert_array_equal(scores.numpy(), maps.numpy().reshape(2, -1).max(1))
    from test_anomaly import anomaly_map

    np.testing.assert_allclose(anomaly_map(teacher_feats, student_feats, 64).numpy(), maps.numpy(), rtol=1e-6)
    assert net.head_for(64, 64) is net.head
    with paddle.no_grad():
        other, _ = net(paddle.randn([1, 3, 96, 128]))
    assert list(other.shape) == [1, 96, 128]
    assert not any(k.startswith("_other_heads") for k in net.state_dict())  # never saved
