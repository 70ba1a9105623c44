"""Training of one class: batches, the model's training inputs, teacher features (cached
once), its named loss terms, one optimizer per optimizer group (with gradient
accumulation), periodic checkpoints and training states, then calibration, the final
evaluation and the class's files. Nothing here knows a loss formula or a part name: the
model declares them (model/base.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import paddle
from paddle.io import DataLoader, Dataset
from tqdm import tqdm

from core.decision import calibrate
from core.results import ClassEvaluation, compute_metrics, good_score_statistics, metric_line, no_metrics
from dataset import (GOOD_FOLDER, DataError, DataSource, Sample, index_test_dir, index_train_dir, load_checked,
                     mask_naming, split_validation)
from model.base import AnomalyModel
from model.registry import build_model
from utils import distributed
from utils.config import ConfigError
from utils.io import atomic_write_json
from utils.log import log, warn
from utils.tracking import ScalarLogger

from .checkpoint import part_layers, save_checkpoint
from .config import Config, model_options
from .evaluate import RunnerFactory, image_reader, make_loader, predict_samples
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


def train_class(cfg: Config, source: DataSource, ctx: distributed.Context,
                make_runner: RunnerFactory | None = None) -> tuple[dict, ClassEvaluation | None]:
    """Train one class (or resume it, or skip it when finished); calibrate thresholds on
    validation-good images; evaluate on the test set; save checkpoint and metrics. Returns
    the metrics and, for the report (--report, rank 0, a test set), the final evaluation.
    `make_runner`: the compiled predictor --eval_backend may ask for (engine/evaluate.py)."""
    cls = source.name
    cfg = dataclasses.replace(cfg, epochs=cfg.epochs_for(cls))  # --class_epochs
    if not cfg.force:
        done = finished_metrics(cfg, cls)
        if done is not None:
            log(f"[{cls}] already finished with these settings: skipped (--force retrains)")
            return done, None
    if ctx.is_main:
        remove_stale_temporaries(cfg.paths.class_dir(cls))
    seed_everything(cfg.seed)
    data = TrainData(source, cfg, ctx)
    check_batch_size(cfg, source, len(data.train), "readable ")
    train_set = data.train_set  # decoded once (TrainData), read every epoch
    net = build_model(cfg.model, cfg.arch, cfg.image_size, cfg.teacher_weights, cfg.conv_backend,
                      **model_options(cfg))
    net.train()  # the teacher stays in eval mode (its features may be cached below)
    optimizers = build_optimizers(net, cfg)
    trainer = LossOf(net)  # the trained parts, computing the model's loss terms
    if ctx.parallel:
        trainer = paddle.DataParallel(trainer)
    scaler = paddle.amp.GradScaler(init_loss_scaling=2.0 ** 15) if cfg.amp else None
    # One seeded batch order for every path (cache or not, one rank or many, resumed or not).
    sampler = EpochBatchSampler(len(data.train), cfg.batch_size, cfg.seed)

    first_epoch, loss_history, best = 1, [], {"score": -1.0, "epoch": 0, "metrics": None}
    if cfg.resume:
        state = load_train_state(cfg, cls)
        if state is None:
            log(f"[{cls}] --resume: no training state yet, starting at epoch 1")
        else:
            epoch, loss_history, extra = restore_train_state(state, net, optimizers, cfg.lr, sampler.rng)
            if scaler is not None and extra.get("grad_scaler"):  # --amp: the loss scale it had reached
                scaler.load_state_dict({**extra["grad_scaler"], "scale": np.array(extra["grad_scaler"]["scale"],
                                                                                  dtype=np.float32)})
            best = extra.get("best", best)
            first_epoch = epoch + 1
            log(f"[{cls}] resumed after epoch {epoch} from {state_path(cfg, cls)}")
    elif os.path.isfile(state_path(cfg, cls)):
        log(f"[{cls}] starting again at epoch 1 ({state_path(cfg, cls)} exists: --resume continues it)")

    log(f"[{cls}] {len(data.train)} train / {len(data.val)} validation / {len(data.test)} test images, "
        f"model {cfg.model}, arch {cfg.arch}, {cfg.image_size}px, {cfg.epochs} epochs, batch {cfg.batch_size}"
        + (f" x {net.grad_accumulation} accumulated" if net.grad_accumulation > 1 else "")
        + f", convolutions on {net.conv_backend}" + (f", {ctx.world_size} ranks" if ctx.parallel else ""))
    for note in (data.val_note, data.pixel_note):
        if note:
            log(f"[{cls}] note: {note}")

    cache, batches = None, None
    if first_epoch <= cfg.epochs:
        if cfg.feature_cache:
            cache = TeacherFeatureCache.build(
                net.teacher_features, make_loader(train_set, cfg, cfg.batch_size), len(data.train),
                # every rank on this machine caches every image: they share its memory budget
                cfg.feature_cache_mb / distributed.local_world_size(), cfg.paths.class_dir(cls),
                desc=f"teacher features {cls}",
                dtype=cfg.feature_cache_dtype)
            log(f"[{cls}] teacher features cached: {cache.nbytes / 2**20:.0f} MB {cfg.feature_cache_dtype} "
                f"({'memory-mapped file' if cache.on_disk else 'in memory'})")
        batches = training_batches(train_set, sampler, ctx, cfg.num_workers,
                                   images=cache is None or net.needs_images_with_cache)

    run = TrainingRun(cfg, cls, ctx, net, trainer, optimizers, scaler,
                      ScalarLogger(cfg.paths.visualdl_dir(cls)
                                   if cfg.visualdl and ctx.is_main else None),
                      make_runner, step=sum(len(e) for e in loss_history))
    epochs = tqdm(range(first_epoch, cfg.epochs + 1), desc=f"train {cls}", dynamic_ncols=True,
                  initial=first_epoch - 1, total=cfg.epochs, disable=not ctx.is_main)
    try:
        for epoch in epochs:
            terms = run.epoch(epoch, batches, cache)
            epochs.set_postfix({name: f"{np.mean(values):.4f}" for name, values in terms.items()})
            loss_history.append(terms["loss"])
            last_epoch = epoch == cfg.epochs
            if cfg.eval_interval and epoch % cfg.eval_interval == 0 and not last_epoch:
                best = run.evaluate(epoch, data, best)
            if epoch % cfg.save_interval == 0 or last_epoch:
                check_finite_weights(net, cls)  # before saving: the last good state stays
            if (epoch % cfg.save_interval == 0 or last_epoch) and ctx.is_main:
                save_train_state(cfg, cls, epoch=epoch, net=net, optimizers=optimizers,
                                 sampler_rng=sampler.rng, loss_history=loss_history,
                                 extra={"best": best, "grad_scaler": scaler_state(scaler)})
    finally:
        epochs.close()
        if cache is not None:
            cache.close()  # also on a diverged class: no spill files left behind
    return finish_class(cfg, source, ctx, net, data, best, loss_history, run.tracker, make_runner)


def build_optimizers(net: AnomalyModel, cfg: Config) -> dict[str, paddle.optimizer.Optimizer]:
    """One Adam per optimizer group of the model, by group name, at the group's learning
    rate. --beta1 / --beta2, when given, replace every group's betas."""
    out = {}
    for group in net.optimizer_groups(cfg.lr):
        if group.name in out or not group.parameters:
            raise ValueError(f"model {net.name}: optimizer group {group.name!r} repeated or empty")
        beta1 = cfg.beta1 if "beta1" in cfg.explicit else group.betas[0]
        beta2 = cfg.beta2 if "beta2" in cfg.explicit else group.betas[1]
        out[group.name] = build_optimizer(group.parameters, group.lr, beta1, beta2)
    return out


