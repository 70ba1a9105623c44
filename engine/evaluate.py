"""Evaluation: a trained model over a set of images (predictions, with the out-of-memory
back-off). What is computed from them (metrics, statistics) is core/results.py's."""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import paddle
from paddle.io import DataLoader
from tqdm import tqdm

from core.results import Predictions
from dataset import MVTecDataset, Sample, denormalize
from model.base import AnomalyModel
from utils import distributed
from utils.errors import first_line, is_out_of_memory
from utils.log import warn

from .config import Config

# images -> (maps, scores) as numpy: a compiled predictor of a model's current weights
# (deploy.predictor.StaticGraphRunner), which the orchestrator hands in (engine/ does not
# import deploy/); it has a close().
RunnerFactory = Callable[[AnomalyModel, int], Callable]


@paddle.no_grad()
def predict(net: paddle.nn.Layer, loader: DataLoader, num_samples: int, image_size: int,
            desc: str = "eval", progress: bool = True, runner=None) -> Predictions:
    """One pass over `loader`. `runner` (images -> (maps, scores) as numpy), e.g. a
    StaticGraphRunner, replaces the dynamic graph when given."""
    net.eval()
    maps = np.empty((num_samples, image_size, image_size), dtype=np.float32)
    masks = np.empty((num_samples, image_size, image_size), dtype=np.uint8)
    scores = np.empty(num_samples, dtype=np.float32)
    labels = np.empty(num_samples, dtype=np.int64)
    i = 0
    for images, gt, label in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                                  disable=not progress):
        if runner is None:
            batch_maps, batch_scores = net(images)  # eval mode: the model's own anomaly-map head
            batch_maps, batch_scores = batch_maps.numpy(), batch_scores.numpy()
        else:
            batch_maps, batch_scores = runner(images)
        n = batch_maps.shape[0]
        maps[i:i + n] = batch_maps
        scores[i:i + n] = batch_scores
        masks[i:i + n] = gt.numpy()[:, 0] > 0.5
        labels[i:i + n] = label.numpy()
        i += n
    assert i == num_samples, f"loader gave {i} samples, expected {num_samples}"
    return Predictions(maps, scores, masks, labels)


def make_loader(dataset: MVTecDataset, cfg: Config, batch_size: int) -> DataLoader:
    """In file order (training shuffles through EpochBatchSampler instead)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                      num_workers=cfg.num_workers)


def predict_samples(net: AnomalyModel, samples: list[Sample], cfg: Config, desc: str,
                    ctx: distributed.Context = distributed.Context(), progress: bool = True,
                    dataset: MVTecDataset | None = None, make_runner: RunnerFactory | None = None) -> Predictions:
    """Maps and scores of `samples` (sharded over ranks and gathered when data-parallel).
    `make_runner(net, threads)`: a compiled predictor, used where --eval_backend asks for
    one; without it the dynamic graph evaluates."""
    if ctx.parallel:
        dataset = MVTecDataset(ctx.shard(samples), cfg.image_size)
    elif dataset is None:
        dataset = MVTecDataset(samples, cfg.image_size)
    # Building the predictor costs seconds; it pays back from a few dozen images of a large
    # model on a CPU. Not by default while training, where that cost comes at every
    # evaluation and small models never earn it back; --eval_backend static is safe there
    # (the predictor gives the math library its threads back: utils/runtime.py).
    static = cfg.eval_backend == "static" or (
        cfg.eval_backend == "auto" and cfg.mode != "train" and paddle.get_device() == "cpu"
        and len(dataset) >= 32)
    runner = make_runner(net, os.cpu_count() or 1) if static and make_runner is not None else None
    batch_size = min(cfg.batch_size, 8)
    try:
        while True:
            try:
                pred = predict(net, make_loader(dataset, cfg, batch_size), len(dataset), cfg.image_size,
                               desc=desc, progress=progress and ctx.is_main, runner=runner)
                break
            except (MemoryError, RuntimeError, OSError) as err:  # CUDA's own out of memory: OSError
                if not is_out_of_memory(err) or batch_size == 1:
                    raise
                batch_size //= 2
                warn(f"{desc}: out of memory ({first_line(err)}); "
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


def image_reader(dataset: MVTecDataset) -> Callable[[int], np.ndarray]:
    """Image i of a dataset as [H, W, 3] uint8, as the model saw it."""
    return lambda i: denormalize(dataset[i][0])



