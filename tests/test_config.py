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
