"""Training of one class: batches, teacher features (cached once), the optimizer step,
periodic checkpoints and training states, then calibration, the final evaluation and
the class's files."""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import paddle
from paddle.io import DataLoader
from tqdm import tqdm

from dataset import (GOOD_FOLDER, DataError, DataSource, Sample, index_test_dir, index_train_dir, load_checked,
                     mask_naming, split_validation)
from model.loss import cosine_distillation_loss
from model.rd4ad import RD4AD, build_rd4ad
from report.html import write_class_report
from utils import distributed
from utils.io import atomic_write_json
from utils.log import log, warn
from utils.tracking import ScalarLogger

from .checkpoint import save_checkpoint
from .config import Config
from .decision import calibrate
from .evaluate import (compute_metrics, good_score_statistics, image_reader, make_loader, metric_line,
                       no_metrics, predict_samples)
from .model_info import trained_model, training_record
from .feature_cache import EpochBatchSampler, TeacherFeatureCache
from .optim import build_optimizer
from .preflight import check_batch_size
from .train_state import (finished_metrics, load_train_state, mark_finished, restore_train_state,
                          save_train_state, state_path)


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite: that class stops, the others go on."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


class TrainData:
    """One class's images, listed and decoded once: training, validation (calibration)
    and test samples. Unreadable files are skipped with a warning naming them."""

    def __init__(self, source: DataSource, cfg: Config, ctx: distributed.Context) -> None:
        train, val = split_validation(index_train_dir(source.train_dir), cfg.val_ratio)
        test = index_test_dir(source.test_dir, source.gt_dir, source.layout)
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


