"""The one config object of a run: every setting, its flag, its check; passed down.

Where a setting comes from, lowest first: its default; for --resume and --mode eval and
infer, the settings of the training run saved in OUTPUT_DIR/config.yaml (so
`main.py --resume --output_dir RUN` continues RUN as it was started); a --config YAML
file; the command line. The model's own settings (arch, image size, teacher) come from each
class's checkpoint in eval and infer (engine/preflight.py checks a contradicting flag).
"""
from __future__ import annotations

import dataclasses
import math
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model.choices import ARCH_NAMES, CONV_BACKENDS  # plain names: no Paddle before work starts
from model.registry import DEFAULT_MODEL, MODELS, all_options
from utils.config import (ConfigError, build_parser, checked_values, given_flags, read_yaml_mapping, setting,
                          settings_dict, settings_yaml)
from utils.errors import UserError, shorten
from utils.layouts import LAYOUTS
from utils.names import check_class_name
from utils.numbers import MAX_EPOCHS, as_float32, fits_float32, image_size_fits

from core.decision import MAX_THRESHOLD
from core.paths import RunPaths

DESCRIPTION = "RD4AD (Reverse Distillation) anomaly detection on MVTec AD, in PaddlePaddle."
EXAMPLES = """examples:
  python main.py --config configs/sample_bottle.yaml          # a first run on the bundled sample (about 30 s)
  python main.py --resume --output_dir output                 # continue an interrupted run as it was started"""
DATA, RUNS = "own data and decisions", "long runs and reports"
MODEL_OPTIONS = "options of one --model (model/registry.py)"
# --resume, --mode eval / infer take every setting of the training run's saved config.yaml
# but these (the command's own); the folders (and their layout) as one group: choosing one
# of them takes none.
RUN_OWN_KEYS = ("mode", "resume", "force", "output_dir", "config")
RUN_FOLDER_KEYS = ("data_dir", "train_dir", "test_dir", "layout")
# What each class's checkpoint decides in --mode eval / infer (with the model's options).
MODEL_KEYS = ("model", "arch", "image_size")


# DataLoader processes: each is a Python with its own copy of the dataset's state; beyond
# 64 they only contend for the cores (a machine with more cores still fits 64 readers)
MAX_NUM_WORKERS = 64
MAX_BATCH_SIZE = 4096  # images of one training step (RD4AD trains with 16)


