"""RD4AD in PaddlePaddle: train, evaluate and visualise Reverse Distillation on MVTec AD.

    python main.py                                   # train + evaluate every class
    python main.py --mode eval                       # evaluate saved checkpoints
    python main.py --mode infer --cls bottle         # heatmaps beside the ground truth

Data flow: images -> dataset -> teacher features -> bottleneck -> student features ->
anomaly map -> scores / metrics -> report.
"""
from __future__ import annotations

import os

import utils.runtime  # noqa: F401  (first: quiet paddle import, every CPU core)

import csv  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402
from paddle.io import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset import (DataError, DataSource, MVTecDataset, Sample, denormalize,  # noqa: E402
                     index_test_dir, index_train_dir, load_checked, resolve_sources,
                     split_validation)
from model import RD4AD, build_rd4ad  # noqa: E402
from model.arch import STEM_CHANNELS, STEM_STRIDE, get_arch  # noqa: E402
from model.inference import StaticGraphRunner  # noqa: E402
from model.trained import load_trained  # noqa: E402
from model.teacher import Teacher, imagenet_weights_path, load_teacher_weights  # noqa: E402
from utils.checkpoint import (atomic_write,  # noqa: E402
                              atomic_write_json, atomic_write_text, load_checkpoint,
                              save_checkpoint)
from utils import distributed  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.config import Config, ConfigError, config_yaml, parse_config  # noqa: E402
from utils.decision import Calibration, CalibrationError, calibrate  # noqa: E402
from utils.errors import PartialFailure  # noqa: E402
from utils.lock import OutputLock  # noqa: E402
from utils.names import check_class_name, is_within, output_names  # noqa: E402
from utils.feature_cache import EpochBatchSampler, TeacherFeatureCache  # noqa: E402
from utils.evaluate import (METRIC_NAMES, MetricsError, Predictions, compute_metrics,  # noqa: E402
                            good_score_statistics, predict)
from model.loss import cosine_distillation_loss  # noqa: E402
from utils.optim import build_optimizer  # noqa: E402
from utils.html_report import write_class_report, write_summary_report  # noqa: E402
from utils.report import mean_row, results_table  # noqa: E402
from utils.tracking import ScalarLogger  # noqa: E402
from utils.train_state import (finished_metrics, load_train_state, mark_finished,  # noqa: E402
                               restore_train_state, save_train_state, state_path)
from utils.visualize import binary_mask_image, side_by_side  # noqa: E402

