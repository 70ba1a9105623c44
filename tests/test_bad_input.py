"""Every bad input a user can give: one line starting 'error:' naming the file and the
problem, exit status 2, nothing written; or, for one bad file among good ones, a warning
naming it and the run goes on. Through main.main / infer.main, the command-line entries."""
import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import main
from conftest import ROOT

SAMPLE = os.path.join(ROOT, "sample_data", "bottle")
TINY = ["--arch", "resnet18", "--image_size", "64", "--teacher_weights", "none", "--batch_size", "1",
        "--epochs", "1", "--eval_interval", "0", "--log_interval", "0", "--no_report"]


def run(capsys, *args):
    code = main.main([*TINY, *args])
    out = capsys.readouterr()
    return code, out.out + out.err, out.err


def expect_error(capsys, message, *args):
    code, text, err = run(capsys, *args)
    assert code == 2, text[-2000:]
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]  # progress bars use \r
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert message in errors[0], errors[0]
    assert "Traceback" not in text
    return errors[0]


def copy_class(tmp_path, name="widget", ground_truth=True):
    data = tmp_path / "data"
    ignore = None if ground_truth else shutil.ignore_patterns("ground_truth")
    shutil.copytree(SAMPLE, data / name, ignore=ignore)
    return data


# ------------------------------------------------------------------ folders and classes

def test_data_dir_missing_empty_or_not_mvtec(tmp_path, capsys):
    out = str(tmp_path / "out")
    expect_error(capsys, f"{tmp_path / 'nowhere'}: data directory not found; try the bundled sample first: "
                         f"python main.py --config configs/sample_bottle.yaml (in the repository's folder), "
                         f"or give --data_dir DIR",
                 "--data_dir", str(tmp_path / "nowhere"), "--output_dir", out)
    (tmp_path / "empty").mkdir()
    expect_error(capsys, "no class folders with train/good inside", "--data_dir", str(tmp_path / "empty"),
                 "--output_dir", out)
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(os.path.join(SAMPLE, "train", "good", "000.png"), flat / "a.png")
    expect_error(capsys, "expected the MVTec AD layout", "--data_dir", str(flat), "--output_dir", out)
    assert not os.path.exists(out)


def test_unknown_class_and_class_without_train_images(tmp_path, capsys):
    data = copy_class(tmp_path)
    out = str(tmp_path / "out")
    expect_error(capsys, "class 'gadget' not found (present: widget)", "--data_dir", str(data),
                 "--cls", "gadget", "--output_dir", out)
    for f in (data / "widget" / "train" / "good").iterdir():
        f.unlink()
    expect_error(capsys, "train/good: no training images", "--data_dir", str(data), "--output_dir", out)


def test_settings_checked_before_any_work(tmp_path, capsys):
    data = copy_class(tmp_path)
    out = tmp_path / "out"
    expect_error(capsys, "--image_size 80: must be a multiple of 32, at least 64", "--data_dir", str(data),
                 "--image_size", "80", "--output_dir", str(out))
    expect_error(capsys, "--image_size 32: must be a multiple of 32, at least 64", "--data_dir", str(data),
                 "--image_size", "32", "--output_dir", str(out))
    expect_error(capsys, "--batch_size 8 is larger than the 3 training images", "--data_dir", str(data),
                 "--batch_size", "8", "--output_dir", str(out))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    expect_error(capsys, f"{blocker / 'out'}: output directory is not writable", "--data_dir", str(data),
                 "--output_dir", str(blocker / "out"))
    assert not out.exists()


