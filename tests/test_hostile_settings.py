"""What a hostile or careless user does to settings taken from a run: each is one line and
exit 2 naming what is wrong, or handled, never a traceback or a wrong model."""
import os

import numpy as np
import pytest
from PIL import Image

import export_model
import main
from engine.config import Config, parse_config
from utils.config import ConfigError
from test_settings import TINY, make_data, one_error_line


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = make_data(root)
    out = root / "out"
    assert main.main([*TINY, "--data_dir", str(data), "--output_dir", str(out)]) == 0
    return data, out


def test_a_config_file_in_eval_next_to_the_runs_config(trained, tmp_path, capsys):
    """--config naming data_dir while the run's config.yaml names it too: no clash."""
    data, out = trained
    config = tmp_path / "eval.yaml"
    config.write_text(f"data_dir: {data}\noutput_dir: {out}\nno_report: true\n")
    assert main.main(["--config", str(config), "--mode", "eval"]) == 0, capsys.readouterr().err[-2000:]
    # and the settings eval saved read back, with the checkpoint's arch and size
    saved = parse_config(["--config", str(out / "config_eval.yaml")])
    assert (saved.arch, saved.image_size, saved.teacher_weights) == ("resnet18", 64, "none")


def test_a_chosen_data_folder_takes_none_of_the_runs_folders(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("train_dir: photos/train\ntest_dir: photos/line\ncls: photos\n")
    cfg = parse_config(["--mode", "infer", "--output_dir", str(out), "--data_dir", "sample_data", "--cls", "bottle"])
    assert (cfg.data_dir, cfg.train_dir, cfg.test_dir, cfg.cls) == ("sample_data", "", "", "bottle")
    cfg = parse_config(["--mode", "infer", "--output_dir", str(out)])
    assert (cfg.train_dir, cfg.test_dir, cfg.cls) == ("photos/train", "photos/line", "photos")
    assert cfg.inherited == str(out / "config.yaml")


@pytest.mark.parametrize("text, message", [
    ("cls: ../../etc\n", "a class name must be one folder name"),
    ("colour: red\n", "unknown setting"),
    ("data_dir: [\n", "not valid YAML"),
])
def test_a_damaged_run_config_names_the_file(tmp_path, text, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(["--mode", "eval", "--output_dir", str(out)])
    assert str(out / "config.yaml") in str(err.value) and "fix or delete it" in str(err.value)
    # eval and --resume read every other setting from it: data settings given, still refused
    for flags in (["--mode", "eval", "--data_dir", "d", "--cls", "c"], ["--resume"]):
        with pytest.raises(ConfigError, match=message):
            parse_config([*flags, "--output_dir", str(out)])
    parse_config(["--output_dir", str(out)])  # a new training run does not read it


def test_an_empty_teacher_is_refused():
    with pytest.raises(ConfigError, match="--teacher_weights: must not be empty"):
        Config(teacher_weights=" ").check()


def test_a_teacher_flag_cannot_replace_the_checkpoints_own(trained, capsys):
    data, out = trained
    code = main.main(["--mode", "eval", "--output_dir", str(out), "--teacher_weights", "other.pdparams"])
    line = one_error_line(code, *capsys.readouterr())
    assert "carries its own random teacher" in line and "other.pdparams" in line
    code = export_model.main(["--output_dir", str(out), "--teacher_weights", "other.pdparams",
                              "--save_dir", str(out / "never")])
    assert "carries its own random teacher" in one_error_line(code, *capsys.readouterr())
    assert not (out / "never").exists()
    # the same value as the checkpoint's is no contradiction
    assert main.main(["--mode", "eval", "--output_dir", str(out), "--teacher_weights", "none", "--no_report"]) == 0


def test_eval_of_a_folder_without_a_run_says_so(tmp_path, capsys):
    code = main.main(["--mode", "eval", "--output_dir", str(tmp_path / "nowhere")])
    line = one_error_line(code, *capsys.readouterr())
    assert "no training run here" in line and "sample_bottle.yaml" in line
    assert not (tmp_path / "nowhere").exists()


def test_file_names_with_control_characters_are_safe_outputs(tmp_path):
    from report.per_image import ImageItem, ImageWriter
    from utils.names import output_names

    names = output_names(["line\nbreak.png", "tab\there.png", "bell\x07.png"])
    assert all(n.isprintable() and "/" not in n for n in names)
    writer = ImageWriter(str(tmp_path), None)
    rgb = np.zeros((64, 64, 3), np.uint8)
    writer.add(ImageItem("dir/line\nbreak.png", names[0]), rgb, np.random.rand(64, 64).astype(np.float32),
               0.5, 0.0, 1.0)
    writer.finish()
    assert Image.open(tmp_path / f"{names[0]}.png").size[0] > 64


def test_re_export_removes_the_earlier_exports_onnx(trained, tmp_path):
    data, out = trained
    save_dir = tmp_path / "model"
    save_dir.mkdir()
    for name in ("model.onnx", "model_int8.onnx", "notes.txt"):
        (save_dir / name).write_bytes(b"an earlier export")
    assert export_model.main(["--output_dir", str(out), "--save_dir", str(save_dir)]) == 0
    assert sorted(os.listdir(save_dir)) == ["deploy.json", "model.json", "model.pdiparams", "notes.txt"]


def test_clearing_never_follows_a_masks_link(tmp_path):
    from report.per_image import ImageWriter
    from test_settings import write_scores

    folder, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"not ours")
    os.symlink(elsewhere, folder / "masks")
    write_scores(folder / "scores.csv", ["keep"])
    ImageWriter(str(folder), None).clear_previous()
    assert (elsewhere / "keep.png").read_bytes() == b"not ours"



def test_a_class_named_twice_runs_once(tmp_path):
    from dataset import resolve_classes

    data = make_data(tmp_path)
    assert resolve_classes(str(data), "widget, widget,widget") == ["widget"]
