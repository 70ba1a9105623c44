"""A run over classes: the settings checked, then each class trained, evaluated or drawn
(one failing class does not stop the others), the results table, JSON and report.

The orchestrator (doc/pipeline.md, "Layers"): engine/ trains and evaluates and returns
plain results (core/results.py); this module hands them to report/, and hands the engine
the compiled predictor of deploy/ it may evaluate with."""
from __future__ import annotations

import dataclasses
import math
import os
import shlex
import sys

import paddle
from tqdm import tqdm

from dataset import DataError, DataSource, MVTecDataset, Sample, index_test_dir, load_checked, resolve_sources
from model.base import AnomalyModel
from model.teacher import resolve_teacher_weights
from model.registry import model_title
from report.html import write_class_report, write_summary_report
from report.per_image import ImageItem, ImageWriter, colour_range
from report.tables import TABLE_NOTE, mean_row, models_table, results_table
from utils import distributed
from utils.config import ConfigError
from utils.errors import PartialFailure
from utils.io import atomic_write_json, atomic_write_text
from utils.lock import OutputLock
from utils.log import log, warn
from utils.names import output_names

from core.decision import Calibration, CalibrationError
from core.results import ClassEvaluation, MetricsError, compute_metrics, metric_line, no_metrics
from deploy.predictor import StaticGraphRunner
from engine.checkpoint import load_trained
from engine.config import Config, config_yaml, resume_command
from engine.evaluate import image_reader, predict_samples
from engine.model_info import SETTING_FIELDS, class_model, common_settings, described_settings
from engine.preflight import check_before_work, check_config
from engine.train import TrainingDiverged, pixel_note, train_class


class ClassFailed(RuntimeError):
    """Some of a class's images or results could not be trusted (unreadable, non-finite):
    everything else is written, the class is reported failed, the others go on."""

    def __init__(self, message: str, metrics: dict | None = None) -> None:
        super().__init__(message)
        self.metrics = metrics


def run(cfg: Config) -> dict[str, dict]:
    """Check everything, then run every class; raise PartialFailure (after writing all
    else) when some class failed."""
    check_config(cfg)
    ctx = distributed.init(cpu=cfg.device == "cpu")
    device = set_device(cfg, ctx)
    try:
        sources = resolve_sources(cfg.data_dir, cfg.cls, cfg.train_dir, cfg.test_dir, cfg.layout)
    except DataError as err:
        if not cfg.inherited:
            raise
        raise DataError(f"{err} (data settings from {cfg.inherited}; give --data_dir and --cls to "
                        f"choose others)") from None
    if cfg.mode == "train":
        cfg = dataclasses.replace(cfg, teacher_weights=resolve_teacher_weights(cfg.teacher_weights, cfg.arch, warn))
    model_settings = check_before_work(cfg, sources)
    # Every check passed: only now is anything created. Rank 0 holds the folder's lock.
    lock = OutputLock(cfg.output_dir)
    if ctx.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        lock.acquire()
    try:
        return run_classes(cfg, ctx, device, sources, model_settings)
    finally:
        lock.release()


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


def run_classes(cfg: Config, ctx: distributed.Context, device: str, sources: list[DataSource],
                model_settings: dict[str, dict]) -> dict[str, dict]:
    # What each class's results come from, read from its checkpoint: in eval / infer before
    # the classes run, in training after each class has saved its own.
    models = {s.name: class_model(cfg, s.name) for s in sources} if cfg.mode != "train" else {}
    if ctx.is_main:
        # The settings actually used (flags over --config over the run's over defaults; in
        # eval and infer the checkpoints' model settings when the classes agree), readable by --config.
        common = [dict(s) for s in model_settings.values()]
        used = dataclasses.replace(cfg, **common[0]) if common and all(c == common[0] for c in common) else cfg
        shared = common_settings(models)
        used = dataclasses.replace(used, **{k: shared[f] for k, f in SETTING_FIELDS.items()
                                           if k in ("epochs", "batch_size") and shared.get(f) is not None})
        atomic_write_text(cfg.paths.config_yaml(cfg.mode), config_yaml(used))
    log(f"mode {cfg.mode}, device {device}, classes: {', '.join(s.name for s in sources)}")
    results, failed = {}, {}
    unfinished: dict[str, str] = {}  # eval / infer of an interrupted training: {class: "epoch N of M"}
    for source in sources:
        # eval / infer: the model's settings are the checkpoint's (preflight checked the flags)
        class_cfg = dataclasses.replace(cfg, **model_settings.get(source.name, {}))
        try:
            if cfg.mode == "train":
                metrics, evaluation = train_class(class_cfg, source, ctx, make_runner=StaticGraphRunner)
                if evaluation is not None:
                    write_evaluation_report(class_cfg, evaluation)
                results[source.name] = dict(metrics)
            elif cfg.mode == "eval":
                results[source.name] = dict(eval_class(class_cfg, source, ctx, unfinished, models.get(source.name)))
            else:
                infer_class(class_cfg, source, ctx, unfinished)
                results[source.name] = {}
        except (TrainingDiverged, ClassFailed, CalibrationError, MetricsError) as err:
            message = str(err) if str(err).startswith("[") else f"[{source.name}] {err}"
            log(f"error: {message}")
            failed[source.name] = message
            metrics = getattr(err, "metrics", None) or no_metrics()
            results[source.name] = dict(metrics) | {"error": message}
        if cfg.mode == "train" and ctx.is_main:
            models[source.name] = class_model(cfg, source.name)
        if cfg.mode != "infer" and ctx.is_main:
            write_results(cfg, results, models, unfinished)  # after every class: nothing finished is lost
    if cfg.mode != "infer":
        if cfg.report and ctx.is_main:
            log(f"report: {write_summary_report(cfg.output_dir, results, models, unfinished_line(cfg, unfinished))}")
        log("\n" + results_table(results) + "\n" + TABLE_NOTE)
    if unfinished:
        log(f"note: {unfinished_line(cfg, unfinished)}")
    if failed:
        raise PartialFailure(f"{len(failed)} of {len(sources)} classes failed: {', '.join(failed)} "
                             f"(see the error lines above; the others finished)")
    return results