class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite: that class stops, the others go on."""


class ClassFailed(RuntimeError):
    """Some of a class's images or results could not be trusted (unreadable, non-finite):
    everything else is written, the class is reported failed, the others go on."""

    def __init__(self, message: str, metrics: dict | None = None) -> None:
        super().__init__(message)
        self.metrics = metrics


def log(msg: str) -> None:
    tqdm.write(msg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def set_device(cfg: Config, ctx: distributed.Context) -> str:
    device = cfg.device
    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if device == "auto":
        device = "gpu" if has_gpu else "cpu"
    elif device == "gpu" and not paddle.device.is_compiled_with_cuda():
        raise ConfigError("--device gpu: this Paddle build has no CUDA (pip install paddlepaddle-gpu)")
    if cfg.amp and device != "gpu":
        raise ConfigError("--amp: automatic mixed precision (float16) needs a GPU; on CPU train in float32")
    # Under paddle.distributed.launch each rank takes the GPU the launcher assigned to it.
    paddle.set_device(f"gpu:{paddle.distributed.ParallelEnv().device_id}" if device == "gpu" and ctx.parallel
                      else device)
    return device


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


def check_before_work(cfg: Config, sources: list[DataSource]) -> None:
    """What can be checked for every class before the first one starts: a writable
    output folder, training images and batch size, checkpoints to evaluate."""
    check_writable(cfg.output_dir)
    for source in sources:
        check_class_name(source.name, "class")
        check_outputs_apart(cfg, source)
    if cfg.mode == "train":
        weights = cfg.teacher_weights
        if weights.lower() == "imagenet":
            weights = imagenet_weights_path(cfg.arch)  # cached, or downloaded now: fails before any work
        if weights.lower() != "none":  # read and checked now (never running code), not after hours
            load_teacher_weights(Teacher(cfg.arch), weights)
    test_sizes = [0]
    for source in sources:
        test_sizes.append(len(index_test_dir(source.test_dir, source.gt_dir)))  # a defect image without its mask
        if cfg.mode == "train":
            if cfg.force or finished_metrics(cfg, source.name) is None:
                train, _ = split_validation(index_train_dir(source.train_dir), cfg.val_ratio)
                check_batch_size(cfg, source, len(train))
                first_readable(train, cfg.image_size, source)
                if cfg.resume:
                    load_train_state(cfg, source.name)  # a damaged or foreign state: one line now
        else:
            load_checkpoint(cfg.checkpoint_path(source.name, best=cfg.select_best_on_test),
                            arch=cfg.arch, image_size=cfg.image_size)
    check_memory(cfg, max(test_sizes))


def check_outputs_apart(cfg: Config, source: DataSource) -> None:
    """Nothing is written inside a folder the run reads: the next run would take its own
    pictures for training or test images."""
    for folder, what in ((source.train_dir, "training"), (source.test_dir, "test"), (source.gt_dir, "mask")):
        if folder and os.path.isdir(folder):
            for written in (cfg.output_dir, cfg.class_dir(source.name)):
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


def check_memory(cfg: Config, test_images: int) -> None:
    """Refuse an --image_size / --batch_size that surely cannot fit this machine's memory:
    a lower bound (the stem output, teacher and student features of one batch, plus the
    test set's maps and masks), far below what the run really needs. Only on CPU, where
    the kernel would kill the process instead of raising MemoryError."""
    if cfg.device == "gpu" or paddle.device.is_compiled_with_cuda() and cfg.device == "auto":
        return
    available = _available_memory()
    if available is None:
        return
    pixels = float(cfg.image_size) ** 2
    stem = STEM_CHANNELS / STEM_STRIDE ** 2
    per_image = pixels * (stem + 2 * get_arch(cfg.arch).floats_per_pixel()) * 4
    batch = cfg.batch_size if cfg.mode == "train" else min(cfg.batch_size, 8)
    needed = batch * per_image + test_images * pixels * 5  # float32 map + uint8 mask per test image
    if needed > available:
        raise ConfigError(f"--image_size {cfg.image_size} with --batch_size {cfg.batch_size}: needs at "
                          f"least {needed / 2**30:.1f} GiB of memory, {available / 2**30:.1f} GiB are "
                          f"available; use a smaller --image_size or --batch_size")


def _available_memory() -> float | None:
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


def make_loader(dataset: MVTecDataset, cfg: Config, batch_size: int) -> DataLoader:
    """In file order (training shuffles through EpochBatchSampler instead)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                      num_workers=cfg.num_workers)


def predict_samples(net: RD4AD, samples: list[Sample], cfg: Config, desc: str,
                    ctx: distributed.Context = distributed.Context(), progress: bool = True,
                    dataset: MVTecDataset | None = None) -> Predictions:
    """Maps and scores of `samples` (sharded over ranks and gathered when data-parallel)."""
    if ctx.parallel:
        dataset = MVTecDataset(ctx.shard(samples), cfg.image_size)
    elif dataset is None:
        dataset = MVTecDataset(samples, cfg.image_size)
    # Building the predictor costs seconds; it pays back from a few dozen images on a CPU.
    # Not in train mode: once a Paddle Inference predictor has run, eager training in the
    # same process ran ~1.7x slower on CPU (measured: resnet50 RD4AD, 1.28 -> 0.73 img/s).
    static = cfg.eval_backend == "static" or (
        cfg.eval_backend == "auto" and cfg.mode != "train" and paddle.get_device() == "cpu"
        and len(dataset) >= 32)
    runner = StaticGraphRunner(net, os.cpu_count() or 1) if static else None
    batch_size = min(cfg.batch_size, 8)
    try:
        while True:
            try:
                pred = predict(net, make_loader(dataset, cfg, batch_size), len(dataset), cfg.image_size,
                               desc=desc, progress=progress and ctx.is_main, runner=runner)
                break
            except (MemoryError, RuntimeError) as err:
                if not _out_of_memory(err) or batch_size == 1:
                    raise
                batch_size //= 2
                warn(f"{desc}: out of memory ({str(err).splitlines()[0][:120]}); "
                     f"evaluating again with batch size {batch_size}")
                if paddle.device.is_compiled_with_cuda():
                    paddle.device.cuda.empty_cache()
    finally:
        if runner is not None:
            runner.close()
    if ctx.parallel:
        full = distributed.gather_shards(ctx, len(samples), {
            "maps": pred.maps, "scores": pred.scores, "masks": pred.masks, "labels": pred.labels})
        pred = Predictions(full["maps"], full["scores"], full["masks"], full["labels"])
    pred.mask_known = np.array([s.has_mask for s in samples], dtype=bool)
    return pred


