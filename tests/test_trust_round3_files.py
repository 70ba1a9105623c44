"""Issue 22, sections 4 and 5: what a file says is never a path, only regular files are
read, and only the allow-listed image formats are decoded.

4. A class (or any name) read from a checkpoint, deploy.json or a YAML config goes
   through utils/names.py's check before it can name a folder.
5. A FIFO, socket, device, folder or link loop named like an image (or given as a
   checkpoint, config, weights file) is refused with its reason, never blocks the run;
   a PostScript file named x.png never reaches Ghostscript, at any entry point (a fake
   `gs` on PATH writes a marker: the marker must never appear)."""
import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import types

import numpy as np
import paddle
import pytest
from PIL import EpsImagePlugin, Image

import export_model
import infer
import main
from conftest import ROOT
from dataset import DataError, decode_upload, load_rgb
from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model import build_rd4ad
from utils.files import NotARegularFile, open_regular
from utils.images import IMAGE_FORMATS

SIZE = 64
SAMPLE = os.path.join(ROOT, "sample_data", "bottle")
GOOD = os.path.join(SAMPLE, "test", "good")
TINY = ["--arch", "resnet18", "--image_size", str(SIZE), "--teacher_weights", "none", "--batch_size", "1",
        "--epochs", "1", "--eval_interval", "0", "--log_interval", "0", "--no_report", "--val_ratio", "0.2"]
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n(pwned) print\nshowpage\n%%EOF\n"
CALIBRATION = {"image_threshold": 1.0, "pixel_threshold": 1.0, "image_low": 0.8, "pixel_low": 0.2,
               "quantile": 0.995, "count": 20, "source": "validation"}