def pixel_note(samples: list[Sample], source: DataSource) -> str:
    """Why pixel metrics are n/a, when defect images have no masks. The masks' folder is
    named only when it is the MVTec layout's own (plain folders never had one)."""
    if not any(s.label == 1 and s.mask_path is None for s in samples):
        return ""
    own_layout = source.gt_dir and source.train_dir == os.path.join(os.path.dirname(source.gt_dir), "train",
                                                                    GOOD_FOLDER[source.layout])
    where = (f" ({'MVTec' if source.layout == 'mvtec' else 'BTAD'} layout: {source.gt_dir}/"
             f"{mask_naming(source.layout)})" if own_layout else "")
    return f"no ground-truth masks{where}: pixel metrics n/a, image metrics still computed"


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
        remove_stale_temporaries(cfg.paths.class_dir(cls))
    seed_everything(cfg.seed)
    data = TrainData(source, cfg, ctx)
    check_batch_size(cfg, source, len(data.train), "readable ")
    train_set = data.train_set  # decoded once (TrainData), read every epoch
    net = build_rd4ad(cfg.arch, cfg.teacher_weights, cfg.image_size, cfg.conv_backend)
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
            if scaler is not None and extra.get("grad_scaler"):  # --amp: the loss scale it had reached
                scaler.load_state_dict({**extra["grad_scaler"], "scale": np.array(extra["grad_scaler"]["scale"],
                                                                                  dtype=np.float32)})
            best = extra.get("best", best)
            first_epoch = epoch + 1
            log(f"[{cls}] resumed after epoch {epoch} from {state_path(cfg, cls)}")
    elif os.path.isfile(state_path(cfg, cls)):
        log(f"[{cls}] starting again at epoch 1 ({state_path(cfg, cls)} exists: --resume continues it)")

    log(f"[{cls}] {len(data.train)} train / {len(data.val)} validation / {len(data.test)} test images, "
        f"arch {cfg.arch}, {cfg.image_size}px, {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"convolutions on {net.conv_backend}" + (f", {ctx.world_size} ranks" if ctx.parallel else ""))
    for note in (data.val_note, data.pixel_note):
        if note:
            log(f"[{cls}] note: {note}")

    cache, batches = None, sampler
    if first_epoch <= cfg.epochs:
        if cfg.feature_cache:
            cache = TeacherFeatureCache.build(
                net.teacher, make_loader(train_set, cfg, cfg.batch_size), len(data.train),
                # every rank on this machine caches every image: they share its memory budget
                cfg.feature_cache_mb / distributed.local_world_size(), cfg.paths.class_dir(cls),
                desc=f"teacher features {cls}",
                dtype=cfg.feature_cache_dtype)
            log(f"[{cls}] teacher features cached: {cache.nbytes / 2**20:.0f} MB {cfg.feature_cache_dtype} "
                f"({'memory-mapped file' if cache.on_disk else 'in memory'})")
        else:
            batches = DataLoader(train_set, batch_sampler=ShardedBatches(sampler, ctx),
                                 num_workers=cfg.num_workers)

    run = TrainingRun(cfg, cls, ctx, net, branch, optimizer, scaler,
                      ScalarLogger(cfg.paths.visualdl_dir(cls)
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
                                 sampler_rng=sampler.rng, loss_history=loss_history,
                                 extra={"best": best, "grad_scaler": scaler_state(scaler)})
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
                loss = train_step(self.branch, self.optimizer, teacher_feats, self.scaler, ctx=ctx)
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
            save_checkpoint(cfg.paths.checkpoint(cls), net, arch=cfg.arch, image_size=cfg.image_size,
                            epoch=epoch, cls=cls, teacher_weights=cfg.teacher_weights, extra=training_record(cfg))
        if not data.test:
            return best
        distributed.sync_buffers(ctx, net.student_branch())
        pred = predict_samples(net, data.test, cfg, "eval", ctx, progress=False, dataset=data.test_set)
        metrics = compute_metrics(pred, names=[s.image_path for s in data.test])
        log(f"[{cls}] epoch {epoch}: {metric_line(metrics)}")
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


def scaler_state(scaler: paddle.amp.GradScaler | None) -> dict:
    """The --amp loss scaler's state as JSON values ({} without --amp, or on a CPU, where
    Paddle disables the scaler)."""
    if scaler is None:
        return {}
    return {k: (v.reshape(-1).tolist() if isinstance(v, np.ndarray) else v) for k, v in scaler.state_dict().items()}


# Paddle's O1 lists keep conv2d_transpose (the student's upsampling) in float32; it is a
# convolution like the others, so it runs in float16 too.
AMP_WHITE_LIST = ["conv2d_transpose"]


def train_step(branch: paddle.nn.Layer, optimizer: paddle.optimizer.Optimizer,
               teacher_feats: list[paddle.Tensor], scaler: paddle.amp.GradScaler | None,
               ctx: distributed.Context = distributed.Context()) -> float:
    """One optimizer step of bottleneck + student on a batch of teacher features. Every
    rank agrees that the loss is finite before any rank updates: a rank that stopped alone
    would leave the others waiting in the gradient all-reduce."""
    if scaler is None:
        loss = cosine_distillation_loss(teacher_feats, branch(teacher_feats))
    else:  # float16 compute where Paddle's O1 lists allow it; the loss in float32
        with paddle.amp.auto_cast(level="O1", dtype="float16", custom_white_list=AMP_WHITE_LIST):
            student_feats = branch(teacher_feats)
        loss = cosine_distillation_loss(teacher_feats, [f.astype("float32") for f in student_feats])
    value = float(loss)
    if not distributed.all_true(ctx, math.isfinite(value)):  # before the update: weights stay as they were
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
        save_checkpoint(cfg.paths.checkpoint(cls), net, arch=cfg.arch, image_size=cfg.image_size,
                        epoch=cfg.epochs, cls=cls, teacher_weights=cfg.teacher_weights,
                        extra={"score_stats": stats, "calibration": calibration.to_dict(), **training_record(cfg)})
    log(f"[{cls}] thresholds from {calibration.count} {calibration.source} image(s) at the "
        f"{100 * calibration.quantile:g}% quantile: image {calibration.image_threshold:.5f}, "
        f"pixel {calibration.pixel_threshold:.5f}")
    metrics = no_metrics()
    if data.test:
        pred = predict_samples(net, data.test, cfg, f"eval {cls}", ctx, dataset=data.test_set)
        metrics = compute_metrics(pred, calibration, names=[s.image_path for s in data.test], warn=warn)
        log(f"[{cls}] final (epoch {cfg.epochs}): {metric_line(metrics)}")
        if cfg.report and ctx.is_main:
            report = write_class_report(cfg.paths.report_dir(cls), cls, pred, data.test,
                                        image_reader(data.test_set), metrics, calibration, data.pixel_note,
                                        trained_model(cfg, cfg.epochs))
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
        atomic_write_json(cfg.paths.metrics(cls), metrics)
        atomic_write_json(cfg.paths.train_log(cls),
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


def _keep_best(cfg: Config, cls: str, net: RD4AD, epoch: int, metrics: dict, best: dict) -> dict:
    score = np.nanmean([metrics[n] for n in ("pixel_auroc", "sample_auroc", "aupro_per_image")])
    if score > best["score"]:
        save_checkpoint(cfg.paths.checkpoint(cls, best=True), net, arch=cfg.arch,
                        image_size=cfg.image_size, epoch=epoch, cls=cls,
                        teacher_weights=cfg.teacher_weights, extra=training_record(cfg))
        return {"score": float(score), "epoch": epoch, "metrics": metrics}
    return best