def _out_of_memory(err: BaseException) -> bool:
    # Paddle raises MemoryError for its RESOURCE_EXHAUSTED errors (GPU or host).
    return isinstance(err, MemoryError) or "out of memory" in str(err).lower()


def _metric_line(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if math.isfinite(v) else f"{k} n/a"
                     for k, v in metrics.items() if isinstance(v, float))


def _names(samples: list[Sample]) -> list[str]:
    return [s.image_path for s in samples]


class TrainData:
    """One class's images, listed and decoded once: training, validation (calibration)
    and test samples. Unreadable files are skipped with a warning naming them."""

    def __init__(self, source: DataSource, cfg: Config, ctx: distributed.Context) -> None:
        train, val = split_validation(index_train_dir(source.train_dir), cfg.val_ratio)
        test = index_test_dir(source.test_dir, source.gt_dir)
        self.train_set, bad_train, _ = load_checked(train, cfg.image_size, ctx.is_main, f"read {source.name} train")
        self.val_set, bad_val, _ = load_checked(val, cfg.image_size)
        self.test_set, bad_test, mask_warnings = load_checked(test, cfg.image_size, ctx.is_main,
                                                              f"read {source.name} test")
        for sample, reason in bad_train + bad_val:
            warn(f"{reason}: skipped (training continues without it)")
        for sample, reason in bad_test:
            warn(f"{reason}: skipped (not in the metrics)")
        for message in mask_warnings:
            warn(message)
        self.train, self.val, self.test = self.train_set.samples, self.val_set.samples, self.test_set.samples
        if not self.train:
            raise DataError(f"{source.train_dir}: no readable training images")
        self.val_note = ("" if self.val else
                         "no validation image held out: thresholds from training images (optimistic)")
        self.pixel_note = pixel_note(self.test, source)


def warn(message: str) -> None:
    log(f"warning: {message}")


def pixel_note(samples: list[Sample], source: DataSource) -> str:
    if any(s.label == 1 and s.mask_path is None for s in samples):
        return (f"{source.gt_dir or 'ground_truth'}: no masks, pixel metrics skipped "
                f"(image metrics still computed)")
    return ""


