"""The reference RD4AD (github.com/hq-deng/RD4AD, PyTorch), loaded from a local checkout at
run time so that tools/benchmark.py can time it beside this project in one run.

The benchmark times the reference in its own process run, its steps taking turns with ours:
this machine's speed drifts by up to 1.5x within minutes (doc/performance.md), which
figures taken one after the other would mistake for a difference between the two.

Nothing of the reference is copied into this repository. Its model files (resnet.py,
de_resnet.py) are imported from the checkout; its loss (`loss_fucntion` in main.py) and its
anomaly map (`cal_anomaly_map` in test.py) are read out of those files, because importing
them whole needs torchvision, cv2 and pandas, which the timing does not use. The steps timed
are the reference's own, as its main.py trains and its test.py evaluates:
- training: teacher forward (eval mode, not under no_grad, layer4 included, as its ResNet
  computes), bottleneck and student forward, its loss, backward, Adam(0.005, (0.5, 0.999));
- inference at batch 1: teacher, bottleneck, student under no_grad, `cal_anomaly_map`
  (amap_mode 'a', as evaluation() calls it), scipy's gaussian_filter(sigma=4).
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from types import ModuleType

import numpy as np
from scipy.ndimage import gaussian_filter

from utils.errors import UserError

MODEL_FILES = ("resnet.py", "de_resnet.py")
FUNCTIONS = {"main.py": "loss_fucntion", "test.py": "cal_anomaly_map"}


class Reference:
    """The reference's encoder/bottleneck builders, decoder builders, loss and map."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        check_checkout(folder)
        import torch
        import torch.nn.functional as F
        self.torch = torch
        self.encoders = _import(os.path.join(folder, "resnet.py"), "rd4ad_reference_resnet")
        self.decoders = _import(os.path.join(folder, "de_resnet.py"), "rd4ad_reference_de_resnet")
        namespace = {"torch": torch, "F": F, "np": np}
        self.loss = _function(os.path.join(folder, "main.py"), FUNCTIONS["main.py"], namespace)
        self.anomaly_map = _function(os.path.join(folder, "test.py"), FUNCTIONS["test.py"], namespace)

    def build(self, arch: str) -> tuple:
        """(encoder, bottleneck, decoder) of `arch`, randomly initialised (no download)."""
        make_encoder = getattr(self.encoders, arch, None)
        make_decoder = getattr(self.decoders, "de_" + arch, None)
        if make_encoder is None or make_decoder is None:
            raise UserError(f"--reference {self.folder}: the reference has no {arch}")
        encoder, bottleneck = make_encoder(pretrained=False)
        return encoder, bottleneck, make_decoder(pretrained=False)

    def training_step(self, arch: str, images: np.ndarray) -> Callable[[], None]:
        """One of the reference's training steps on `images`, as its main.py runs it."""
        torch = self.torch
        encoder, bottleneck, decoder = self.build(arch)
        encoder.eval()
        bottleneck.train()
        decoder.train()
        optimizer = torch.optim.Adam(list(decoder.parameters()) + list(bottleneck.parameters()),
                                     lr=0.005, betas=(0.5, 0.999))
        batch = torch.from_numpy(images)

        def step() -> None:
            inputs = encoder(batch)
            outputs = decoder(bottleneck(inputs))
            loss = self.loss(inputs, outputs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return step

    def inference(self, arch: str, image: np.ndarray) -> Callable[[], np.ndarray]:
        """The reference's evaluation of one [1, 3, S, S] image: its smoothed anomaly map."""
        torch = self.torch
        encoder, bottleneck, decoder = self.build(arch)
        for part in (encoder, bottleneck, decoder):
            part.eval()
        batch = torch.from_numpy(image)

        def run() -> np.ndarray:
            with torch.no_grad():
                inputs = encoder(batch)
                outputs = decoder(bottleneck(inputs))
                anomaly_map, _ = self.anomaly_map(inputs, outputs, batch.shape[-1], amap_mode="a")
            return gaussian_filter(anomaly_map, sigma=4)
        return run


def check_checkout(folder: str) -> None:
    """UserError unless `folder` has the reference's files and torch is installed (torch is
    looked up, not imported: the benchmark keeps it out of its own process)."""
    if importlib.util.find_spec("torch") is None:
        raise UserError(f"--reference {folder}: PyTorch is not installed (pip install torch)")
    for name in MODEL_FILES + tuple(FUNCTIONS):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"--reference {folder}: no {name} there; give a checkout of hq-deng/RD4AD")
    for name, function in FUNCTIONS.items():
        path = os.path.join(folder, name)
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        if not any(isinstance(node, ast.FunctionDef) and node.name == function for node in tree.body):
            raise UserError(f"{path}: no function {function}(); is this a checkout of hq-deng/RD4AD?")


def _import(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the checkout is the user's: say which file failed
        raise UserError(f"{path}: cannot import ({type(err).__name__}: {err})") from None
    return module


def _function(path: str, name: str, namespace: dict) -> Callable:
    """The function `name` of `path`, compiled alone in `namespace` (the file's own imports
    are not run)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name]
    if not found:
        raise UserError(f"{path}: no function {name}(); is this a checkout of hq-deng/RD4AD?")
    module = ast.Module(body=found, type_ignores=[])
    exec(compile(module, path, "exec"), namespace)
    return namespace[name]


def seconds_per_run(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    """Wall seconds of each of `repeats` timed runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times

