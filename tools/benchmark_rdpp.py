"""RD++ training step, ours beside the reference's (tools/benchmark.py --stages rdpp).

    python tools/benchmark.py --stages rdpp --reference_rdpp ../Revisiting-Reverse-Distillation
    python tools/benchmark.py --stages rdpp --arch resnet18 --image_size 64 --train_batch 4

One training iteration each, on the same random batch, with the same threads:
- ours (model/rdpp.py): the pseudo-anomalies drawn (train_inputs), the teacher on the clean
  batch (or the teacher-feature cache's float16 copy) and on the noisy one, projector,
  OCBE, decoder, every loss term, backward, and both Adams every second iteration
  (grad_accumulation 2), convolutions on oneDNN where this machine has it (the default);
- the reference's (tools/reference_rdpp.py): its main.py iteration as it runs, the teacher
  on both batches not under no_grad, MultiProjectionLayer, Revisit_RDLoss with geomloss on
  the CPU, decoder, loss_fucntion, backward, both Adams every second iteration. Its noisy
  batch is given (its data loader makes it); ours is drawn inside the timed step.
The iterations take turns, round by round, so the machine's drifts hit both alike; each
figure is the median of its runs, with their range, and the ratio of the medians.
"""
from __future__ import annotations

import statistics

import numpy as np
import paddle

from engine.optim import build_optimizer
from model.onednn import OneDNNLibrary, load_library, use_conv_backend
from model.rdpp import RDPP
from tools.reference import seconds_per_run
from utils import runtime

REFERENCE_RDPP_TRAINING = "reference RD++ (torch + geomloss): teacher on both batches, its backward too"


def bench_rdpp_training(args, reference=None, ssot: str = "as_coded") -> list[dict]:
    """Rows of images/s of one RD++ training iteration, ours and (with `reference`, a
    tools/reference_rdpp.ReferenceRDPP) the reference's, with their ratio."""
    size, batch = args.image_size, args.train_batch
    rng = np.random.default_rng(0)
    images_np = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    net = RDPP(args.arch, size, ssot=ssot)
    net.train()
    images = paddle.to_tensor(images_np)
    noisy_np = net.train_inputs(images)["noisy"].numpy()
    with paddle.no_grad():
        cached = [paddle.to_tensor(f.numpy().astype(np.float16).astype(np.float32)) for f in net.teacher(images)]
    groups = net.optimizer_groups(0.005)
    optimizers = [build_optimizer(g.parameters, g.lr, *g.betas) for g in groups]
    counter = [0]

    def our_step(uses_cache: bool):
        def step():
            inputs = net.train_inputs(images)
            feats = cached if uses_cache else net.teacher_features(inputs["images"])
            net.loss_terms(inputs, feats)["loss"].backward()
            counter[0] += 1
            if counter[0] % net.grad_accumulation == 0:
                for opt in optimizers:
                    opt.step()
                    opt.clear_grad()
        return step

    threads = runtime.eager_threads()
    backend = "onednn" if isinstance(load_library(), OneDNNLibrary) else "paddle"
    use_conv_backend(net, backend, threads)
    steps = {f"RD++ train ({ssot}), teacher every step, {backend} convolutions": our_step(False),
             f"RD++ train ({ssot}), teacher-feature cache, {backend} convolutions": our_step(True)}
    if reference is not None:
        steps[REFERENCE_RDPP_TRAINING] = reference.training_step(args.arch, images_np, noisy_np)
    for step in steps.values():  # warm-up: an even number of iterations each (accumulation 2)
        seconds_per_run(step, 2, 0)
    seconds = {name: [] for name in steps}
    for turn in range(args.train_repeats):
        for name, step in steps.items():
            seconds[name] += seconds_per_run(step, 2, 0)  # one accumulation cycle per turn
            # at 256 px a turn takes minutes: show that the work goes on
            print(f"  turn {turn + 1}/{args.train_repeats}: {name}: "
                  f"{', '.join(f'{t:.1f}' for t in seconds[name][-2:])} s per iteration", flush=True)
    rows = []
    for name, times in seconds.items():
        rates = [batch / t for t in times]
        rows.append({"path": name, "images/s": round(statistics.median(rates), 3),
                     "range": f"{min(rates):.3f}-{max(rates):.3f}", "batch": batch, "runs": len(times)})
    if reference is not None:
        ref = statistics.median(seconds[REFERENCE_RDPP_TRAINING])
        for row in rows:
            row["x vs reference"] = round(ref / statistics.median(seconds[row["path"]]), 2)
    for row in rows:
        print(f"  {row}", flush=True)
    return rows