def train_class(cfg: Config, source: DataSource, ctx: distributed.Context) -> dict:
    """Train one class (or resume it, or skip it when finished); calibrate thresholds on
    validation-good images; evaluate on the test set; save checkpoint, metrics, report."""
    cls = source.name
    if not cfg.force:
        done = finished_metrics(cfg, cls)
        if done is not None:
            log(f"[{cls}] already finished with these settings: skipped (--force retrains)")
            return done
    if ctx.is_main:
        remove_stale_temporaries(cfg.class_dir(cls))
    seed_everything(cfg.seed)
    data = TrainData(source, cfg, ctx)
    check_batch_size(cfg, source, len(data.train), "readable ")
    train_set = data.train_set  # decoded once (TrainData), read every epoch
    net = build_rd4ad(cfg.arch, cfg.teacher_weights, cfg.image_size)
    params = net.trainable_parameters()
    optimizer = build_optimizer(params, cfg.lr, cfg.beta1, cfg.beta2)
    branch = net.student_branch()  # bottleneck + student: what the optimizer trains
    if ctx.parallel:
        branch = paddle.DataParallel(branch)
    scaler = paddle.amp.GradScaler(init_loss_scaling=2.0 ** 15) if cfg.amp else None
    # One seeded batch order for every path (cache or not, one rank or many, resumed or not).
    sampler = EpochBatchSampler(len(data.train), cfg.batch_size, cfg.seed)

    first_epoch, loss_history, best = 1, [], {"score": -1.0, "epoch": 0, "metrics": None}
    if cfg.resume:
        state = load_train_state(cfg, cls)
        if state is None:
            log(f"[{cls}] --resume: no training state yet, starting at epoch 1")
        else:
            epoch, loss_history, extra = restore_train_state(state, net, optimizer, params, sampler.rng)
            best = extra.get("best", best)
            first_epoch = epoch + 1
            log(f"[{cls}] resumed after epoch {epoch} from {state_path(cfg, cls)}")
    elif os.path.isfile(state_path(cfg, cls)):
        log(f"[{cls}] starting again at epoch 1 ({state_path(cfg, cls)} exists: --resume continues it)")

    log(f"[{cls}] {len(data.train)} train / {len(data.val)} validation / {len(data.test)} test images, "
        f"arch {cfg.arch}, {cfg.image_size}px, {cfg.epochs} epochs, batch {cfg.batch_size}"
        + (f", {ctx.world_size} ranks" if ctx.parallel else ""))
    for note in (data.val_note, data.pixel_note):
        if note:
            log(f"[{cls}] note: {note}")

    cache, batches = None, sampler
    if first_epoch <= cfg.epochs:
        if cfg.feature_cache:
            cache = TeacherFeatureCache.build(
                net.teacher, make_loader(train_set, cfg, cfg.batch_size), len(data.train),
                cfg.feature_cache_mb, cfg.class_dir(cls), desc=f"teacher features {cls}",
                dtype=cfg.feature_cache_dtype)
            log(f"[{cls}] teacher features cached: {cache.nbytes / 2**20:.0f} MB {cfg.feature_cache_dtype} "
                f"({'memory-mapped file' if cache.on_disk else 'in memory'})")
        else:
            batches = DataLoader(train_set, batch_sampler=ShardedBatches(sampler, ctx),
                                 num_workers=cfg.num_workers)

    run = TrainingRun(cfg, cls, ctx, net, branch, optimizer, scaler,
                      ScalarLogger(os.path.join(cfg.output_dir, "visualdl", cls)
                                   if cfg.visualdl and ctx.is_main else None),
                      step=sum(len(e) for e in loss_history))
    epochs = tqdm(range(first_epoch, cfg.epochs + 1), desc=f"train {cls}", dynamic_ncols=True,
                  initial=first_epoch - 1, total=cfg.epochs, disable=not ctx.is_main)
    try:
        for epoch in epochs:
            losses = run.epoch(epoch, batches, cache)
            epochs.set_postfix(loss=f"{np.mean(losses):.4f}")
            loss_history.append(losses)
            last_epoch = epoch == cfg.epochs
            if cfg.eval_interval and epoch % cfg.eval_interval == 0 and not last_epoch:
                best = run.evaluate(epoch, data, best)
            if epoch % cfg.save_interval == 0 or last_epoch:
                check_finite_weights(net, cls)  # before saving: the last good state stays
            if (epoch % cfg.save_interval == 0 or last_epoch) and ctx.is_main:
                save_train_state(cfg, cls, epoch=epoch, net=net, optimizer=optimizer, params=params,
                                 sampler_rng=sampler.rng, loss_history=loss_history, extra={"best": best})
    finally:
        epochs.close()
        if cache is not None:
            cache.close()  # also on a diverged class: no spill files left behind
    return finish_class(cfg, source, ctx, net, data, best, loss_history, run.tracker)


@dataclass
class TrainingRun:
    """One class's training as it goes: the model, what updates it, and the step count."""
    cfg: Config
    cls: str
    ctx: distributed.Context
    net: RD4AD
    branch: paddle.nn.Layer      # bottleneck + student (DataParallel when data-parallel)
    optimizer: paddle.optimizer.Optimizer
    scaler: paddle.amp.GradScaler | None
    tracker: ScalarLogger
    step: int = 0

    def epoch(self, epoch: int, batches, cache: TeacherFeatureCache | None) -> list[float]:
        """One pass over the batches; the loss of each step."""
        cfg, cls, ctx = self.cfg, self.cls, self.ctx
        self.net.train()
        losses, seen, reader_cost, t_start = [], 0, 0.0, time.perf_counter()
        t_read = time.perf_counter()
        for batch in batches:
            if cache is not None:
                teacher_feats = cache.batch(ctx.shard_batch(batch))
                reader_cost += time.perf_counter() - t_read
            else:
                reader_cost += time.perf_counter() - t_read
                teacher_feats = self.net.teacher_features(batch[0])
            try:
                loss = train_step(self.branch, self.optimizer, teacher_feats, self.scaler)
            except TrainingDiverged as err:
                saved = state_path(cfg, cls)
                raise TrainingDiverged(
                    f"[{cls}] {err} at epoch {epoch} step {self.step + 1}: class stopped; "
                    + (f"last good training state kept: {saved}" if os.path.isfile(saved)
                       else "no training state was saved before it")
                    + " (try a lower --lr)") from None
            losses.append(loss)
            seen += teacher_feats[0].shape[0] * ctx.world_size
            self.step += 1
            self.tracker.add_scalar("train/loss", loss, self.step)
            if cfg.log_interval and self.step % cfg.log_interval == 0 and ctx.is_main:
                elapsed = time.perf_counter() - t_start
                log(f"[{cls}] epoch {epoch} step {self.step} loss {loss:.5f} "
                    f"ips {seen / elapsed:.2f} img/s reader_cost {reader_cost / len(losses):.4f} s")
            t_read = time.perf_counter()
        return losses

    def evaluate(self, epoch: int, data: TrainData, best: dict) -> dict:
        """An intermediate checkpoint and test metrics (to watch; the reported model is the
        last epoch's); returns the best-on-test record (kept only with --select_best_on_test)."""
        cfg, cls, ctx, net = self.cfg, self.cls, self.ctx, self.net
        if ctx.is_main:
            save_checkpoint(cfg.checkpoint_path(cls), net, arch=cfg.arch, image_size=cfg.image_size,
                            epoch=epoch, cls=cls, teacher_weights=cfg.teacher_weights)
        if not data.test:
            return best
        distributed.sync_buffers(ctx, net.student_branch())
        pred = predict_samples(net, data.test, cfg, "eval", ctx, progress=False, dataset=data.test_set)
        metrics = compute_metrics(pred, names=_names(data.test))
        log(f"[{cls}] epoch {epoch}: {_metric_line(metrics)}")
        for name, value in metrics.items():
            self.tracker.add_scalar(f"test/{name}", value, epoch)
        if cfg.select_best_on_test and ctx.is_main:
            best = _keep_best(cfg, cls, net, epoch, metrics, best)
        return best


