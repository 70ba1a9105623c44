"""One config object for every mode, built from the command line and passed down."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import asdict, dataclass

from .cli import OneLineArgumentParser
from .errors import UserError, shorten
from .names import check_class_name

MAX_CONFIG_BYTES = 1 << 20   # a config of flag values is a few hundred bytes
MAX_YAML_ALIASES = 20        # bounds what an alias bomb can expand to


class ConfigError(UserError):
    """A setting that cannot work (checked before any work starts)."""


@dataclass
class Config:
    mode: str = "train"
    data_dir: str = "mvtec"
    cls: str = "all"
    arch: str = "wide_resnet50_2"
    image_size: int = 256
    epochs: int = 200
    batch_size: int = 16
    lr: float = 0.005
    beta1: float = 0.5
    beta2: float = 0.999
    eval_interval: int = 10
    select_best_on_test: bool = False
    output_dir: str = "output"
    teacher_weights: str = "imagenet"
    device: str = "auto"
    seed: int = 111
    num_workers: int = 0
    log_interval: int = 10
    feature_cache: bool = True
    feature_cache_mb: float = 8192.0
    feature_cache_dtype: str = "float16"
    eval_backend: str = "auto"
    # own data and decisions
    train_dir: str = ""
    test_dir: str = ""
    val_ratio: float = 0.1
    threshold_quantile: float = 0.995
    # long runs and reports
    config: str = ""
    resume: bool = False
    force: bool = False
    save_interval: int = 5
    report: bool = True
    visualdl: bool = False
    amp: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def class_dir(self, cls: str) -> str:
        return os.path.join(self.output_dir, cls)

    def checkpoint_path(self, cls: str, best: bool = False) -> str:
        return os.path.join(self.class_dir(cls), "best.pdparams" if best else "model.pdparams")

    def class_names(self) -> list[str] | None:
        """The classes --cls asks for; None for 'all'. Each must be one folder name."""
        if self.cls.strip() in ("", "all"):
            return None
        names = [c.strip() for c in self.cls.split(",")]
        if not any(names):
            raise ConfigError(f"--cls {shorten(self.cls)}: names no class")
        return [check_class_name(c) for c in names if c]

    def check(self) -> None:
        """Settings that cannot work, refused before anything is read or written."""
        positive_ints = ("image_size", "epochs", "batch_size", "save_interval")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)}: must be at least 1")
        for name in ("seed", "num_workers", "eval_interval", "log_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} {getattr(self, name)}: must be 0 or more")
        if self.seed >= 2 ** 32:
            raise ConfigError(f"--seed {self.seed}: must be below 2**32")
        if self.image_size < 64 or self.image_size % 32:
            raise ConfigError(f"--image_size {self.image_size}: must be a multiple of 32, at least 64")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr {self.lr}: must be a finite number above 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} {getattr(self, name)}: must lie in [0, 1)")
        if not (math.isfinite(self.feature_cache_mb) and self.feature_cache_mb >= 0):
            raise ConfigError(f"--feature_cache_mb {self.feature_cache_mb}: must be a finite number >= 0")
        if not 0.0 <= self.val_ratio < 1.0:
            raise ConfigError(f"--val_ratio {self.val_ratio}: must lie in [0, 1)")
        if not 0.0 < self.threshold_quantile <= 1.0:
            raise ConfigError(f"--threshold_quantile {self.threshold_quantile}: must lie in (0, 1]")
        for name in ("output_dir", "data_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(f"--{name}: must not be empty")
        self.class_names()


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = OneLineArgumentParser(
        description="RD4AD (Reverse Distillation) anomaly detection on MVTec AD, in PaddlePaddle.")
    p.add_argument("--mode", choices=["train", "eval", "infer"], default=d.mode)
    p.add_argument("--data_dir", default=d.data_dir, help="root of the MVTec AD layout")
    p.add_argument("--cls", default=d.cls, help="class name, comma list, or 'all' (default)")
    p.add_argument("--arch", default=d.arch,
                   choices=["resnet18", "resnet34", "resnet50", "wide_resnet50_2"])
    p.add_argument("--image_size", type=int, default=d.image_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (betas 0.5, 0.999)")
    p.add_argument("--eval_interval", type=int, default=d.eval_interval,
                   help="evaluate every N epochs (0: only at the end)")
    p.add_argument("--select_best_on_test", action="store_true",
                   help="also keep and report the checkpoint with the best TEST score "
                        "(selects on the test set; off by default, as the paper reports the last)")
    p.add_argument("--output_dir", default=d.output_dir)
    p.add_argument("--teacher_weights", default=d.teacher_weights,
                   help="'imagenet' (Paddle's official weights, cached), a .pdparams path, "
                        "or 'none' (random teacher: smoke tests only)")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "gpu"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num_workers", type=int, default=d.num_workers,
                   help="DataLoader worker processes (0: load in the main process)")
    p.add_argument("--log_interval", type=int, default=d.log_interval,
                   help="print a loss/ips line every N training steps")
    p.add_argument("--no_feature_cache", dest="feature_cache", action="store_false",
                   help="run the frozen teacher every step instead of caching its features once")
    p.add_argument("--feature_cache_mb", type=float, default=d.feature_cache_mb,
                   help="teacher-feature cache above this size goes to a memory-mapped file")
    p.add_argument("--feature_cache_dtype", default=d.feature_cache_dtype, choices=["float16", "float32"])
    g = p.add_argument_group("own data and decisions")
    g.add_argument("--train_dir", default=d.train_dir,
                   help="a folder of good training images (instead of --data_dir's MVTec layout)")
    g.add_argument("--test_dir", default=d.test_dir,
                   help="test images: subfolders good/ and <defect>/ are labelled, loose images unlabelled")
    g.add_argument("--val_ratio", type=float, default=d.val_ratio,
                   help="share of train-good images held out (deterministically) to calibrate "
                        "thresholds; 0: calibrate on the training images")
    g.add_argument("--threshold_quantile", type=float, default=d.threshold_quantile,
                   help="image threshold = this quantile of validation-good scores")
    g = p.add_argument_group("long runs and reports")
    g.add_argument("--config", default=d.config,
                   help="YAML file of flag values; flags on the command line override it")
    g.add_argument("--resume", action="store_true",
                   help="continue each class from its last training state (OUTPUT_DIR/CLASS/train_state.pdparams)")
    g.add_argument("--force", action="store_true",
                   help="retrain classes that already finished (default: skip them)")
    g.add_argument("--save_interval", type=int, default=d.save_interval,
                   help="save the training state (for --resume) every N epochs")
    g.add_argument("--no_report", dest="report", action="store_false",
                   help="skip the HTML/PNG report after evaluation")
    g.add_argument("--visualdl", action="store_true",
                   help="log loss and metrics with VisualDL (pip install visualdl) to OUTPUT_DIR/visualdl")
    g.add_argument("--amp", action="store_true",
                   help="automatic mixed precision (float16) training on GPU")
    p.add_argument("--eval_backend", default=d.eval_backend, choices=["auto", "dygraph", "static"],
                   help="evaluate with the dynamic graph or a Paddle Inference predictor built "
                        "from the current weights (auto: static in --mode eval/infer on CPU for 32+ images; dygraph when training, "
                        "as a predictor slows later eager training in the same process)")
    return p


def load_yaml_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Flag values of a YAML file, checked against the flags' names, types and choices."""
    import yaml

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file larger than {MAX_CONFIG_BYTES >> 20} MB; expected a few flag: value lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        values = yaml.load(text, Loader=_bounded_loader(path)) or {}  # a SafeLoader: no code
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of flag: value")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    choices = {a.dest: a.choices for a in parser._actions if a.choices}
    out = {}
    for key, value in values.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name == "no_feature_cache":  # the flag's own spelling
            name, value = "feature_cache", not value
        if name == "no_report":
            name, value = "report", not value
        if name not in fields or name == "config":
            raise ConfigError(f"{path}: unknown setting {shorten(key)}")
        default = getattr(Config(), name)
        kind = type(default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: {str(key)[:80]} must be {kind.__name__}, got {shorten(value)}")
        if name in choices and value not in choices[name]:
            raise ConfigError(f"{path}: {key} must be one of {', '.join(map(str, choices[name]))}, "
                              f"got {shorten(value)}")
        out[name] = value
    return out


def _bounded_loader(path: str):
    """yaml.SafeLoader that refuses more than MAX_YAML_ALIASES aliases: an alias bomb (a
    few hundred bytes that expand to gigabytes) is refused before anything walks it."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise ConfigError(f"{path}: more than {MAX_YAML_ALIASES} YAML aliases "
                                      f"(refused: a config of flags needs none)")
            return super().compose_node(parent, index)

    return BoundedLoader


def parse_config(argv: list[str] | None = None) -> Config:
    """Defaults < YAML file (--config) < flags given on the command line."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_yaml_config(pre.config, parser))
    args = parser.parse_args(argv)
    return Config(**vars(args))


def config_yaml(cfg: Config) -> str:
    """The config actually used, as YAML that --config reads back."""
    import yaml

    values = {k: v for k, v in cfg.to_dict().items() if k != "config"}
    return yaml.safe_dump(values, sort_keys=False)
