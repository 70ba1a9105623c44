"""One config object for every mode, built from the command line and passed down."""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass


class ConfigError(ValueError):
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

    def to_dict(self) -> dict:
        return asdict(self)

    def class_dir(self, cls: str) -> str:
        return os.path.join(self.output_dir, cls)

    def checkpoint_path(self, cls: str, best: bool = False) -> str:
        return os.path.join(self.class_dir(cls), "best.pdparams" if best else "model.pdparams")


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
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
    p.add_argument("--eval_backend", default=d.eval_backend, choices=["auto", "dygraph", "static"],
                   help="evaluate with the dynamic graph or a Paddle Inference predictor built "
                        "from the current weights (auto: static in --mode eval/infer on CPU for 32+ images; dygraph when training, "
                        "as a predictor slows later eager training in the same process)")
    return p


def parse_config(argv: list[str] | None = None) -> Config:
    args = build_parser().parse_args(argv)
    return Config(**vars(args))