def remove_stale_temporaries(folder: str) -> None:
    """Temporary files of atomic writes and feature-cache spill files that a killed run
    left behind (never a finished file)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".") and (name.endswith(".tmp") or name.startswith(".feature_cache_")):
                os.remove(os.path.join(folder, name))


class ShardedBatches:
    """This rank's share of each global batch of an EpochBatchSampler (for a DataLoader)."""

    def __init__(self, sampler: EpochBatchSampler, ctx: distributed.Context) -> None:
        self.sampler, self.ctx = sampler, ctx

    def __iter__(self):
        for batch in self.sampler:
            yield self.ctx.shard_batch(batch)

    def __len__(self) -> int:
        return len(self.sampler)


def train_step(branch: paddle.nn.Layer, optimizer: paddle.optimizer.Optimizer,
               teacher_feats: list[paddle.Tensor], scaler: paddle.amp.GradScaler | None) -> float:
    """One optimizer step of bottleneck + student on a batch of teacher features."""
    if scaler is None:
        loss = cosine_distillation_loss(teacher_feats, branch(teacher_feats))
    else:  # float16 compute where Paddle's O1 lists allow it; the loss in float32
        with paddle.amp.auto_cast(level="O1", dtype="float16"):
            student_feats = branch(teacher_feats)
        loss = cosine_distillation_loss(teacher_feats, [f.astype("float32") for f in student_feats])
    value = float(loss)
    if not math.isfinite(value):  # before the update: the weights stay as they were
        optimizer.clear_grad()
        raise TrainingDiverged(f"loss became {value}")
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    optimizer.clear_grad()
    return value


