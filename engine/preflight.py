"""Pre-flight: everything that can be checked for every class before the first one starts
(settings, a writable output folder, class names, training images, checkpoints, memory),
so a mistake costs a second, not an hour of training."""
from __future__ import annotations

import importlib.util
import os
import tempfile

import paddle

from dataset import DataError, DataSource, Sample, index_test_dir, index_train_dir, load_checked, split_validation
from model.arch import STEM_CHANNELS, STEM_STRIDE, get_arch
from model.teacher import Teacher, load_teacher_weights
from utils.config import ConfigError
from utils.names import check_class_name, is_within

from .checkpoint import CheckpointError, load_checkpoint
from .config import MODEL_KEYS, Config, resume_command
from .train_state import finished_metrics, load_train_state


def check_config(cfg: Config) -> None:
    """Settings that cannot work, refused before any work starts."""
    cfg.check()
    if cfg.visualdl and importlib.util.find_spec("visualdl") is None:
        raise ConfigError("--visualdl needs VisualDL: pip install visualdl")


def check_batch_size(cfg: Config, source: DataSource, count: int, what: str = "") -> None:
    if cfg.batch_size > count:
        raise ConfigError(f"--batch_size {cfg.batch_size} is larger than the {count} {what}training "
                          f"images of {source.train_dir} (after holding out --val_ratio "
                          f"{cfg.val_ratio:g}); use --batch_size {count} or less")


def check_before_work(cfg: Config, sources: list[DataSource]) -> dict[str, dict]:
    """What can be checked for every class before the first one starts: a writable
    output folder, training images and batch size, checkpoints to evaluate. Returns, for
    --mode eval / infer, each class's model settings read from its checkpoint."""
    check_writable(cfg.output_dir)
    for source in sources:
        check_class_name(source.name, "class")
        check_outputs_apart(cfg, source)
    if cfg.mode == "train":
        if cfg.teacher_weights.lower() != "none":  # fetched, read and checked now, not after hours
            load_teacher_weights(Teacher(cfg.arch), cfg.teacher_weights)
    model_settings = {} if cfg.mode == "train" else checkpoint_settings(cfg, sources)
    test_sizes = [0]
    for source in sources:
        # a defect image without its mask: refused now
        test_sizes.append(len(index_test_dir(source.test_dir, source.gt_dir, source.layout)))
        if cfg.mode == "train" and (cfg.force or finished_metrics(cfg, source.name) is None):
            train, _ = split_validation(index_train_dir(source.train_dir), cfg.val_ratio)
            check_batch_size(cfg, source, len(train))
            first_readable(train, cfg.image_size, source)
            if cfg.resume:
                load_train_state(cfg, source.name)  # a damaged or foreign state: one line now
    sizes = [s["image_size"] for s in model_settings.values()] or [cfg.image_size]
    check_memory(cfg, max(test_sizes), max(sizes))
    return model_settings


def checkpoint_settings(cfg: Config, sources: list[DataSource]) -> dict[str, dict]:
    """{class: {arch, image_size, teacher_weights}} from each checkpoint (read and checked
    now); the teacher only where the user chose none. A setting the user chose that
    contradicts a checkpoint is one error listing every difference."""
    settings, conflicts = {}, []
    for source in sources:
        path = cfg.paths.checkpoint(source.name, best=cfg.select_best_on_test)
        if not os.path.isfile(path) and os.path.isfile(cfg.paths.train_state(source.name)):
            raise CheckpointError(f"{path}: not saved yet: the training of {source.name} is UNFINISHED (stopped "
                                  f"before its first model, saved every --eval_interval epochs and at the end); "
                                  f"continue with {resume_command(cfg)}")
        state = load_checkpoint(path)
        settings[source.name] = {k: state[k] for k in MODEL_KEYS}
        for key in MODEL_KEYS:
            if key in cfg.explicit and getattr(cfg, key) != state[key]:
                conflicts.append(f"{path}: trained with --{key} {state[key]}, not {getattr(cfg, key)}")
        if "teacher_weights" not in cfg.explicit:
            settings[source.name]["teacher_weights"] = state["teacher_weights"]
        elif "teacher" in state and cfg.teacher_weights != state["teacher_weights"]:
            conflicts.append(f"{path}: carries its own random teacher (trained with --teacher_weights "
                             f"{state['teacher_weights']}), which --teacher_weights {cfg.teacher_weights} "
                             f"cannot replace")
    if conflicts:
        raise ConfigError("; ".join(conflicts) + f" (--mode {cfg.mode} takes these from the checkpoint: "
                          f"leave the flags out)")
    return settings


def check_outputs_apart(cfg: Config, source: DataSource) -> None:
    """Nothing is written inside a folder the run reads: the next run would take its own
    pictures for training or test images."""
    for folder, what in ((source.train_dir, "training"), (source.test_dir, "test"), (source.gt_dir, "mask")):
        if folder and os.path.isdir(folder):
            for written in (cfg.output_dir, cfg.paths.class_dir(source.name)):
                if is_within(written, folder):
                    raise ConfigError(f"{written}: output folder inside the {what} folder {folder}: "
                                      f"the next run would read its own outputs; use another --output_dir")


def first_readable(samples: list[Sample], image_size: int, source: DataSource) -> None:
    """At least one training image decodes (usually the first): an all-unreadable training
    set is found before anything is written."""
    first_reason = "none listed"
    for sample in samples:
        _, failed, _ = load_checked([sample], image_size)
        if not failed:
            return
        first_reason = failed[0][1]
    raise DataError(f"{source.train_dir}: no readable training images (first: {first_reason})")


def check_memory(cfg: Config, test_images: int, image_size: int) -> None:
    """Refuse an image size / batch size that surely cannot fit this machine's memory:
    a lower bound (the stem output, teacher and student features of one batch, plus the
    test set's maps and masks), far below what the run really needs. Only on CPU, where
    the kernel would kill the process instead of raising MemoryError."""
    if cfg.device == "gpu" or paddle.device.is_compiled_with_cuda() and cfg.device == "auto":
        return
    available = available_memory()
    if available is None:
        return
    pixels = float(image_size) ** 2
    stem = STEM_CHANNELS / STEM_STRIDE ** 2
    per_image = pixels * (stem + 2 * get_arch(cfg.arch).floats_per_pixel()) * 4
    batch = cfg.batch_size if cfg.mode == "train" else min(cfg.batch_size, 8)
    needed = batch * per_image + test_images * pixels * 5  # float32 map + uint8 mask per test image
    if needed > available:
        raise ConfigError(f"--image_size {image_size} with --batch_size {cfg.batch_size}: needs at "
                          f"least {needed / 2**30:.1f} GiB of memory, {available / 2**30:.1f} GiB are "
                          f"available; use a smaller --image_size or --batch_size")


def available_memory() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_writable(folder: str) -> None:
    """The output folder, or the nearest existing folder it would be created in, takes
    files; nothing is created here."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    problem = None
    if not os.path.isdir(existing):
        problem = f"{existing} is a file"
    else:
        try:  # a real folder made and removed: os.access says yes to root even under /proc
            os.rmdir(tempfile.mkdtemp(prefix=".rd4ad-check-", dir=existing))
        except OSError as err:
            problem = err.strerror if existing == os.path.abspath(folder) else (
                f"cannot create folders in {existing}: {err.strerror}")
    if problem:
        raise ConfigError(f"{folder}: output directory is not writable ({problem})")
