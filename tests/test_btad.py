"""BTAD (beanTech Anomaly Detection) as a data layout beside MVTec AD: ROOT/CLASS/train/ok,
test/ok and test/ko, ground_truth/ko/NAME.png (or .bmp), told apart by its folders or
chosen with --layout. A tiny synthetic BTAD built here: .bmp images with .png masks
(class 01), .png with .png (02), .bmp with .bmp (03), as the real set's loaders expect."""
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import main
from dataset import (DataError, class_layouts, index_test, index_test_dir, index_train_dir, load_mask,
                     resolve_sources)
from engine.train import pixel_note

from conftest import ROOT

SAMPLE = os.path.join(ROOT, "sample_data", "bottle")
# class: (image extension, mask extension)
FORMATS = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}
SIZE = 32
TINY = ["--arch", "resnet18", "--image_size", "64", "--teacher_weights", "none", "--batch_size", "2",
        "--epochs", "1", "--eval_interval", "0", "--log_interval", "0", "--no_report"]


def defect_box(index: int) -> tuple[slice, slice]:
    """Where defect image `index` has its patch: a different place for each image."""
    top, left = 2 + 12 * (index % 2), 2 + 12 * (index // 2)
    return slice(top, top + 10), slice(left, left + 10)


def make_btad(root, classes=("01", "02", "03"), train=6, good=2, bad=3):
    """A BTAD-shaped folder of tiny images. Defect images carry a bright patch at
    defect_box(i), which their mask marks; masks are written in reverse order, so pairing
    by order would pair them wrongly."""
    rng = np.random.default_rng(0)
    for cls in classes:
        image_ext, mask_ext = FORMATS[cls]
        base = root / cls
        for folder in ("train/ok", "test/ok", "test/ko", "ground_truth/ko"):
            (base / folder).mkdir(parents=True)

        def picture():
            return (rng.random((SIZE, SIZE, 3)) * 40 + 100).astype(np.uint8)
        for i in range(train):
            Image.fromarray(picture()).save(base / "train" / "ok" / f"{i:04d}{image_ext}")
        for i in range(good):
            Image.fromarray(picture()).save(base / "test" / "ok" / f"{100 + i:04d}{image_ext}")
        for i in reversed(range(bad)):
            pixels, mask = picture(), np.zeros((SIZE, SIZE), np.uint8)
            pixels[defect_box(i)] = 250
            mask[defect_box(i)] = 255
            Image.fromarray(pixels).save(base / "test" / "ko" / f"{i:04d}{image_ext}")
            Image.fromarray(mask).save(base / "ground_truth" / "ko" / f"{i:04d}{mask_ext}")
    return root


def test_btad_is_found_by_its_shape_and_its_samples_labels_and_masks_pair_by_name(tmp_path):
    root = make_btad(tmp_path / "btad")
    sources = resolve_sources(str(root), "all")
    assert [s.name for s in sources] == ["01", "02", "03"] and {s.layout for s in sources} == {"btad"}
    assert resolve_sources(str(root), "02", layout="btad") == [sources[1]]
    for source in sources:
        image_ext, mask_ext = FORMATS[source.name]
        train = index_train_dir(source.train_dir)
        assert len(train) == 6 and source.train_dir == str(root / source.name / "train" / "ok")
        assert all(s.label == 0 and s.image_path.endswith(image_ext) for s in train)
        test = index_test_dir(source.test_dir, source.gt_dir, source.layout)
        assert sorted((s.defect, s.label) for s in test) == [("ko", 1)] * 3 + [("ok", 0)] * 2
        for s in test:
            stem = os.path.splitext(os.path.basename(s.image_path))[0]
            if s.label == 0:
                assert s.mask_path is None and s.has_mask
                continue
            assert s.mask_path == str(root / source.name / "ground_truth" / "ko" / f"{stem}{mask_ext}")
            # the mask marks this image's own patch
            mask = load_mask(s.mask_path, SIZE)[0]
            expected = np.zeros((SIZE, SIZE), np.float32)
            expected[defect_box(int(stem))] = 1
            np.testing.assert_array_equal(mask, expected)
            patch = np.asarray(Image.open(s.image_path))[defect_box(int(stem))]
            assert patch.min() == 250


def test_plain_folders_in_btads_naming_and_infers_data_dir(tmp_path):
    """--train_dir/--test_dir with --layout btad (test/ok good, masks NAME.png or .bmp in
    the sibling ground_truth), and infer.py's --data_dir/--cls (index_test) on BTAD."""
    root = make_btad(tmp_path / "data", classes=("03",))
    source, = resolve_sources("", "all", str(root / "03" / "train" / "ok"), str(root / "03" / "test"), "btad")
    assert source.name == "03" and source.layout == "btad" and source.gt_dir == str(root / "03" / "ground_truth")
    want = [(s.image_path, s.mask_path, s.label) for s in resolve_sources(str(root), "03")
            for s in index_test_dir(s.test_dir, s.gt_dir, s.layout)]
    assert [(s.image_path, s.mask_path, s.label) for s in
            index_test_dir(source.test_dir, source.gt_dir, source.layout)] == want
    assert [(s.image_path, s.mask_path, s.label) for s in index_test(str(root), "03")] == want
    assert sum(m is not None and m.endswith(".bmp") for _, m, _ in want) == 3


def test_a_root_with_both_layouts_gives_each_class_its_own(tmp_path):
    root = make_btad(tmp_path / "data", classes=("01",))
    shutil.copytree(SAMPLE, root / "bottle")
    assert class_layouts(str(root)) == {"01": "btad", "bottle": "mvtec"}
    assert class_layouts(str(root), "mvtec") == {"bottle": "mvtec"}
    bottle = resolve_sources(str(root), "bottle")[0]
    assert bottle.layout == "mvtec" and bottle.train_dir.endswith(os.path.join("train", "good"))


def test_a_class_folder_with_both_shapes_must_be_chosen(tmp_path):
    root = make_btad(tmp_path / "data", classes=("01",))
    (root / "01" / "train" / "good").mkdir()
    with pytest.raises(DataError, match=r"01: both train/good \(MVTec AD\) and train/ok \(BTAD\): choose "
                                        r"with --layout mvtec or --layout btad$"):
        resolve_sources(str(root), "all")
    assert resolve_sources(str(root), "all", layout="btad")[0].layout == "btad"


def test_a_missing_mask_is_the_existing_error_naming_both_names_looked_for(tmp_path):
    root = make_btad(tmp_path / "data", classes=("03",))
    os.remove(root / "03" / "ground_truth" / "ko" / "0001.bmp")
    source = resolve_sources(str(root), "03")[0]
    image = root / "03" / "test" / "ko" / "0001.bmp"
    with pytest.raises(DataError) as e:
        index_test_dir(source.test_dir, source.gt_dir, source.layout)
    gt = root / "03" / "ground_truth" / "ko"
    assert str(e.value) == (f"{image}: defective test image has no mask (expected {gt / '0001.png'} or "
                            f"{gt / '0001.bmp'})")


def test_without_ground_truth_the_pixel_note_names_btads_mask_folder(tmp_path):
    root = make_btad(tmp_path / "data", classes=("02",))
    gt = root / "02" / "ground_truth"
    for f in (gt / "ko").iterdir():
        f.unlink()
    (gt / "ko").rmdir()
    gt.rmdir()
    source = resolve_sources(str(root), "02")[0]
    samples = index_test_dir(source.test_dir, source.gt_dir, source.layout)
    assert [s.mask_path for s in samples if s.label == 1] == [None] * 3
    assert pixel_note(samples, source) == (f"no ground-truth masks (BTAD layout: {gt}/ko/NAME.png (or .bmp)): "
                                           f"pixel metrics n/a, image metrics still computed")


def run_main(capsys, *args):
    code = main.main([*TINY, *args])
    out = capsys.readouterr()
    return code, out.out + out.err, out.err


def one_error(capsys, *args) -> str:
    code, text, err = run_main(capsys, *args)
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert code == 2 and len(lines) >= 1 and lines[-1].startswith("error: "), text[-2000:]
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in text
    return lines[-1]


def test_bad_btad_folders_are_one_line_errors(tmp_path, capsys):
    root = make_btad(tmp_path / "data", classes=("01",))
    out = str(tmp_path / "out")
    assert "no class folders with train/good inside (expected the MVTec AD layout ROOT/CLASS/train/good)" in \
        one_error(capsys, "--data_dir", str(root), "--layout", "mvtec", "--output_dir", out)
    mvtec = tmp_path / "mvtec"
    mvtec.mkdir()
    shutil.copytree(SAMPLE, mvtec / "bottle")
    assert f"{mvtec}: no class folders with train/ok inside (expected the BTAD layout ROOT/CLASS/train/ok)" in \
        one_error(capsys, "--data_dir", str(mvtec), "--layout", "btad", "--output_dir", out)
    assert "--layout" in one_error(capsys, "--data_dir", str(root), "--layout", "visa", "--output_dir", out)
    for f in (root / "01" / "train" / "ok").iterdir():
        f.unlink()
    assert f"{root / '01' / 'train' / 'ok'}: no training images" in \
        one_error(capsys, "--data_dir", str(root), "--output_dir", out)
    assert not os.path.exists(out)


def test_a_lite_training_and_evaluation_on_btad_give_a_results_table(tmp_path, capsys):
    """resnet18, 64 px, 1 epoch, the three classes: trained, evaluated, tabled, with pixel
    metrics from the paired masks."""
    root = make_btad(tmp_path / "btad")
    out = tmp_path / "out"
    code, text, _ = run_main(capsys, "--data_dir", str(root), "--output_dir", str(out))
    assert code == 0, text[-3000:]
    assert "[01] 5 train / 1 validation / 5 test images" in text
    code, text, _ = run_main(capsys, "--mode", "eval", "--output_dir", str(out))
    assert code == 0, text[-3000:]
    metrics = json.load(open(out / "results.json"))["classes"]
    assert sorted(metrics) == ["01", "02", "03"]
    for cls, m in metrics.items():
        assert 0.0 <= m["sample_auroc"] <= 1.0 and 0.0 <= m["pixel_auroc"] <= 1.0, (cls, m)
    table = open(out / "results.md").read()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert [r.split("|")[1].strip() for r in rows[2:5]] == ["01", "02", "03"], table
    assert "| **mean** |" in table, table
