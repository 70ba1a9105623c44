"""Each convolution of a training step on Paddle's kernels and on oneDNN (model/onednn.py).

    python tools/benchmark_convs.py --arch wide_resnet50_2 --image_size 256 --batch 16
    python tools/benchmark_convs.py --model rdpp --arch resnet18 --image_size 64 --batch 4

Every convolution that `--conv_backend onednn` takes, as often and at the input shape a
training step without the teacher-feature cache calls it (RD++: the teacher and the
projector on the clean and the noisy batch): the teacher's forward only (it is frozen), the
other parts' forward + backward (input and weight gradients). Layers of one shape are timed once and counted as often as
they occur. The two backends take turns, layer by layer and round by round, so that the
machine's drifts hit both alike; each figure is the median of --repeats runs. Compare the
ratios, not the milliseconds, between machines.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import runtime  # noqa: E402

runtime.start()  # before Paddle loads: a quiet import, every CPU core

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from model.arch import ARCH_NAMES as ARCHS  # noqa: E402
from model.onednn import OneDNNConv2D, OneDNNConv2DTranspose, use_conv_backend  # noqa: E402
from model.registry import MODELS, build_model  # noqa: E402
from utils.cli import OneLineArgumentParser, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402


def step_convolutions(net, batch: int, image_size: int) -> dict[tuple, dict]:
    """{(part, input shape, weight shape, stride, transposed): {"layer", "count"}} of the
    convolutions oneDNN takes in `net` (use_conv_backend(net, "onednn") already ran), as
    one training step's forward calls them (the model's own train_inputs and loss_terms)."""
    found: dict[tuple, dict] = {}
    teacher = {id(s) for s in net.teacher.sublayers(include_self=True)}

    def record(layer, inputs):
        part = "teacher" if id(layer) in teacher else "trained"
        key = (part, tuple(inputs[0].shape), tuple(layer.weight.shape), layer._onednn_geometry[0],
               isinstance(layer, OneDNNConv2DTranspose))
        found.setdefault(key, {"layer": layer, "count": 0})["count"] += 1

    hooks = [s.register_forward_pre_hook(record) for s in net.sublayers()
             if isinstance(s, (OneDNNConv2D, OneDNNConv2DTranspose))]
    images = paddle.to_tensor(np.random.default_rng(0).normal(size=(batch, 3, image_size, image_size))
                              .astype(np.float32))
    with paddle.no_grad():
        inputs = net.train_inputs(images)
        net.loss_terms(inputs, net.teacher_features(inputs["images"]))
    for h in hooks:
        h.remove()
    return found


def time_layer(layer, x: paddle.Tensor, backend: str, threads: int) -> float:
    """Seconds of one forward of `layer` on `backend`, with the backward pass where `x`
    asks for a gradient."""
    use_conv_backend(layer, backend, threads)
    start = time.perf_counter()
    y = layer(x)
    if not x.stop_gradient:
        y.sum().backward()
    seconds = time.perf_counter() - start
    layer.clear_gradients()
    x.clear_gradient()
    return seconds


def benchmark(a: argparse.Namespace) -> int:
    paddle.set_device("cpu")
    threads = runtime.eager_threads()
    net = build_model(a.model, a.arch, a.image_size, teacher_weights="none")
    if use_conv_backend(net, "onednn", threads) != "onednn":
        raise UserError("oneDNN is not usable here (see --conv_backend in doc/usage.md)")
    layers = step_convolutions(net, a.batch, a.image_size)
    print(f"{a.model}, {a.arch}, {a.image_size} px, batch {a.batch}, {threads} threads: "
          f"{sum(v['count'] for v in layers.values())} convolutions, {len(layers)} shapes", flush=True)
    times = {key: {"paddle": [], "onednn": []} for key in layers}
    for key, entry in layers.items():
        # one input per shape, drawn once: a 16x256x64x64 draw takes 0.7 s, more than most layers
        x = paddle.to_tensor(np.random.default_rng(0).normal(size=key[1]).astype(np.float32))
        x.stop_gradient = key[0] == "teacher"  # the frozen teacher runs forward only
        for backend in ("paddle", "onednn"):  # warm-up: primitives built, memory touched
            time_layer(entry["layer"], x, backend, threads)
        for _ in range(a.repeats):
            for backend in ("paddle", "onednn"):
                times[key][backend].append(time_layer(entry["layer"], x, backend, threads))
    print("| part | input | weight, stride | kind | layers | Paddle ms | oneDNN ms | ratio |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    totals = {}
    for (part, x_shape, w_shape, stride, transposed), entry in layers.items():
        ms = {b: 1000 * statistics.median(t) for b, t in times[(part, x_shape, w_shape, stride, transposed)].items()}
        kind = ("transposed " if transposed else "") + "x".join(map(str, w_shape[2:]))
        kind += ", forward" if part == "teacher" else ", forward + backward"
        for b in ms:
            totals[(part, b)] = totals.get((part, b), 0.0) + entry["count"] * ms[b]
            totals[("all", b)] = totals.get(("all", b), 0.0) + entry["count"] * ms[b]
        print(f"| {part} | {'x'.join(map(str, x_shape))} | {'x'.join(map(str, w_shape))}, {stride} | {kind} "
              f"| {entry['count']} | {ms['paddle']:.1f} | {ms['onednn']:.1f} | {ms['paddle'] / ms['onednn']:.2f} |")
    for part in ("teacher", "trained", "all"):
        if (part, "paddle") in totals:
            p, o = totals[(part, "paddle")], totals[(part, "onednn")]
            print(f"| {part}, every layer of a step | | | | | {p:.0f} | {o:.0f} | {p / o:.2f} |")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="rd4ad", choices=tuple(MODELS))
    p.add_argument("--arch", default="wide_resnet50_2", choices=ARCHS)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if a.batch < 1 or a.repeats < 1:
        raise UserError("--batch and --repeats: must be at least 1")
    if a.image_size < 64 or a.image_size % 32:
        raise UserError(f"--image_size {a.image_size}: must be a multiple of 32, at least 64")
    return a


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: benchmark(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
