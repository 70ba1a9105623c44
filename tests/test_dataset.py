"""MVTec layout parsing and preprocessing."""
import os

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from dataset import (IMAGENET_MEAN, IMAGENET_STD, DataError, MVTecDataset, index_test,
                     index_train, list_classes, load_image, load_mask, resolve_classes)


def write_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_class(root, cls="widget", gray=False):
    rng = np.random.default_rng(0)
    shape = (40, 40) if gray else (40, 40, 3)
    for name in ("000.png", "001.png"):
        write_image(root / cls / "train" / "good" / name, rng.integers(0, 255, shape, dtype=np.uint8))
    write_image(root / cls / "test" / "good" / "000.png", rng.integers(0, 255, shape, dtype=np.uint8))
    # Defect image names whose sort order differs from their masks' sort order
    # ("10" < "9" as strings, and 9_mask < 10_mask would pair them wrongly by position).
    for name, box in (("9", (0, 10)), ("10", (20, 40))):
        write_image(root / cls / "test" / "hole" / f"{name}.png", rng.integers(0, 255, shape, dtype=np.uint8))
        mask = np.zeros((40, 40), np.uint8)
        mask[box[0]:box[1], :] = 255
        write_image(root / cls / "ground_truth" / "hole" / f"{name}_mask.png", mask)
    (root / cls / "train" / "good" / ".DS_Store").write_bytes(b"\0junk")
    (root / cls / "test" / "good" / "notes.txt").write_text("not an image")
    return root


def test_index_pairs_masks_by_name_not_order(tmp_path):
    root = make_class(tmp_path)
    samples = index_test(str(root), "widget")
    assert [(s.defect, s.label) for s in samples] == [("good", 0), ("hole", 1), ("hole", 1)]
    for s in samples[1:]:
        stem = s.image_path.rsplit("/", 1)[-1][:-4]
        assert s.mask_path.endswith(f"/ground_truth/hole/{stem}_mask.png")
        mask = load_mask(s.mask_path, 40)[0]
        expected_rows = slice(0, 10) if stem == "9" else slice(20, 40)
        assert mask[expected_rows].all() and mask.sum() == mask[expected_rows].size
    assert len(index_train(str(root), "widget")) == 2  # .DS_Store skipped


def test_missing_mask_is_an_error_naming_the_image(tmp_path):
    root = make_class(tmp_path)
    (root / "widget" / "ground_truth" / "hole" / "9_mask.png").unlink()
    with pytest.raises(DataError, match=r"test/hole/9\.png.*no mask"):
        index_test(str(root), "widget")


def test_grayscale_becomes_three_channels(tmp_path):
    root = make_class(tmp_path, gray=True)
    image, mask, label = MVTecDataset(index_train(str(root), "widget"), 64)[0]
    assert image.shape == (3, 64, 64) and image.dtype == np.float32
    np.testing.assert_allclose(image[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0],
                               image[2] * IMAGENET_STD[2] + IMAGENET_MEAN[2], atol=1e-6)
    assert mask.shape == (1, 64, 64) and mask.sum() == 0 and label == 0


def test_preprocessing_is_pil_bilinear_resize_and_imagenet_normalisation(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    write_image(tmp_path / "x.png", rgb)
    ours = load_image(str(tmp_path / "x.png"), 64)
    resized = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255
    expected = ((resized - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_mask_binarised_at_half_after_resize(tmp_path):
    mask = np.zeros((4, 4), np.uint8)
    mask[:, 2:] = 255
    write_image(tmp_path / "m.png", mask)
    ours = load_mask(str(tmp_path / "m.png"), 8)[0]
    soft = np.asarray(Image.fromarray(mask).resize((8, 8), Image.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_array_equal(ours, (soft > 0.5).astype(np.float32))
    assert set(np.unique(ours)) == {0.0, 1.0}


def test_classes_and_bad_roots(tmp_path):
    make_class(tmp_path, "b")
    make_class(tmp_path, "a")
    (tmp_path / "not_a_class").mkdir()
    assert list_classes(str(tmp_path)) == ["a", "b"]
    assert resolve_classes(str(tmp_path), "all") == ["a", "b"]
    assert resolve_classes(str(tmp_path), "b, a") == ["b", "a"]
    with pytest.raises(DataError, match="'zzz' not found"):
        resolve_classes(str(tmp_path), "zzz")
    with pytest.raises(DataError, match="not found"):
        list_classes(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no class folders"):
        list_classes(str(tmp_path / "not_a_class"))


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="broken.png: cannot read image"):
        load_image(str(bad), 64)


def test_sample_data_is_labelled_correctly():
    samples = index_test(os.path.join(ROOT, "sample_data"), "bottle")
    defects = {s.defect for s in samples if s.label == 1}
    assert defects == {"scratch", "crack", "missing", "stain"}
    assert sum(s.label == 0 for s in samples) == 2
    for s in samples:
        if s.label:
            assert load_mask(s.mask_path, 256).sum() > 0  # every defect has pixels in its mask
