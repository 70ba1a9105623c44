"""One config: defaults < YAML file < command line; bad files give one clear error."""
import os

import pytest

from conftest import ROOT
from engine.config import config_yaml, parse_config
from utils.config import ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_sets_values_and_the_command_line_overrides(tmp_path):
    path = write(tmp_path, "arch: resnet18\nepochs: 7\nlr: 1\nno_feature_cache: true\n")
    cfg = parse_config(["--config", path, "--epochs", "9"])
    assert (cfg.arch, cfg.epochs, cfg.lr, cfg.feature_cache) == ("resnet18", 9, 1.0, False)
    assert cfg.image_size == 256  # untouched default


def test_saved_config_reads_back_to_the_same_config(tmp_path):
    cfg = parse_config(["--arch", "resnet34", "--val_ratio", "0.2", "--no_report"])
    again = parse_config(["--config", write(tmp_path, config_yaml(cfg))])
    assert {k: v for k, v in again.to_dict().items() if k != "config"} == \
        {k: v for k, v in cfg.to_dict().items() if k != "config"}


@pytest.mark.parametrize("text, message", [
    ("epoch: 3\n", "unknown setting 'epoch'"),
    ("epochs: three\n", "epochs must be int, got 'three'"),
    ("arch: vgg\n", "arch must be one of"),
    ("epochs: [1\n", "not valid YAML at line"),
    ("- 1\n- 2\n", "expected a mapping"),
])
def test_bad_config_files_name_the_file_and_the_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(["--config", path])
    assert str(err.value).startswith(path)


def test_shipped_configs_parse():
    for name in os.listdir(os.path.join(ROOT, "configs")):
        cfg = parse_config(["--config", os.path.join(ROOT, "configs", name)])
        assert cfg.image_size % 32 == 0


# ------------------------------------------------------------------ epochs per class

def test_class_epochs_from_yaml_mapping_or_flag(tmp_path):
    cfg = parse_config(["--config", write(tmp_path, "epochs: 200\nclass_epochs: {carpet: 10, leather: 12}\n")])
    assert (cfg.epochs_for("carpet"), cfg.epochs_for("leather"), cfg.epochs_for("bottle")) == (10, 12, 200)
    again = parse_config(["--config", write(tmp_path, config_yaml(cfg))])  # the saved form reads back
    assert again.epochs_per_class() == {"carpet": 10, "leather": 12}
    flag = parse_config(["--class_epochs", "carpet=3", "--epochs", "5"])
    assert (flag.epochs_for("carpet"), flag.epochs_for("grid")) == (3, 5)


@pytest.mark.parametrize("text, message", [
    ("class_epochs: {carpet: ten}\n", "c.yaml: class_epochs: each value must be a whole number of epochs"),
    ("class_epochs: {carpet: 0}\n", "c.yaml: class_epochs: 'carpet=0' is not CLASS=EPOCHS with EPOCHS a whole number from 1 to 1000000"),
    ("class_epochs: {../x: 3}\n", "c.yaml: class_epochs '../x': a class name must be one folder name"),
    ("class_epochs: carpet=1,carpet=2\n", "c.yaml: class_epochs: class 'carpet' given twice"),
])
def test_bad_class_epochs_are_one_line_naming_the_file(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", write(tmp_path, text)])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_class_epochs_flag_is_refused_before_work():
    cfg = parse_config(["--class_epochs", "carpet:3"])
    with pytest.raises(ConfigError, match=r"^--class_epochs: 'carpet:3' is not CLASS=EPOCHS"):
        cfg.check()


def test_model_choices_come_from_the_registry():
    from model.registry import MODELS

    assert parse_config([]).model == "rd4ad"
    assert parse_config(["--model", "rd4ad"]).model in MODELS
    with pytest.raises(SystemExit):
        parse_config(["--model", "no_such_method"])