def finish_class(cfg: Config, source: DataSource, ctx: distributed.Context, net: RD4AD,
                 data: TrainData, best: dict, loss_history: list,
                 tracker: ScalarLogger) -> dict:
    """Calibrate, save the final checkpoint, evaluate, write metrics and the report."""
    cls = source.name
    distributed.sync_buffers(ctx, net.student_branch())
    check_finite_weights(net, cls)
    # Thresholds and score statistics from validation-good images (training ones if none).
    calib_set = data.val_set if data.val else data.train_set
    calib_pred = predict_samples(net, calib_set.samples, cfg, f"calibrate {cls}", ctx, dataset=calib_set)
    calibration = calibrate(calib_pred.scores, calib_pred.maps, cfg.threshold_quantile,
                            "validation" if data.val else "training")
    stats = good_score_statistics(calib_pred)
    del calib_pred
    if ctx.is_main:
        save_checkpoint(cfg.checkpoint_path(cls), net, arch=cfg.arch, image_size=cfg.image_size,
                        epoch=cfg.epochs, cls=cls, teacher_weights=cfg.teacher_weights,
                        extra={"score_stats": stats, "calibration": calibration.to_dict()})
    log(f"[{cls}] thresholds from {calibration.count} {calibration.source} image(s) at the "
        f"{100 * calibration.quantile:g}% quantile: image {calibration.image_threshold:.5f}, "
        f"pixel {calibration.pixel_threshold:.5f}")
    metrics = {n: float("nan") for n in METRIC_NAMES}
    if data.test:
        pred = predict_samples(net, data.test, cfg, f"eval {cls}", ctx, dataset=data.test_set)
        metrics = compute_metrics(pred, calibration, names=_names(data.test), warn=warn)
        log(f"[{cls}] final (epoch {cfg.epochs}): {_metric_line(metrics)}")
        if cfg.report and ctx.is_main:
            report = write_class_report(cfg.output_dir, cls, pred, data.test, _image_reader(data.test_set), metrics,
                                        calibration, data.pixel_note)
            log(f"[{cls}] report: {report}")
        del pred
    else:
        log(f"[{cls}] no test images: training and calibration only, no metrics")
    for name, value in metrics.items():
        tracker.add_scalar(f"final/{name}", value, cfg.epochs)
    tracker.close()
    if cfg.select_best_on_test and data.test:
        if ctx.is_main:
            best = _keep_best(cfg, cls, net, cfg.epochs, metrics, best)
        log(f"[{cls}] best on test: epoch {best['epoch']}")
        metrics = dict(best["metrics"], selected_epoch=best["epoch"])
    if ctx.is_main:
        atomic_write_json(os.path.join(cfg.class_dir(cls), "metrics.json"), metrics)
        atomic_write_json(os.path.join(cfg.class_dir(cls), "train_log.json"),
                          {"loss_per_step": loss_history, "feature_cache": cfg.feature_cache})
        mark_finished(cfg, cls, metrics)
    distributed.barrier(ctx)
    return metrics


def check_finite_weights(net: RD4AD, cls: str) -> None:
    """A finite loss does not guarantee finite weights (an update can overflow): checked
    once after training, so a broken model is never calibrated, saved or scored."""
    for name, value in net.student_branch().state_dict().items():
        if not np.isfinite(value.numpy()).all():
            raise TrainingDiverged(f"[{cls}] weights became non-finite ({name}): class stopped, not "
                                   f"calibrated nor marked finished (try a lower --lr)")


def _image_reader(dataset: MVTecDataset):
    return lambda i: denormalize(dataset[i][0])


def _keep_best(cfg: Config, cls: str, net: RD4AD, epoch: int, metrics: dict, best: dict) -> dict:
    score = np.nanmean([metrics[n] for n in ("pixel_auroc", "sample_auroc", "aupro_per_image")])
    if score > best["score"]:
        save_checkpoint(cfg.checkpoint_path(cls, best=True), net, arch=cfg.arch,
                        image_size=cfg.image_size, epoch=epoch, cls=cls,
                        teacher_weights=cfg.teacher_weights)
        return {"score": float(score), "epoch": epoch, "metrics": metrics}
    return best


def load_class_model(cfg: Config, cls: str) -> tuple[RD4AD, Calibration | None]:
    path = cfg.checkpoint_path(cls, best=cfg.select_best_on_test)
    net, state = load_trained(path, arch=cfg.arch, image_size=cfg.image_size, teacher_weights=cfg.teacher_weights)
    calibration = Calibration.from_dict(state["calibration"]) if "calibration" in state else None
    if calibration is None:
        log(f"[{cls}] note: {path} has no calibrated thresholds (trained by an older version): "
            f"no verdicts or F1")
    return net, calibration


def _test_samples(source: DataSource) -> list[Sample]:
    samples = index_test_dir(source.test_dir, source.gt_dir)
    if not samples:
        raise DataError(f"{source.test_dir or '--test_dir'}: no test images to evaluate")
    return samples


def _checked_test_set(cfg: Config, source: DataSource, ctx: distributed.Context,
                      ) -> tuple[MVTecDataset, list[tuple[Sample, str]]]:
    dataset, failed, mask_warnings = load_checked(_test_samples(source), cfg.image_size, ctx.is_main,
                                                  f"read {source.name} test")
    for message in mask_warnings:
        warn(message)
    return dataset, failed