@dataclass
class BaseConfig:
    mode: str = setting("train", "train, evaluate checkpoints, or write pictures and verdicts",
                        choices=("train", "eval", "infer"))
    model: str = setting(DEFAULT_MODEL, "the method (eval/infer: the checkpoint's)", choices=tuple(MODELS))
    data_dir: str = setting("mvtec", "MVTec AD (or BTAD) root DIR/CLASS/train/good (ok), test, ground_truth "
                                     "(--resume, eval/infer: the run's)")
    # auto: each class folder by its train/good (MVTec AD) or train/ok (BTAD); with
    # --train_dir, btad takes test/ok as good and BTAD's mask names
    layout: str = setting("auto", "folder layout: by train/good or train/ok, or chosen", choices=LAYOUTS)
    cls: str = setting("all", "class name, comma list, or 'all' (--resume, eval/infer: the run's)")
    arch: str = setting("wide_resnet50_2", "teacher backbone (eval/infer: the checkpoint's)",
                        choices=ARCH_NAMES)
    image_size: int = setting(256, "input size, a multiple of 32, at least 64 (eval/infer: the checkpoint's)")
    epochs: int = setting(200, "training epochs")
    class_epochs: str = setting("", "other epochs for some classes: CLASS=N,... (YAML: a mapping "
                                    "{CLASS: N}); the others take --epochs")
    batch_size: int = setting(16, f"training batch size, at most {MAX_BATCH_SIZE} (evaluation uses at most 8)")
    lr: float = setting(0.005, "Adam learning rate")
    beta1: float = setting(0.5, "Adam beta1")
    beta2: float = setting(0.999, "Adam beta2")
    eval_interval: int = setting(10, "evaluate every N epochs (0: only at the end)")
    select_best_on_test: bool = setting(False, "report the epoch best on the TEST set (the reference RD++'s "
                                               "choice; labelled so everywhere); default: the last epoch")
    output_dir: str = setting("output", "where checkpoints, results and reports go")
    teacher_weights: str = setting(
        "imagenet", "imagenet (official, cached); auto (imagenet when at hand, else random); a file; none")
    device: str = setting("auto", "auto: a GPU when Paddle has one", choices=("auto", "cpu", "gpu"))
    seed: int = setting(111, "random seed (batches, initialisation)", unsigned_32=True)
    num_workers: int = setting(0, f"DataLoader worker processes (0: load in the main process; at most "
                                  f"{MAX_NUM_WORKERS})")
    log_interval: int = setting(10, "a loss / ips / reader_cost line every N steps (0: never)")
    feature_cache: bool = setting(True, "run the teacher every step instead of caching its features once",
                                  off_flag="--no_feature_cache")
    feature_cache_mb: float = setting(8192.0, "a feature cache above this many MB goes to a memory-mapped file")
    feature_cache_dtype: str = setting("float16", "dtype of the cached teacher features",
                                       choices=("float16", "float32"))
    # auto: a predictor (static) in eval/infer on CPU for 32+ images; the dynamic graph while
    # training, where the predictor's build cost comes at every evaluation
    eval_backend: str = setting("auto", "evaluate with the dynamic graph or a predictor",
                                choices=("auto", "dygraph", "static"))
    # auto: oneDNN (model/onednn.py; a training step 1.17-1.35x faster) where Paddle carries it, on the CPU
    conv_backend: str = setting("auto", "convolutions of the dynamic graph on the CPU: oneDNN or Paddle's",
                                choices=CONV_BACKENDS)
    train_dir: str = setting("", "a folder of good training images (instead of --data_dir)", group=DATA)
    test_dir: str = setting("", "test images; subfolders good/ and DEFECT/ label them", group=DATA)
    val_ratio: float = setting(0.1, "share of good images held out to calibrate thresholds (0: train images)",
                               group=DATA)
    threshold_quantile: float = setting(0.995, "threshold = this quantile of held-out good scores", group=DATA)
    # as infer.py --threshold; nan (not given): each checkpoint's calibrated thresholds
    threshold: float = setting(math.nan, "--mode infer: raw-score threshold for verdicts and masks instead of "
                                         "the calibrated one (nan: calibrated)", group=DATA, nan_means_unset=True)
    config: str = setting("", "YAML file of flag values (flags given here override it)", group=RUNS)
    resume: bool = setting(False, "continue each class from its train_state.pdparams with the run's saved "
                                  "settings (training ones must match)", group=RUNS)
    force: bool = setting(False, "retrain classes that finished (otherwise skipped)", group=RUNS)
    save_interval: int = setting(5, "save the training state for --resume every N epochs", group=RUNS)
    report: bool = setting(True, "skip the HTML report after evaluation", group=RUNS, off_flag="--no_report")
    visualdl: bool = setting(False, "log to OUTPUT_DIR/visualdl (pip install visualdl)", group=RUNS)
    amp: bool = setting(False, "mixed precision (float16) training on GPU", group=RUNS)
    # the settings the user chose (command line or --config); the rest are defaults or the run's
    explicit: frozenset = setting(frozenset(), "", internal=True)
    # the training run's config.yaml that data settings came from ('' when none did)
    inherited: str = setting("", "", internal=True)

    def to_dict(self) -> dict:
        return settings_dict(self)

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.output_dir)

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
        for name in ("image_size", "epochs", "batch_size", "save_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)}: must be at least 1")
        # counts that spawn processes or size allocations: 2**31 - 1 workers hung the run
        for name, most in (("epochs", MAX_EPOCHS), ("num_workers", MAX_NUM_WORKERS), ("batch_size", MAX_BATCH_SIZE)):
            if getattr(self, name) > most:
                raise ConfigError(f"--{name} {getattr(self, name)}: must be at most {most}")
        for name in ("seed", "num_workers", "eval_interval", "log_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} {getattr(self, name)}: must be 0 or more")
        if self.seed >= 2 ** 32:
            raise ConfigError(f"--seed {self.seed}: must be below 2**32")
        if self.image_size < 64 or self.image_size % 32:
            raise ConfigError(f"--image_size {self.image_size}: must be a multiple of 32, at least 64")
        if not image_size_fits(self.image_size):
            raise ConfigError(f"--image_size {self.image_size}: too large (3 x size x size values must fit "
                              f"a 32-bit integer: at most 26752)")
        # the optimizer holds lr and the betas in float32: checked as float32 holds them
        if not (fits_float32(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr {self.lr}: must be a finite number above 0, within float32's range")
        for name in ("beta1", "beta2"):
            if not 0.0 <= as_float32(getattr(self, name)) < 1.0:
                raise ConfigError(f"--{name} {getattr(self, name)}: must lie in [0, 1) in float32 "
                                  f"({getattr(self, name)!r} is {as_float32(getattr(self, name))!r} there)")
        if not (math.isfinite(self.feature_cache_mb) and self.feature_cache_mb >= 0):
            raise ConfigError(f"--feature_cache_mb {self.feature_cache_mb}: must be a finite number >= 0")
        if not 0.0 <= self.val_ratio < 1.0:
            raise ConfigError(f"--val_ratio {self.val_ratio}: must lie in [0, 1)")
        if not 0.0 < self.threshold_quantile <= 1.0:
            raise ConfigError(f"--threshold_quantile {self.threshold_quantile}: must lie in (0, 1]")
        if not math.isnan(self.threshold):
            if self.mode != "infer":
                raise ConfigError(f"--threshold {self.threshold}: only for --mode infer (eval reports the "
                                  f"calibrated thresholds' metrics)")
            if not (math.isfinite(self.threshold) and abs(self.threshold) <= MAX_THRESHOLD):
                raise ConfigError(f"--threshold {self.threshold}: must be a finite number within "
                                  f"+-{MAX_THRESHOLD:g} (scores lie in [0, 6])")
        for name in ("output_dir", "data_dir", "teacher_weights"):
            if not getattr(self, name).strip():
                raise ConfigError(f"--{name}: must not be empty")
        self.class_names()
        self.epochs_per_class()
        model_options(self)

    def epochs_per_class(self) -> dict[str, int]:
        """--class_epochs as {class: epochs}, checked."""
        return parse_class_epochs(self.class_epochs, "--class_epochs")

    def epochs_for(self, cls: str) -> int:
        return self.epochs_per_class().get(cls, self.epochs)


def parse_class_epochs(text: str, where: str) -> dict[str, int]:
    """'carpet=10,leather=10' -> {'carpet': 10, 'leather': 10}; ConfigError (one line,
    naming `where`) for anything else."""
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not (value.isascii() and value.isdigit()) or len(value) > 7 or not 1 <= int(value) <= MAX_EPOCHS:
            raise ConfigError(f"{where}: {shorten(item)} is not CLASS=EPOCHS with EPOCHS a whole number "
                              f"from 1 to {MAX_EPOCHS}")
        if name in out:
            raise ConfigError(f"{where}: class {shorten(name)} given twice")
        try:
            out[check_class_name(name, where)] = int(value)
        except UserError as err:
            raise ConfigError(str(err)) from None
    return out


def model_options(cfg: "BaseConfig") -> dict[str, Any]:
    """The options of cfg.model, as keyword arguments of its class. An option of another
    method that the user set is refused (it would silently do nothing)."""
    own = MODELS[cfg.model].options
    for key in all_options():
        if key not in own and key in cfg.explicit:
            raise ConfigError(f"--{key}: not an option of --model {cfg.model} "
                              f"(it belongs to {', '.join(n for n, c in MODELS.items() if key in c.options)})")
    return {key: getattr(cfg, key) for key in own}


def _with_model_options(base: type) -> type:
    """The settings class: every method's options become settings (flags, YAML keys)."""
    taken = {f.name for f in dataclasses.fields(base)}
    extra = []
    for key, option in all_options().items():
        if key in taken:
            raise TypeError(f"model option {key!r} has the name of a setting")
        owners = ", ".join(name for name, cls in MODELS.items() if key in cls.options)
        extra.append((key, option.type, setting(option.default, f"{option.help} (--model {owners})",
                                                 choices=option.choices, group=MODEL_OPTIONS)))
    return dataclasses.make_dataclass("Config", extra, bases=(base,)) if extra else base


Config = _with_model_options(BaseConfig)


def build_config_parser():
    return build_parser(Config, DESCRIPTION, epilog=EXAMPLES)


def load_config_file(path: str) -> dict:
    """The settings of a --config YAML file (or a run's saved config.yaml), checked
    (ConfigError naming the file). Its class names are checked as --cls is: a name read
    from a file is never a path."""
    values = read_yaml_mapping(path)
    if isinstance(values.get("class_epochs"), dict):  # the YAML spelling: {CLASS: N}
        table = values["class_epochs"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in table.values()):
            raise ConfigError(f"{path}: class_epochs: each value must be a whole number of epochs")
        values = {**values, "class_epochs": ",".join(f"{k}={v}" for k, v in table.items())}
    values = checked_values(Config, values, path)
    if "cls" in values:
        try:
            Config(cls=values["cls"]).class_names()
        except UserError as err:
            raise ConfigError(f"{path}: {err}") from None
    if "class_epochs" in values:
        parse_class_epochs(values["class_epochs"], f"{path}: class_epochs")
    return values


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Defaults < the training run's saved settings (--resume, eval, infer) < --config < flags."""
    parser = build_config_parser()
    flags = given_flags(Config, argv)
    from_file = load_config_file(flags["config"]) if flags.get("config") else {}
    chosen = {**from_file, **flags}
    mode = chosen.get("mode", Config.mode)
    saved = RunPaths(chosen.get("output_dir", Config.output_dir)).config_yaml("train")
    continues = mode != "train" or bool(chosen.get("resume"))
    from_run = run_settings(saved, chosen, "--resume" if mode == "train" else f"--mode {mode}") if continues else {}
    parser.set_defaults(**{**from_run, **from_file})
    args = vars(parser.parse_args(argv))
    return Config(**args, explicit=frozenset(chosen), inherited=saved if from_run else "")


def run_settings(saved: str, chosen: dict, what: str) -> dict:
    """The settings of the training run (its saved config.yaml) that the user did not
    choose: all but the command's own (RUN_OWN_KEYS), the data folders as one group. The
    file is untrusted: checked as a --config file is (keys, types, choices) and as the
    command line's values are (Config.check: ranges, a class name that is a path)."""
    if not os.path.isfile(saved):
        return {}
    try:
        values = load_config_file(saved)
        Config(**values).check()  # every value as the command line's would be checked
    except UserError as err:  # a damaged file, or a class name that is a path
        named = str(err) if str(err).startswith(saved) else f"{saved}: {err}"
        raise ConfigError(f"{named} (the training run's saved settings, which {what} reads: "
                          f"fix or delete it)") from None
    folders_chosen = any(k in chosen for k in RUN_FOLDER_KEYS)
    return {k: v for k, v in values.items()
            if k not in chosen and k not in RUN_OWN_KEYS and not (folders_chosen and k in RUN_FOLDER_KEYS)}


def resume_command(cfg: Config) -> str:
    """The command that continues this run's training with the settings it was started with."""
    out = "" if cfg.output_dir == Config.output_dir else f" --output_dir {shlex.quote(cfg.output_dir)}"
    return f"python main.py --resume{out}"


def config_yaml(cfg: Config) -> str:
    """The config actually used, as YAML that --config reads back."""
    # no --threshold (nan) is left out: the file reads back to the default, and nan != nan
    return settings_yaml(cfg, leave_out=("config",) + (("threshold",) if math.isnan(cfg.threshold) else ()))
