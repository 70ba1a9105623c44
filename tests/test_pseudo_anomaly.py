"""RD++'s pseudo-anomalies (model/pseudo_anomaly.py). The draws equal the reference's
generator's (tests/test_rdpp_parity.py); these check the pieces that make that so."""
import numpy as np
import paddle
import pytest

pytest.importorskip("opensimplex")

from model.pseudo_anomaly import AMPLITUDE, PseudoAnomalies, patch_bounds, simplex_octaves  # noqa: E402
from model.rdpp import IMAGENET_MEAN, IMAGENET_STD, RDPP  # noqa: E402


def test_a_patch_is_the_crop_of_one_field():
    """The reference evaluates noise at integer coordinates / frequency for each patch's own
    shape: with one seed, a smaller patch is the top-left crop of a larger one."""
    whole = simplex_octaves(123, (3, 31, 31))
    for h, w in ((10, 10), (17, 29), (31, 12)):
        np.testing.assert_array_equal(simplex_octaves(123, (3, h, w)), whole[:, :h, :w])
    assert not np.array_equal(simplex_octaves(124, (3, 8, 8)), whole[:, :8, :8])


def test_boxes_stay_in_the_references_ranges():
    np.random.seed(5)
    gen = PseudoAnomalies(IMAGENET_MEAN, IMAGENET_STD)
    patches = gen.patches(200, 256)
    for p in patches:
        rows, cols = np.nonzero(np.abs(p).sum(0))
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert 10 <= h < 32 and 10 <= w < 32 and rows.min() >= 1 and cols.min() >= 1
    assert np.abs(patches).max() <= AMPLITUDE * 2.5  # octave amplitudes sum to 2.38 at most


def test_patch_bounds():
    assert patch_bounds(256) == (10, 32) and patch_bounds(512) == (10, 64)
    assert patch_bounds(64) == (2, 8) and patch_bounds(16) == (1, 2)
    with pytest.raises(ValueError, match="image size 8: too small"):
        patch_bounds(8)


def test_train_inputs_add_the_patch_in_image_units():
    """noisy = (img + patch - mean) / std, i.e. the normalised batch plus patch / std; the
    clean images are passed through untouched."""
    net = RDPP("resnet18", 64)
    images = paddle.to_tensor(np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype("float32"))
    np.random.seed(9)
    inputs = net.train_inputs(images)
    np.random.seed(9)
    expected = PseudoAnomalies(IMAGENET_MEAN, IMAGENET_STD).patches(3, 64) / IMAGENET_STD.reshape(3, 1, 1)
    assert inputs["images"] is images
    np.testing.assert_allclose(inputs["noisy"].numpy() - images.numpy(), expected, atol=1e-6)
    assert (np.abs(expected).sum(1) > 0).sum(axis=(1, 2)).min() >= 4  # a patch in every image