def eval_class(cfg: Config, source: DataSource, ctx: distributed.Context) -> dict:
    dataset, failed = _checked_test_set(cfg, source, ctx)
    for _, reason in failed:
        warn(f"{reason}: skipped (not in the metrics)")
    samples = dataset.samples
    if not samples:
        raise DataError(f"{source.test_dir}: no readable test images")
    net, calibration = load_class_model(cfg, source.name)
    pred = predict_samples(net, samples, cfg, f"eval {source.name}", ctx, dataset=dataset)
    metrics = compute_metrics(pred, calibration, names=_names(samples), warn=warn)
    log(f"[{source.name}] {_metric_line(metrics)}")
    if cfg.report and ctx.is_main:
        log(f"[{source.name}] report: " + write_class_report(
            cfg.output_dir, source.name, pred, samples, _image_reader(dataset), metrics, calibration,
            pixel_note(samples, source)))
    if failed:  # the metrics stand for the readable images only: say so in the exit status
        raise ClassFailed(f"[{source.name}] {len(failed)} unreadable test image(s) left out of the metrics "
                          f"(first: {failed[0][0].image_path})", metrics)
    return metrics


def infer_class(cfg: Config, source: DataSource, ctx: distributed.Context) -> dict:
    """For every test image: heatmap beside the ground truth and the predicted mask, the
    binary mask as a PNG, and a row of scores.csv with the verdict. An image that could not
    be read, or whose score is not finite, gets no verdict: its row says why and the class
    is reported failed once everything else is written."""
    cls = source.name
    dataset, failed = _checked_test_set(cfg, source, ctx)
    samples = dataset.samples
    net, calibration = load_class_model(cfg, cls)
    pred = predict_samples(net, samples, cfg, f"infer {cls}", ctx, dataset=dataset) if samples else None
    finite = (np.isfinite(pred.scores) & np.isfinite(pred.maps).reshape(len(samples), -1).all(axis=1)
              if pred is not None else np.zeros(0, dtype=bool))
    metrics = {n: float("nan") for n in METRIC_NAMES}
    if pred is not None and finite.all():
        metrics = compute_metrics(pred, calibration, names=_names(samples), warn=warn)
    if not ctx.is_main:
        return metrics
    out_dir = os.path.join(cfg.class_dir(cls), "infer")
    if calibration is not None:
        vmin, vmax = calibration.heatmap_range()
    elif finite.any():
        vmin, vmax = float(pred.maps[finite].min()), float(pred.maps[finite].max())
    everything = samples + [sample for sample, _ in failed]
    names = output_names([os.path.relpath(s.image_path, source.test_dir) for s in everything],
                         [s.name for s in everything])
    rows, bad = [], []
    for i, sample in enumerate(tqdm(samples, desc=f"images {cls}", leave=False)):
        row = [_display_path(sample.image_path, cfg), sample.defect, sample.label, names[i]]
        if not finite[i]:  # never a verdict, mask or picture from a broken output
            reason = f"{sample.image_path}: model output is not finite ({pred.scores[i]}): no verdict"
            warn(reason)
            bad.append(sample)
            rows.append(row + ["", "", "", reason])
            continue
        image = denormalize(dataset[i][0])
        mask = pred.masks[i] if sample.has_mask else None
        predicted = calibration.masks(pred.maps[i]) if calibration is not None else None
        verdict = calibration.verdict(pred.scores[i]) if calibration else ""
        norm = float(calibration.normalize_scores(pred.scores[i])) if calibration else float("nan")
        caption = (f"{sample.defect}/{os.path.basename(sample.image_path)}  score {pred.scores[i]:.4f}"
                   + (f"  {norm:.2f} {verdict}" if calibration else ""))
        picture = side_by_side(image, mask, pred.maps[i], vmin, vmax, caption, predicted)
        atomic_write(os.path.join(out_dir, names[i] + ".png"),
                     lambda tmp, p=picture: p.save(tmp, format="PNG"))
        if predicted is not None:
            atomic_write(os.path.join(out_dir, "masks", names[i] + ".png"),
                         lambda tmp, m=predicted: binary_mask_image(m).save(tmp, format="PNG"))
        rows.append(row + [f"{pred.scores[i]:.6f}", "" if calibration is None else f"{norm:.4f}", verdict, ""])
    for k, (sample, reason) in enumerate(failed):  # unreadable: its row says why; the others went on
        warn(reason)
        bad.append(sample)
        rows.append([_display_path(sample.image_path, cfg), sample.defect, sample.label,
                     names[len(samples) + k], "", "", "", reason])
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "defect", "label", "output", "score", "normalized_score", "verdict", "error"])
    writer.writerows(rows)
    atomic_write_text(os.path.join(out_dir, "scores.csv"), buf.getvalue())
    defects = sum(r[6] == "DEFECT" for r in rows)
    scored = len(samples) - (len(bad) - len(failed))
    log(f"[{cls}] wrote {scored} heatmaps, masks and scores.csv to {out_dir}"
        + (f": {defects} DEFECT / {scored - defects} OK" if calibration else "")
        + (f", {len(bad)} without a verdict" if bad else ""))
    if bad:
        raise ClassFailed(f"[{cls}] {len(bad)} of {len(everything)} images got no verdict (unreadable or "
                          f"non-finite score; see {os.path.join(out_dir, 'scores.csv')})", metrics)
    return metrics