class LossOf(paddle.nn.Layer):
    """The model's trained parts as one Layer whose forward is the model's loss_terms: what
    paddle.DataParallel wraps (its gradient all-reduce covers exactly these parameters)."""

    def __init__(self, net: AnomalyModel) -> None:
        super().__init__()
        self.parts = paddle.nn.LayerDict(part_layers(net))
        self.__dict__["net"] = net  # not a sublayer: the frozen teacher is not synchronised

    def forward(self, inputs: dict, teacher_feats: list[paddle.Tensor]) -> dict[str, paddle.Tensor]:
        return self.net.loss_terms(inputs, teacher_feats)


class _WithIndex(Dataset):
    """(image, index) of a training set: the images and their feature-cache rows."""

    def __init__(self, dataset: Dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def __getitem__(self, i: int):
        return self.dataset[i][0], np.int64(i)

    def __len__(self) -> int:
        return len(self.dataset)


def training_batches(train_set: Dataset, sampler: EpochBatchSampler, ctx: distributed.Context,
                     num_workers: int, images: bool):
    """This rank's batches as (images or None, indices): images only when something needs
    them (no feature cache, or a model whose loss reads its inputs)."""
    if not images:
        return _IndicesOnly(ShardedBatches(sampler, ctx))
    return DataLoader(_WithIndex(train_set), batch_sampler=ShardedBatches(sampler, ctx), num_workers=num_workers)


class _IndicesOnly:
    def __init__(self, batches: "ShardedBatches") -> None:
        self.batches = batches

    def __iter__(self):
        for indices in self.batches:
            yield None, indices

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class TrainingRun:
    """One class's training as it goes: the model, what updates it, and the step count."""
    cfg: Config
    cls: str
    ctx: distributed.Context
    net: AnomalyModel
    trainer: paddle.nn.Layer     # LossOf(net) (DataParallel when data-parallel)
    optimizers: dict[str, paddle.optimizer.Optimizer]
    scaler: paddle.amp.GradScaler | None
    tracker: ScalarLogger
    make_runner: RunnerFactory | None
    step: int = 0

    def epoch(self, epoch: int, batches, cache: TeacherFeatureCache | None) -> dict[str, list[float]]:
        """One pass over the batches; each loss term of each step. Every
        net.grad_accumulation backward passes (and at the epoch's end) the optimizers step."""
        cfg, cls, ctx, net = self.cfg, self.cls, self.ctx, self.net
        net.train()
        terms: dict[str, list[float]] = {}
        seen, reader_cost, t_start, pending = 0, 0.0, time.perf_counter(), 0
        t_read = time.perf_counter()
        for images, indices in batches:
            inputs = {} if images is None else net.train_inputs(images)
            if cache is not None and images is not None and inputs["images"] is not images:
                raise ConfigError(f"model {net.name}: train_inputs changed inputs['images'], whose teacher "
                                 f"features are cached; train with --no_feature_cache")
            if cache is not None:
                teacher_feats = cache.batch(indices if images is None else indices.numpy().tolist())
                reader_cost += time.perf_counter() - t_read
            else:
                reader_cost += time.perf_counter() - t_read
                teacher_feats = net.teacher_features(inputs["images"])
            pending += 1
            try:
                values = train_step(self.trainer, self.optimizers, inputs, teacher_feats, self.scaler, ctx=ctx,
                                    update=pending == net.grad_accumulation)
            except TrainingDiverged as err:
                saved = state_path(cfg, cls)
                raise TrainingDiverged(
                    f"[{cls}] {err} at epoch {epoch} step {self.step + 1}: class stopped; "
                    + (f"last good training state kept: {saved}" if os.path.isfile(saved)
                       else "no training state was saved before it")
                    + " (try a lower --lr)") from None
            pending %= net.grad_accumulation
            for name, value in values.items():
                terms.setdefault(name, []).append(value)
                self.tracker.add_scalar(f"train/{name}", value, self.step + 1)
            seen += teacher_feats[0].shape[0] * ctx.world_size
            self.step += 1
            if cfg.log_interval and self.step % cfg.log_interval == 0 and ctx.is_main:
                elapsed = time.perf_counter() - t_start
                log(f"[{cls}] epoch {epoch} step {self.step} "
                    + " ".join(f"{name} {value:.5f}" for name, value in values.items())
                    + f" ips {seen / elapsed:.2f} img/s reader_cost {reader_cost / len(terms['loss']):.4f} s")
            t_read = time.perf_counter()
        if pending:  # an unfinished accumulation: no gradient crosses an epoch (or a saved state)
            apply_update(self.optimizers, self.scaler)
        return terms

    def evaluate(self, epoch: int, data: TrainData, best: dict) -> dict:
        """An intermediate checkpoint and test metrics (to watch; the reported model is the
        last epoch's); returns the best-on-test record (kept only with --select_best_on_test)."""
        cfg, cls, ctx, net = self.cfg, self.cls, self.ctx, self.net
        if ctx.is_main:
            save_checkpoint(cfg.paths.checkpoint(cls), net, image_size=cfg.image_size,
                            epoch=epoch, cls=cls, teacher_weights=cfg.teacher_weights, extra=training_record(cfg))
        if not data.test:
            return best
        distributed.sync_buffers(ctx, LossOf(net))
        pred = predict_samples(net, data.test, cfg, "eval", ctx, progress=False, dataset=data.test_set,
                               make_runner=self.make_runner)
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


def train_step(trainer: paddle.nn.Layer, optimizers: dict[str, paddle.optimizer.Optimizer],
               inputs: dict[str, paddle.Tensor], teacher_feats: list[paddle.Tensor],
               scaler: paddle.amp.GradScaler | None, ctx: distributed.Context = distributed.Context(),
               update: bool = True) -> dict[str, float]:
    """One backward pass of the model's loss ("loss", not divided by the accumulation) and,
    when `update`, one step of every optimizer. Returns every loss term's value. Every
    rank agrees that the loss is finite before any rank updates: a rank that stopped alone
    would leave the others waiting in the gradient all-reduce."""
    # --amp: float16 compute where Paddle's O1 lists allow it; the model widens what its
    # loss needs (model/rd4ad.py computes the cosine loss in float32)
    cast = (paddle.amp.auto_cast(level="O1", dtype="float16", custom_white_list=AMP_WHITE_LIST)
            if scaler is not None else contextlib.nullcontext())
    with cast:
        terms = trainer(inputs, teacher_feats)
    loss = terms["loss"]
    values = {name: float(value) for name, value in terms.items()}
    if not distributed.all_true(ctx, math.isfinite(values["loss"])):  # before the update: weights stay
        for optimizer in optimizers.values():
            optimizer.clear_grad()
        raise TrainingDiverged(f"loss became {values['loss']}")
    (loss if scaler is None else scaler.scale(loss)).backward()
    if update:
        apply_update(optimizers, scaler)
    return values


def apply_update(optimizers: dict[str, paddle.optimizer.Optimizer], scaler: paddle.amp.GradScaler | None) -> None:
    """Every optimizer steps on the gradients accumulated so far, then they are cleared."""
    for optimizer in optimizers.values():
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
    if scaler is not None:
        scaler.update()
    for optimizer in optimizers.values():
        optimizer.clear_grad()


def finish_class(cfg: Config, source: DataSource, ctx: distributed.Context, net: AnomalyModel,
                 data: TrainData, best: dict, loss_history: list, tracker: ScalarLogger,
                 make_runner: RunnerFactory | None = None) -> tuple[dict, ClassEvaluation | None]:
    """Calibrate, save the final checkpoint, evaluate, write the metrics; return them and
    the evaluation a report draws."""
    cls = source.name
    distributed.sync_buffers(ctx, LossOf(net))
    check_finite_weights(net, cls)
    # Thresholds and score statistics from validation-good images (training ones if none).
    calib_set = data.val_set if data.val else data.train_set
    calib_pred = predict_samples(net, calib_set.samples, cfg, f"calibrate {cls}", ctx, dataset=calib_set,
                                 make_runner=make_runner)
    calibration = calibrate(calib_pred.scores, calib_pred.maps, cfg.threshold_quantile,
                            "validation" if data.val else "training")
    stats = good_score_statistics(calib_pred)
    del calib_pred
    if ctx.is_main:
        save_checkpoint(cfg.paths.checkpoint(cls), net, image_size=cfg.image_size,
                        epoch=cfg.epochs, cls=cls, teacher_weights=cfg.teacher_weights,
                        extra={"score_stats": stats, "calibration": calibration.to_dict(), **training_record(cfg)})
    log(f"[{cls}] thresholds from {calibration.count} {calibration.source} image(s) at the "
        f"{100 * calibration.quantile:g}% quantile: image {calibration.image_threshold:.5f}, "
        f"pixel {calibration.pixel_threshold:.5f}")
    metrics, evaluation = no_metrics(), None
    if data.test:
        pred = predict_samples(net, data.test, cfg, f"eval {cls}", ctx, dataset=data.test_set,
                               make_runner=make_runner)
        metrics = compute_metrics(pred, calibration, names=[s.image_path for s in data.test], warn=warn)
        log(f"[{cls}] final (epoch {cfg.epochs}): {metric_line(metrics)}")
        if cfg.report and ctx.is_main:
            evaluation = ClassEvaluation(cls, pred, data.test, image_reader(data.test_set), metrics, calibration,
                                         data.pixel_note, trained_model(cfg, cfg.epochs))
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
        if evaluation is not None:  # the report draws the last epoch: say which one results.json holds
            evaluation.note = "; ".join(filter(None, (
                evaluation.note, f"this page shows the last epoch ({cfg.epochs}); results.json and the tables "
                                 f"report epoch {best['epoch']}, selected ON THE TEST SET (--select_best_on_test)")))
    if ctx.is_main:
        atomic_write_json(cfg.paths.metrics(cls), metrics)
        atomic_write_json(cfg.paths.train_log(cls),
                          {"loss_per_step": loss_history, "feature_cache": cfg.feature_cache})
        mark_finished(cfg, cls, metrics)
    distributed.barrier(ctx)
    return metrics, evaluation


def check_finite_weights(net: AnomalyModel, cls: str) -> None:
    """A finite loss does not guarantee finite weights (an update can overflow): checked
    once after training, so a broken model is never calibrated, saved or scored."""
    for name, value in LossOf(net).state_dict().items():
        if not np.isfinite(value.numpy()).all():
            raise TrainingDiverged(f"[{cls}] weights became non-finite ({name}): class stopped, not "
                                   f"calibrated nor marked finished (try a lower --lr)")


def _keep_best(cfg: Config, cls: str, net: AnomalyModel, epoch: int, metrics: dict, best: dict) -> dict:
    score = np.nanmean([metrics[n] for n in ("pixel_auroc", "sample_auroc", "aupro_per_image")])
    if score > best["score"]:
        save_checkpoint(cfg.paths.checkpoint(cls, best=True), net,
                        image_size=cfg.image_size, epoch=epoch, cls=cls,
                        teacher_weights=cfg.teacher_weights, extra={"selection": "best_on_test", **training_record(cfg)})
        return {"score": float(score), "epoch": epoch, "metrics": metrics}
    return best


