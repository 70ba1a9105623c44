"""Properties that must hold for any input, fuzzed with hypothesis."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dataset import index_test_dir
from core.metrics import aupro, pixel_auroc, sample_auroc

FAST = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def labelled_scores(draw):
    n = draw(st.integers(4, 40))
    labels = draw(arrays(np.int8, n, elements=st.integers(0, 1)))
    if labels.min() == labels.max():  # both classes needed
        labels[0] = 1 - labels[0]
    # a grid of quarter steps: the transforms below keep every distinct value distinct in
    # floating point (3x + 7 would merge 1e-30 and 0, which no increasing map may do)
    scores = draw(arrays(np.int64, n, elements=st.integers(-400, 400))) / 4.0
    return labels, scores


@st.composite
def masks_and_maps(draw):
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(4, 12)), draw(st.integers(4, 12))
    masks = draw(arrays(np.bool_, (n, h, w)))
    if not masks.any():
        masks[0, 0, 0] = True
    if masks.all():
        masks[0, -1, -1] = False
    # few distinct values on purpose: ties are where AUROC and AUPRO go wrong
    maps = draw(arrays(np.float32, (n, h, w), elements=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 2.0])))
    return masks, maps


INCREASING = [lambda x: 3 * x + 7, lambda x: np.exp(x / 50), lambda x: np.cbrt(x) + x, np.arctan]


@FAST
@given(labelled_scores(), st.sampled_from(INCREASING))
def test_sample_auroc_is_invariant_to_increasing_transforms(data, transform):
    labels, scores = data
    assert sample_auroc(labels, transform(scores)) == pytest.approx(sample_auroc(labels, scores), abs=1e-12)


@FAST
@given(labelled_scores())
def test_auroc_of_reversed_scores_is_one_minus_auroc(data):
    labels, scores = data
    assert sample_auroc(labels, -scores) == pytest.approx(1 - sample_auroc(labels, scores), abs=1e-12)


@FAST
@given(masks_and_maps(), st.sampled_from(INCREASING))
def test_pixel_metrics_are_invariant_to_increasing_transforms(data, transform):
    masks, maps = data
    moved = transform(maps.astype(np.float64))
    assert pixel_auroc(masks, moved) == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    assert pixel_auroc(masks, 1 - maps) == pytest.approx(1 - pixel_auroc(masks, maps), abs=1e-12)
    for mode in ("per_image", "set"):
        a, b = aupro(masks, moved, mode=mode), aupro(masks, maps, mode=mode)
        assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, abs=1e-9), mode


@FAST
@given(masks_and_maps())
def test_aupro_lies_in_unit_interval_and_is_one_for_a_perfect_map(data):
    masks, maps = data
    for mode in ("per_image", "set"):
        value = aupro(masks, maps, mode=mode)
        assert np.isnan(value) or -1e-12 <= value <= 1 + 1e-12
        perfect = aupro(masks, masks.astype(np.float32) + 0.5, mode=mode)
        assert np.isnan(perfect) or perfect == pytest.approx(1.0)
    # nan only where an image has no defect-free pixel at all (per image) or never (set)
    assert aupro(masks, masks.astype(np.float32), mode="set") == pytest.approx(1.0)


NAME = st.text(alphabet=st.sampled_from("ab01_-. xyzé"), min_size=1, max_size=8).filter(
    lambda s: s.strip(". ") == s and s not in (".", ".."))


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(NAME, min_size=1, max_size=8, unique_by=str.lower), st.sampled_from(["png", "PNG", "jpg"]))
def test_the_indexer_pairs_every_mask_with_its_own_image(tmp_path_factory, names, ext):
    """Whatever the file names (prefixes of each other, digits, dots, spaces, unicode), each
    defect image gets exactly the mask named after it, never a neighbour's."""
    root = tmp_path_factory.mktemp("layout")
    test, gt = root / "test" / "crack", root / "ground_truth" / "crack"
    test.mkdir(parents=True)
    gt.mkdir(parents=True)
    for name in names:
        (test / f"{name}.{ext}").write_bytes(name.encode("utf-8"))  # content marks the owner
        (gt / f"{name}_mask.png").write_bytes(name.encode("utf-8"))
    samples = index_test_dir(str(root / "test"), str(root / "ground_truth"))
    assert len(samples) == len(names)
    for s in samples:
        assert open(s.mask_path, "rb").read() == open(s.image_path, "rb").read()
        assert os.path.basename(s.mask_path) == os.path.splitext(os.path.basename(s.image_path))[0] + "_mask.png"