def _display_path(path: str, cfg: Config) -> str:
    base = cfg.data_dir if not cfg.train_dir else os.path.dirname(os.path.normpath(cfg.test_dir))
    rel = os.path.relpath(path, base)
    return path if rel.startswith("..") else rel


def write_results(cfg: Config, results: dict[str, dict]) -> str:
    selection = ("best test-set epoch (--select_best_on_test: selected ON THE TEST SET)"
                 if cfg.select_best_on_test else "last epoch")
    table = results_table(results)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    md = (f"# RD4AD results ({cfg.arch}, {cfg.image_size}px, {cfg.mode})\n\n"
          f"Command: `{command}`\n\nCheckpoint: {selection}. Values in percent; "
          f"AUPRO up to FPR 0.3 (per image: the reference's and paper's protocol; "
          f"set: MVTec AD's). F1, precision and recall at the thresholds calibrated on "
          f"validation-good images ({100 * cfg.threshold_quantile:g}% quantile).\n\n{table}\n")
    atomic_write_text(os.path.join(cfg.output_dir, "results.md"), md)
    atomic_write_json(os.path.join(cfg.output_dir, "results.json"), {
        "config": cfg.to_dict(), "checkpoint": "best_on_test" if cfg.select_best_on_test else "last",
        "classes": results, "mean": mean_row(results)})
    return table


def run(cfg: Config) -> dict[str, dict]:
    check_config(cfg)
    ctx = distributed.init()
    device = set_device(cfg, ctx)
    sources = resolve_sources(cfg.data_dir, cfg.cls, cfg.train_dir, cfg.test_dir)
    check_before_work(cfg, sources)
    # Every check passed: only now is anything created. Rank 0 holds the folder's lock.
    lock = OutputLock(cfg.output_dir)
    if ctx.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        lock.acquire()
    try:
        return run_classes(cfg, ctx, device, sources)
    finally:
        lock.release()


def run_classes(cfg: Config, ctx: distributed.Context, device: str, sources: list[DataSource]) -> dict[str, dict]:
    if ctx.is_main:
        # The settings actually used (flags over --config over defaults), readable by --config.
        name = "config.yaml" if cfg.mode == "train" else f"config_{cfg.mode}.yaml"
        atomic_write_text(os.path.join(cfg.output_dir, name), config_yaml(cfg))
    log(f"mode {cfg.mode}, device {device}, classes: {', '.join(s.name for s in sources)}")
    step = {"train": train_class, "eval": eval_class, "infer": infer_class}[cfg.mode]
    results, failed = {}, {}
    for source in sources:
        try:
            results[source.name] = dict(step(cfg, source, ctx))
        except (TrainingDiverged, ClassFailed, CalibrationError, MetricsError) as err:
            message = str(err) if str(err).startswith("[") else f"[{source.name}] {err}"
            log(f"error: {message}")
            failed[source.name] = message
            metrics = getattr(err, "metrics", None) or {n: float("nan") for n in METRIC_NAMES}
            results[source.name] = dict(metrics) | {"error": message}
        if cfg.mode != "infer" and ctx.is_main:
            write_results(cfg, results)  # after every class: nothing finished is lost
    if cfg.mode != "infer" and cfg.report and ctx.is_main:
        log(f"report: {write_summary_report(cfg.output_dir, results, cfg.to_dict())}")
    log("\n" + results_table(results))
    if failed:
        raise PartialFailure(f"{len(failed)} of {len(sources)} classes failed: {', '.join(failed)} "
                             f"(see the error lines above; the others finished)")
    return results


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        cfg = parse_config(argv)
        interrupted[0] = ("interrupted; run again with --resume to continue" if cfg.mode == "train"
                          else "interrupted")
        run(cfg)

    interrupted = ["interrupted"]
    return run_main(body, interrupted=lambda: interrupted[0])


if __name__ == "__main__":
    sys.exit(main())
