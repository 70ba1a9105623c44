"""Does running a Paddle Inference predictor slow later eager training in the same process?

    python tools/eager_after_predictor.py predictor   # train, run a predictor of the weights, train
    python tools/eager_after_predictor.py predictor --no_restore   # as Paddle leaves it
    python tools/eager_after_predictor.py sleep       # the control: train, sleep 10 s, train

Prints the median step time of two blocks of training steps before and two after, their
ratio, and the math library's thread count before and after. Paddle 3.3.1's predictor sets
that count to 1 for the whole process at its first run; our predictors set it back after
each run (utils/runtime.restore_eager_threads), which --no_restore turns off. Run the modes
one after the other, several times: this machine's speed drifts, so only the ratio of one
run against the control's means anything (doc/performance.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a script in tools/: the repository's packages by path

from utils import runtime  # noqa: E402

BETWEEN = ("predictor", "build", "sleep")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("between", choices=BETWEEN, help="predictor: build and run one; build: only build it; "
                                                    "sleep: the control")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--no_restore", action="store_true", help="leave the math library's threads as the predictor "
                                                             "left them (Paddle's own behaviour)")
    a = p.parse_args(argv)
    runtime.start()
    import numpy as np
    import paddle

    from deploy import predictor as predictors
    from deploy.predictor import StaticGraphRunner
    from engine.optim import build_optimizer
    from model import build_rd4ad
    from model.loss import cosine_distillation_loss

    paddle.seed(0)
    net = build_rd4ad(a.arch, teacher_weights="none", image_size=a.image_size)
    images = np.random.default_rng(0).normal(size=(a.batch, 3, a.image_size, a.image_size)).astype(np.float32)
    with paddle.no_grad():
        teacher_feats = [f.detach() for f in net.teacher(paddle.to_tensor(images))]  # as the feature cache gives
    net.train()
    optimizer = build_optimizer(net.trainable_parameters())

    def block(steps: int = 4) -> float:
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            loss = cosine_distillation_loss(teacher_feats, net.student_features(teacher_feats))
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    if a.no_restore:
        predictors.restore_eager_threads = lambda: None
    block(1)  # warm-up
    before = [block() for _ in range(2)]
    threads_before = runtime.math_library_threads()
    if a.between == "sleep":
        time.sleep(10)
    else:
        runner = StaticGraphRunner(net, threads=os.cpu_count() or 1)
        if a.between == "predictor":
            for _ in range(3):
                runner(images)
        runner.close()
        net.train()
    threads_after = runtime.math_library_threads()
    after = [block() for _ in range(2)]
    ratio = statistics.fmean(after) / statistics.fmean(before)
    mode = a.between + (" --no_restore" if a.no_restore else "")
    print(f"{mode}: step seconds before {', '.join(f'{s:.3f}' for s in before)}; after "
          f"{', '.join(f'{s:.3f}' for s in after)}; after/before {ratio:.2f}; math library threads "
          f"{threads_before} -> {threads_after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