def test_offline_imagenet_weights_say_how_to_provide_them(tmp_path, capsys, monkeypatch):
    from paddle.utils import download

    def offline(*args, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(download, "get_weights_path_from_url", offline)
    data = copy_class(tmp_path)
    line = expect_error(capsys, "cannot get ImageNet weights for resnet18", "--data_dir", str(data),
                        "--output_dir", str(tmp_path / "out"), "--teacher_weights", "imagenet")
    assert "--teacher_weights PATH" in line and ".pdparams" in line
    expect_error(capsys, "missing.pdparams: teacher weights file not found", "--data_dir", str(data),
                 "--output_dir", str(tmp_path / "out"), "--teacher_weights", str(tmp_path / "missing.pdparams"))
    assert not (tmp_path / "out" / "widget").exists()


# ------------------------------------------------------------------ bad files

def spoil_training_folder(folder):
    png = open(os.path.join(SAMPLE, "train", "good", "000.png"), "rb").read()
    (folder / "truncated.png").write_bytes(png[: len(png) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "notes.txt").write_text("camera 3")


def test_bad_training_files_are_skipped_with_a_warning_naming_each(tmp_path, capsys):
    data = copy_class(tmp_path)
    folder = data / "widget" / "train" / "good"
    spoil_training_folder(folder)
    code, text, _ = run(capsys, "--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--val_ratio", "0")
    assert code == 0, text[-2000:]
    for name, reason in (("truncated.png", "cannot read image"), ("empty.png", "cannot read image (empty file)"),
                         ("text.png", "cannot read image")):
        assert f"warning: {folder / name}: {reason}" in text, name
    for ignored in (".DS_Store", "Thumbs.db", "notes.txt"):  # silently
        assert ignored not in text
    assert "[widget] 4 train / 0 validation / 10 test images" in text


def test_unreadable_training_file_is_skipped(tmp_path, capsys, monkeypatch):
    data = copy_class(tmp_path)
    locked = data / "widget" / "train" / "good" / "locked.png"
    shutil.copy(os.path.join(SAMPLE, "train", "good", "000.png"), locked)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: deny it the way the OS would
        import utils.images
        real_open = utils.images.open_regular  # every image file is opened by it

        def denying_open(path, *args, **kwargs):
            if str(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(utils.images, "open_regular", denying_open)
    code, text, _ = run(capsys, "--data_dir", str(data), "--output_dir", str(tmp_path / "out"))
    assert code == 0 and f"warning: {locked}: cannot read image (permission denied)" in text


def test_defect_image_without_its_mask_names_the_image(tmp_path, capsys):
    data = copy_class(tmp_path)
    os.remove(data / "widget" / "ground_truth" / "stain" / "001_mask.png")
    expect_error(capsys, f"{data / 'widget' / 'test' / 'stain' / '001.png'}: defective test image has no mask",
                 "--data_dir", str(data), "--output_dir", str(tmp_path / "out"))


def test_no_readable_training_image_is_an_error(tmp_path, capsys):
    data = copy_class(tmp_path)
    folder = data / "widget" / "train" / "good"
    for f in folder.iterdir():
        f.unlink()
    spoil_training_folder(folder)
    expect_error(capsys, f"{folder}: no readable training images", "--data_dir", str(data),
                 "--output_dir", str(tmp_path / "out"), "--val_ratio", "0")


def test_inference_reports_a_bad_test_image_in_its_row(tmp_path, capsys):
    data = copy_class(tmp_path)
    out = str(tmp_path / "out")
    assert run(capsys, "--data_dir", str(data), "--output_dir", out)[0] == 0
    (data / "widget" / "test" / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, text, err = run(capsys, "--data_dir", str(data), "--output_dir", out, "--mode", "infer")
    assert code == 1, text[-2000:]  # everything else written, but not every image got a verdict
    assert err.strip().splitlines()[-1].startswith("error: 1 of 1 classes failed: widget")
    rows = {r["image"]: r for r in csv.DictReader(open(os.path.join(out, "widget", "infer", "scores.csv")))}
    assert len(rows) == 11
    broken = rows["widget/test/good/broken.png"]
    assert "broken.png: cannot read image" in broken["error"] and broken["score"] == ""
    assert all(r["score"] != "" for k, r in rows.items() if k != "widget/test/good/broken.png")


# ------------------------------------------------------------------ image modes and masks

def test_image_modes_are_read_correctly(tmp_path):
    from dataset import load_rgb

    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (200, 40, 10)
    rgb[:, 30:] = (10, 90, 220)
    cases = {}
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    Image.fromarray(np.dstack([rgb, np.full((40, 60), 77, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4).save(tmp_path / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    # EXIF orientation 6: stored rotated, shown upright after a 90 degree turn
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(rgb, k=1).copy()).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    for name in ("plain.png", "rgba.png", "palette.png", "cmyk.jpg", "rotated.jpg"):
        cases[name] = load_rgb(str(tmp_path / name), 64).astype(int)
    for name, got in cases.items():
        assert got.shape == (64, 64, 3), name
        assert np.abs(got[32, 8] - [200, 40, 10]).max() <= 12, name   # left half stays left
        assert np.abs(got[32, 56] - [10, 90, 220]).max() <= 12, name  # right half stays right
    # 16-bit grayscale: scaled by its range, not clipped at 255
    gray16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    got = load_rgb(str(tmp_path / "gray16.png"), 64)
    assert got[0, 0, 0] <= 2 and got[0, -1, 0] >= 250 and 100 < got[0, 32, 0] < 160
    assert (got[..., 0] == got[..., 1]).all()


def test_masks_of_another_size_or_not_binary_are_fixed_with_warnings(tmp_path, capsys):
    from dataset import load_mask

    data = copy_class(tmp_path)
    gt = data / "widget" / "ground_truth"
    small = Image.open(gt / "crack" / "000_mask.png").resize((100, 100), Image.NEAREST)
    small.save(gt / "crack" / "000_mask.png")
    from PIL import ImageFilter
    Image.open(gt / "missing" / "000_mask.png").filter(ImageFilter.GaussianBlur(3)).save(gt / "missing" / "000_mask.png")
    soft = (np.asarray(Image.open(gt / "stain" / "000_mask.png")) > 0).astype(np.uint8)  # values 0/1
    Image.fromarray(soft * 1).save(gt / "stain" / "000_mask.png")
    code, text, _ = run(capsys, "--data_dir", str(data), "--output_dir", str(tmp_path / "out"))
    assert code == 0, text[-2000:]
    assert f"warning: {gt / 'crack' / '000_mask.png'}: mask is 100x100, its image 320x320: resized" in text
    assert f"warning: {gt / 'missing' / '000_mask.png'}: mask is not binary" in text
    assert "binarised at half its maximum" in text
    mask = load_mask(str(gt / "stain" / "000_mask.png"), 64)
    assert mask.sum() > 0  # 0/1 values binarised at half their maximum, not at 127
    grey = np.asarray(Image.open(gt / "scratch" / "000_mask.png")).astype(np.float32)
    Image.fromarray((grey * 0.6).astype(np.uint8)).save(gt / "scratch" / "000_mask.png")  # max 153
    assert np.array_equal(load_mask(str(gt / "scratch" / "000_mask.png"), 64),
                          load_mask(os.path.join(SAMPLE, "ground_truth", "scratch", "000_mask.png"), 64))


# ------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def trained_class(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    data = root / "data"
    shutil.copytree(SAMPLE, data / "widget")
    assert main.main([*TINY, "--data_dir", str(data), "--output_dir", str(root / "out")]) == 0
    return data, root / "out"


@pytest.mark.parametrize("damage, message", [
    ("arch", "trained with --arch resnet18, not resnet34"),
    ("size", "trained with --image_size 64, not 96"),
    ("truncate", "unreadable or truncated checkpoint"),
    ("foreign", "not an RD4AD-Paddle checkpoint"),
])
def test_bad_checkpoints_are_refused_before_any_work(trained_class, tmp_path, capsys, damage, message):
    data, out = trained_class
    work = tmp_path / "out"
    shutil.copytree(out, work)
    ckpt = work / "widget" / "model.pdparams"
    args = ["--data_dir", str(data), "--output_dir", str(work), "--mode", "eval"]
    if damage == "arch":
        args += ["--arch", "resnet34"]
    elif damage == "size":
        args += ["--image_size", "96"]
    elif damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    else:
        import paddle
        paddle.save({"weights": paddle.ones([2])}, str(ckpt))
    before = json.load(open(work / "results.json"))
    expect_error(capsys, f"{ckpt}: {message}", *args)
    assert json.load(open(work / "results.json")) == before  # nothing overwritten