def write_evaluation_report(cfg: Config, evaluation: ClassEvaluation) -> None:
    e = evaluation
    log(f"[{e.cls}] report: " + write_class_report(cfg.paths.report_dir(e.cls), e.cls, e.pred, e.samples,
                                                   e.read_image, e.metrics, e.calibration, e.note, e.model))


def selection_note(cfg: Config) -> str:
    return ("checkpoint: the epoch best ON THE TEST SET (--select_best_on_test), not the last"
            if cfg.select_best_on_test else "")


def unfinished_line(cfg: Config, unfinished: dict[str, str]) -> str:
    """One line saying which classes' training has not finished and how to continue ('' if none)."""
    if not unfinished:
        return ""
    classes = ", ".join(f"{cls} at {where}" for cls, where in unfinished.items())
    return (f"UNFINISHED training run ({classes}): these results are of the last saved model, not "
            f"the finished one; continue with {resume_command(cfg)}")


def write_results(cfg: Config, results: dict[str, dict], models: dict[str, dict | None],
                  unfinished: dict[str, str] | None = None) -> str:
    """results.md and results.json: the metrics, per class the model they come from, and
    the classes whose training has not finished (`unfinished`)."""
    selection = ("best test-set epoch (--select_best_on_test: selected ON THE TEST SET)"
                 if cfg.select_best_on_test else "last epoch")
    table = results_table(results)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    shared = common_settings({c: models.get(c) for c in results})
    title = ", ".join(p for p in (shared.get("arch"), f"{shared['image_size']}px" if "image_size" in shared else None)
                      if p)
    method = model_title(str(shared.get("model", cfg.model)))
    md = (f"# {method} results ({title + ', ' if title else ''}{cfg.mode})\n\n"
          f"Command: `{command}`\n\nCheckpoint: {selection}. AUPRO up to FPR 0.3 (per image: the "
          f"reference's and paper's protocol; set: MVTec AD's). Thresholds: the "
          f"{100 * cfg.threshold_quantile:g}% quantile of held-out good images' scores.\n\n{table}\n\n"
          f"{TABLE_NOTE}\n\n## Models\n\n{models_table({c: models.get(c) for c in results})}\n")
    note = unfinished_line(cfg, unfinished or {})
    md += f"\n**{note}**\n" if note else ""
    atomic_write_text(cfg.paths.file("results.md"), md)
    atomic_write_json(cfg.paths.file("results.json"), {
        "config": described_settings(cfg, {c: models.get(c) for c in results}),
        "checkpoint": "best_on_test" if cfg.select_best_on_test else "last",
        "classes": results, "models": {c: models.get(c) for c in results}, "mean": mean_row(results),
        # {class: "epoch N of M"} for a training that has not finished; {} when every class has
        "unfinished": dict(unfinished or {})})
    return table


def load_class_model(cfg: Config, cls: str, unfinished: dict[str, str]) -> tuple[AnomalyModel, Calibration | None, dict]:
    """The class's trained model (eval mode), its thresholds (None for a checkpoint that has
    none) and its good-image score statistics. A class whose training has not finished
    (an intermediate checkpoint: no status.json, no thresholds) is recorded in `unfinished`."""
    path = cfg.paths.checkpoint(cls, best=cfg.select_best_on_test)
    override = cfg.teacher_weights if "teacher_weights" in cfg.explicit else None
    net, state = load_trained(path, teacher_weights=override, conv_backend=cfg.conv_backend)
    calibration = Calibration.from_dict(state["calibration"]) if "calibration" in state else None
    if calibration is None and not os.path.isfile(cfg.paths.status(cls)):
        unfinished[cls] = f"epoch {state['epoch']} of {cfg.epochs}"
        log(f"[{cls}] note: training UNFINISHED: {path} is the model of epoch {state['epoch']} of "
            f"{cfg.epochs} (no thresholds yet: no verdicts or F1); continue with {resume_command(cfg)}")
    elif calibration is None:
        log(f"[{cls}] note: {path} has no calibrated thresholds (trained by an older version): "
            f"no verdicts or F1")
    return net, calibration, dict(state.get("score_stats") or {})