@contextlib.contextmanager
def deadline(seconds):
    """A call that blocks (on a FIFO) fails the test instead of hanging the suite."""
    def expired(*_):
        raise TimeoutError(f"blocked for {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def one_error(capsys, code, expected_code, *names):
    captured = capsys.readouterr()
    lines = [line for line in re.split(r"[\r\n]", captured.err) if line.strip()]
    assert code == expected_code, (captured.out + captured.err)[-2000:]
    assert lines and lines[-1].startswith("error: "), captured.err[-2000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, captured.err[-2000:]
    assert "Traceback" not in captured.out + captured.err
    for name in names:
        assert name in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture
def fake_gs(tmp_path, monkeypatch):
    """A `gs` first on PATH that writes a marker file. Checked first: Pillow left to itself
    runs it on an EPS named .png (so a test that sees no marker shows the allow-list)."""
    bin_dir, marker = tmp_path / "fakebin", tmp_path / "gs_ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho ran >> '{marker}'\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None, raising=False)  # Pillow caches its search
    control = tmp_path / "control.png"
    control.write_bytes(EPS)
    with pytest.raises(Exception):
        with Image.open(control) as img:  # unrestricted: the control
            img.load()
    assert marker.exists(), "the fake gs is not reached: the test below would prove nothing"
    marker.unlink()
    control.unlink()
    return marker


def good_image(path, value=90):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(path)
    return str(path)


def rows_of(folder):
    with open(os.path.join(folder, "scores.csv"), encoding="utf-8") as f:
        return list(csv.DictReader(f))


def special_files(folder, monkeypatch):
    """A FIFO, a socket, a link to /dev/zero, a link loop and a folder, each named like an
    image, in `folder`; {name: what its row's reason must say}."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "fifo.png")
    monkeypatch.chdir(folder)  # a socket's path is limited to 108 bytes: bind the short name
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock.png")
    sock.close()
    os.symlink("/dev/zero", folder / "zero.png")
    os.symlink("loop.png", folder / "loop.png")
    (folder / "dir.png").mkdir()
    return {"fifo.png": "FIFO", "sock.png": "socket", "zero.png": "character device",
            "loop.png": "link loop", "dir.png": "a folder"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("round3")
    paddle.seed(3)
    ckpt = str(root / "bottle" / "model.pdparams")
    save_checkpoint(ckpt, build_rd4ad("resnet18", teacher_weights="none"), arch="resnet18", image_size=SIZE,
                    epoch=1, cls="bottle", teacher_weights="none", extra={"calibration": CALIBRATION})
    save_dir = str(root / "inference" / "bottle")
    assert export_model.main(["--checkpoint", ckpt, "--save_dir", save_dir]) == 0
    return ckpt, save_dir


def hostile_checkpoint(path, cls):
    net = build_rd4ad("resnet18", teacher_weights="none")
    save_checkpoint(str(path), net, arch="resnet18", image_size=SIZE, epoch=1, cls=cls, teacher_weights="none")
    return str(path)


# ================================================== 4. names read from files are never paths

HOSTILE_NAMES = [("../../escaped", "path separator"), ("..", "not a name"), (".", "not a name"),
                 ("a/../../b", "path separator"), ("back\\slash", "path separator"), ("", "empty"),
                 (" x", "space"), ("line\nbreak", "control characters"), (".hidden", "hidden"),
                 ("results.json", "the run's own outputs")]


@pytest.mark.parametrize("name, problem", HOSTILE_NAMES)
def test_a_checkpoint_whose_class_is_a_path_is_refused_on_loading(tmp_path, name, problem):
    path = hostile_checkpoint(tmp_path / "model.pdparams", name)
    with pytest.raises(CheckpointError, match=re.escape(problem)) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: damaged checkpoint: class") and "\n" not in str(err.value)


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_export_without_save_dir_never_writes_where_a_checkpoint_class_points(tmp_path, capsys, where):
    """The held-out case: export_model.py --checkpoint FILE, no --save_dir: the folder
    would be OUTPUT_DIR/inference/CLASS with CLASS from the file."""
    target = tmp_path / "escaped"  # exists, with a file of its own: nothing may be added to it
    target.mkdir()
    (target / "own.txt").write_text("kept")
    out = tmp_path / "run" / "output"
    cls = "../../../escaped" if where == "relative" else str(target)
    assert os.path.realpath(os.path.join(out, "inference", cls)) == str(target)  # where it would go
    ckpt = hostile_checkpoint(tmp_path / "model.pdparams", cls)
    code = export_model.main(["--checkpoint", ckpt, "--output_dir", str(out)])
    one_error(capsys, code, 2, ckpt, "damaged checkpoint: class", "path separator")
    assert sorted(os.listdir(target)) == ["own.txt"] and not out.exists()


def test_a_deploy_json_whose_class_is_a_path_is_refused(exported, tmp_path, capsys):
    hostile = tmp_path / "model"
    shutil.copytree(exported[1], hostile)
    meta = json.loads((hostile / "deploy.json").read_text())
    meta["class"] = "../../escaped"
    (hostile / "deploy.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    code = infer.main(["--model_dir", str(hostile), "--image", good_image(tmp_path / "a.png"),
                       "--output_dir", str(out)])
    one_error(capsys, code, 2, str(hostile / "deploy.json"), "'class'", "path separator")
    assert not out.exists()


def test_a_config_file_whose_class_is_a_path_is_refused(tmp_path, capsys):
    config = tmp_path / "hostile.yaml"
    config.write_text("cls: bottle,../../escaped\n")
    code = main.main([*TINY, "--config", str(config), "--output_dir", str(tmp_path / "out")])
    one_error(capsys, code, 2, str(config), "path separator")
    assert not (tmp_path / "out").exists()


def test_a_saved_run_config_whose_class_is_a_path_is_refused_by_the_export(tmp_path, capsys):
    """export_model.py without --cls takes the class from OUTPUT_DIR/config.yaml."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(f"cls: {tmp_path / 'escaped'}\n")
    code = export_model.main(["--output_dir", str(out)])
    one_error(capsys, code, 2, str(out / "config.yaml"), "path separator")
    assert not (tmp_path / "escaped").exists() and sorted(os.listdir(out)) == ["config.yaml"]


# ================================================== 5a. only regular files are read

def test_open_regular_refuses_every_other_kind_without_blocking(tmp_path, monkeypatch):
    expected = special_files(tmp_path / "f", monkeypatch)
    with deadline(20):
        for name, says in expected.items():
            with pytest.raises(NotARegularFile, match=says):
                open_regular(str(tmp_path / "f" / name))
    with open_regular(good_image(tmp_path / "ok.png")) as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_infer_folder_of_fifos_sockets_devices_and_loops_gets_a_row_each(exported, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "images"
    expected = special_files(folder, monkeypatch)
    good_image(folder / "dir.png" / "inside.png", 30)  # a folder named like an image is still searched
    good_image(folder / "real.png")
    out = tmp_path / "out"
    with deadline(300):
        code = infer.main(["--model_dir", exported[1], "--image", str(folder), "--output_dir", str(out),
                           "--cpu_threads", "1"])
    assert code == 1, capsys.readouterr().err[-2000:]
    rows = {os.path.relpath(r["image"], str(folder)): r for r in rows_of(out)}
    for name, says in expected.items():
        assert says in rows[name]["error"] and not rows[name]["verdict"], rows[name]
    for name in ("real.png", os.path.join("dir.png", "inside.png")):
        assert not rows[name]["error"] and rows[name]["verdict"] in ("OK", "DEFECT"), rows[name]


def test_infer_of_a_single_fifo_is_a_row_not_a_hang(exported, tmp_path, capsys):
    fifo = tmp_path / "cam.png"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    with deadline(300):
        code = infer.main(["--model_dir", exported[1], "--image", str(fifo), "--output_dir", str(out)])
    assert code == 1
    (row,) = rows_of(out)
    assert "not a regular file (a FIFO (named pipe))" in row["error"] and not row["verdict"], row


def test_checkpoint_config_weights_and_deploy_json_that_are_fifos_are_one_line(exported, tmp_path, capsys):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    with deadline(120):
        one_error(capsys, main.main([*TINY, "--config", fifo]), 2, fifo, "FIFO")
        one_error(capsys, export_model.main(["--checkpoint", fifo, "--save_dir", str(tmp_path / "e")]), 2,
                  fifo, "FIFO")
        data = tmp_path / "data"
        shutil.copytree(SAMPLE, data / "bottle")
        one_error(capsys, main.main([*TINY, "--teacher_weights", fifo, "--data_dir", str(data),
                                     "--output_dir", str(tmp_path / "o")]), 2, fifo, "FIFO")
        model = tmp_path / "model"
        shutil.copytree(exported[1], model)
        os.remove(model / "deploy.json")
        os.mkfifo(model / "deploy.json")
        one_error(capsys, infer.main(["--model_dir", str(model), "--image", GOOD]), 2, "deploy.json", "FIFO")
        shutil.copy(os.path.join(exported[1], "deploy.json"), tmp_path / "deploy.json")
        os.remove(model / "deploy.json")
        shutil.copy(tmp_path / "deploy.json", model / "deploy.json")
        os.remove(model / "model.pdiparams")
        os.mkfifo(model / "model.pdiparams")
        one_error(capsys, infer.main(["--model_dir", str(model), "--image", GOOD]), 2, "model.pdiparams", "FIFO")


def test_a_fifo_planted_as_the_lock_or_a_torch_file_is_one_line(tmp_path, capsys):
    from tools import convert_torch_checkpoint
    from utils.lock import LOCK_NAME, OutputLock

    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / LOCK_NAME)
    with deadline(60):
        with pytest.raises(Exception, match="lock file is not a regular file \\(a FIFO"):
            OutputLock(str(out)).acquire()
        assert OutputLock(str(out))._record() == {}  # reading the owner of a FIFO: nothing, at once
        fifo = str(tmp_path / "weights.pth")
        os.mkfifo(fifo)
        code = convert_torch_checkpoint.main(["--arch", "resnet18", "--backbone", fifo,
                                              "--out", str(tmp_path / "c.pdparams")])
    one_error(capsys, code, 2, fifo, "FIFO")


# ================================================== 5b. only the allow-listed decoders

@pytest.mark.parametrize("fmt, ext, mode", [("PNG", "png", "RGB"), ("JPEG", "jpg", "RGB"), ("BMP", "bmp", "RGB"),
                                            ("TIFF", "tif", "I;16"), ("PPM", "ppm", "RGB"), ("PPM", "pgm", "L")])
def test_every_allowed_format_decodes(tmp_path, fmt, ext, mode):
    assert fmt in IMAGE_FORMATS
    values = np.full((20, 30), 200, np.uint8)
    img = Image.fromarray(np.stack([values] * 3, -1)) if mode == "RGB" else Image.fromarray(values, "L")
    if mode == "I;16":
        img = Image.fromarray(values.astype(np.uint16) * 257)  # 16-bit grayscale, as cameras write it
    img.save(tmp_path / f"x.{ext}", format=fmt)
    rgb = load_rgb(str(tmp_path / f"x.{ext}"), SIZE)
    assert rgb.shape == (SIZE, SIZE, 3) and abs(int(rgb.mean()) - 200) <= 2


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "EPS", "ICO"])
def test_formats_outside_the_allow_list_are_refused_by_name(tmp_path, fmt):
    path = tmp_path / "x.png"  # whatever the name says
    if fmt == "EPS":
        path.write_bytes(EPS)
    else:
        Image.new("RGB", (16, 16), (9, 9, 9)).save(path, format=fmt)
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot read image (not an image of PNG, JPEG")):
        load_rgb(str(path), SIZE)
    with pytest.raises(DataError, match="not an image of PNG, JPEG"):
        decode_upload(path.read_bytes(), "upload.png", SIZE, 10 ** 8)


def test_no_postscript_runs_in_infer_or_the_service(exported, tmp_path, fake_gs, capsys):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.png").write_bytes(EPS)
    good_image(folder / "real.png")
    out = tmp_path / "out"
    assert infer.main(["--model_dir", exported[1], "--image", str(folder), "--output_dir", str(out)]) == 1
    rows = {os.path.basename(r["image"]): r for r in rows_of(out)}
    assert "not an image of PNG" in rows["x.png"]["error"] and not rows["x.png"]["verdict"]
    assert rows["real.png"]["verdict"] in ("OK", "DEFECT")
    assert infer.main(["--model_dir", exported[1], "--image", str(folder / "sub" / "x.png"),
                       "--output_dir", str(tmp_path / "single")]) == 1
    # the service's upload path: Inspector.decode, answered 422
    from deploy.service import Inspector, ServiceError
    inspector = types.SimpleNamespace(deployment=types.SimpleNamespace(image_size=SIZE),
                                      service=types.SimpleNamespace(max_pixels=10 ** 8))
    with pytest.raises(ServiceError) as err:
        Inspector.decode(inspector, EPS, "x.png")
    assert err.value.status == 422 and "not an image of PNG" in err.value.message
    # infer.py as a command, in its own process (Pillow's Ghostscript search not cached)
    proc = subprocess.run([sys.executable, "infer.py", "--model_dir", exported[1], "--image", str(folder),
                           "--output_dir", str(tmp_path / "cli")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "pwned" not in proc.stdout + proc.stderr
    assert not fake_gs.exists()


def test_no_postscript_runs_in_export_check_dir(exported, tmp_path, fake_gs, capsys):
    check = tmp_path / "check"
    check.mkdir()
    for k, name in enumerate(sorted(os.listdir(GOOD))[:3]):
        shutil.copy(os.path.join(GOOD, name), check / f"{k}.png")
    (check / "zz.png").write_bytes(EPS)
    code = export_model.main(["--checkpoint", exported[0], "--save_dir", str(tmp_path / "e"),
                              "--check_dir", str(check), "--check_images", "4"])
    one_error(capsys, code, 2, str(check / "zz.png"), "not an image of PNG")
    assert not fake_gs.exists()


def test_no_postscript_runs_and_no_fifo_blocks_in_train_eval_and_infer(tmp_path, fake_gs, capsys):
    """main.py in each mode over an MVTec folder holding a PostScript file and a FIFO named
    like images, in train/good and test/good: each is a warning (training, evaluation) or
    a row (inference) naming the reason, and the others go on."""
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data / "widget")
    for sub in ("train/good", "test/good"):
        (data / "widget" / sub / "zz_eps.png").write_bytes(EPS)
        os.mkfifo(data / "widget" / sub / "zz_fifo.png")
    out = str(tmp_path / "out")
    common = ["--data_dir", str(data), "--cls", "widget", "--output_dir", out]
    with deadline(600):
        code = main.main([*TINY, *common])
        train_err = "".join(capsys.readouterr())  # warnings go through tqdm.write
        assert code in (0, 1) and os.path.isfile(os.path.join(out, "widget", "model.pdparams")), train_err[-2000:]
        for sub in ("train", "test"):
            assert re.search(rf"warning: \S*{sub}/good/zz_eps.png: cannot read image \(not an image of PNG", train_err)
            assert re.search(rf"warning: \S*{sub}/good/zz_fifo.png: cannot read image \(not a regular file \(a FIFO",
                             train_err)
        assert main.main([*TINY, *common, "--mode", "eval"]) == 1
        eval_err = "".join(capsys.readouterr())
        assert "zz_eps.png: cannot read image (not an image of PNG" in eval_err, eval_err[-2000:]
        assert "zz_fifo.png: cannot read image (not a regular file (a FIFO" in eval_err
        assert main.main([*TINY, *common, "--mode", "infer"]) == 1
    rows = {os.path.basename(r["image"]): r for r in rows_of(os.path.join(out, "widget", "infer"))}
    assert "not an image of PNG" in rows["zz_eps.png"]["error"] and not rows["zz_eps.png"]["verdict"]
    assert "FIFO" in rows["zz_fifo.png"]["error"] and not rows["zz_fifo.png"]["verdict"]
    assert sum(bool(r["verdict"]) for r in rows.values()) == len(rows) - 2
    assert not fake_gs.exists()


# ================================================== one allow-list, used everywhere

def test_no_image_is_opened_outside_the_one_helper():
    """Every decoding site in the production code goes through utils/images.open_image:
    no other Image.open (nor PIL.Image.open, nor an alias of it) exists."""
    offenders = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "test_tipc", "__pycache__")]
        for name in names:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or os.path.relpath(path, ROOT) == os.path.join("utils", "images.py"):
                continue
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if re.search(r"\bImage\s*\.\s*open\b|\bopen\s+as\s+\w+|from\s+PIL\.Image\s+import\s+[^\n]*\bopen\b", text):
                offenders.append(os.path.relpath(path, ROOT))
    assert offenders == [], f"images opened without the allow-list in: {offenders}"
    with open(os.path.join(ROOT, "utils", "images.py"), encoding="utf-8") as f:
        assert "Image.open(f, formats=IMAGE_FORMATS)" in f.read()