def _checked_test_set(cfg: Config, source: DataSource, ctx: distributed.Context,
                      ) -> tuple[MVTecDataset, list[tuple[Sample, str]]]:
    samples = index_test_dir(source.test_dir, source.gt_dir, source.layout)
    if not samples:
        raise DataError(f"{source.test_dir or '--test_dir'}: no test images to evaluate")
    dataset, failed, mask_warnings = load_checked(samples, cfg.image_size, ctx.is_main, f"read {source.name} test")
    for message in mask_warnings:
        warn(message)
    return dataset, failed


def eval_class(cfg: Config, source: DataSource, ctx: distributed.Context, unfinished: dict[str, str],
               model: dict | None = None) -> dict:
    dataset, failed = _checked_test_set(cfg, source, ctx)
    for _, reason in failed:
        warn(f"{reason}: skipped (not in the metrics)")
    samples = dataset.samples
    if not samples:
        raise DataError(f"{source.test_dir}: no readable test images")
    net, calibration, _ = load_class_model(cfg, source.name, unfinished)
    pred = predict_samples(net, samples, cfg, f"eval {source.name}", ctx, dataset=dataset,
                           make_runner=StaticGraphRunner)
    metrics = compute_metrics(pred, calibration, names=[s.image_path for s in samples], warn=warn)
    log(f"[{source.name}] {metric_line(metrics)}")
    if cfg.report and ctx.is_main:
        log(f"[{source.name}] report: " + write_class_report(
            cfg.paths.report_dir(source.name), source.name, pred, samples, image_reader(dataset), metrics,
            calibration, "; ".join(filter(None, (pixel_note(samples, source), selection_note(cfg)))), model))
    if failed:  # the metrics stand for the readable images only: say so in the exit status
        raise ClassFailed(f"[{source.name}] {len(failed)} unreadable test image(s) left out of the metrics "
                          f"(first: {failed[0][0].image_path})", metrics)
    return metrics


def infer_class(cfg: Config, source: DataSource, ctx: distributed.Context, unfinished: dict[str, str]) -> None:
    """For every test image: its picture, predicted mask and scores.csv row with the
    verdict (report/per_image.py, the writer infer.py uses too). An image that could not be
    read, or whose score is not finite, gets no verdict: its row says why and the class is
    reported failed once everything else is written."""
    cls = source.name
    dataset, failed = _checked_test_set(cfg, source, ctx)
    samples = dataset.samples
    net, calibration, stats = load_class_model(cfg, cls, unfinished)
    if not math.isnan(cfg.threshold):  # --threshold: both thresholds replaced, as infer.py does
        if calibration is None:
            raise CalibrationError(f"--threshold needs calibrated thresholds; {cfg.paths.checkpoint(cls)} has none "
                                   f"(trained by an older version): retrain the class")
        calibration = calibration.with_threshold(cfg.threshold)
        log(f"[{cls}] --threshold {cfg.threshold:g}: verdicts and masks at this raw score, not the calibrated one")
    pred = predict_samples(net, samples, cfg, f"infer {cls}", ctx, dataset=dataset,
                           make_runner=StaticGraphRunner) if samples else None
    if not ctx.is_main:
        return
    writer = ImageWriter(cfg.paths.infer_dir(cls), calibration, stats)
    writer.clear_previous()
    everything = samples + [sample for sample, _ in failed]
    names = output_names([os.path.relpath(s.image_path, source.test_dir) for s in everything],
                         [s.name for s in everything])
    items = [ImageItem(_display_path(s.image_path, cfg), names[i], s.defect if s.label >= 0 else "",
                       None if s.label < 0 else int(s.label), s.mask_path) for i, s in enumerate(everything)]
    if pred is not None:
        vmin, vmax = colour_range(calibration, stats, pred.maps)
        for i, sample in enumerate(tqdm(samples, desc=f"images {cls}", leave=False)):
            writer.add(items[i], image_reader(dataset)(i), pred.maps[i], pred.scores[i], vmin, vmax,
                       pred.masks[i] if sample.has_mask else None)
    for k, (_, reason) in enumerate(failed):  # unreadable: its row says why; the others went on
        writer.add_failed(items[len(samples) + k], reason)
    path = writer.finish()
    for row in writer.rows:
        if row["error"]:
            warn(row["error"])
    scored = len(writer.rows) - writer.failed
    log(f"[{cls}] wrote {scored} pictures, masks and scores.csv to {writer.folder}"
        + (f": {writer.defects} DEFECT / {scored - writer.defects} OK" if calibration else "")
        + (f", {writer.failed} without a verdict" if writer.failed else ""))
    if writer.failed:
        raise ClassFailed(f"[{cls}] {writer.failed} of {len(everything)} images got no verdict (unreadable or "
                          f"non-finite score; see {path})")


def _display_path(path: str, cfg: Config) -> str:
    base = cfg.data_dir if not cfg.train_dir else os.path.dirname(os.path.normpath(cfg.test_dir))
    rel = os.path.relpath(path, base)
    return path if rel.startswith("..") else rel
