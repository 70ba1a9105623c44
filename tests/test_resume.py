"""Long runs: a killed training resumes to the same result; finished classes are skipped."""
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest

from conftest import ROOT
from engine.checkpoint import load_checkpoint

ARGS = ["--data_dir", os.path.join(ROOT, "sample_data"), "--cls", "bottle", "--arch", "resnet18",
        "--image_size", "64", "--teacher_weights", "none", "--batch_size", "1", "--epochs", "12",
        "--eval_interval", "0", "--save_interval", "1", "--log_interval", "0", "--no_report"]


def command(out, *extra):
    return [sys.executable, os.path.join(ROOT, "main.py"), *ARGS, "--output_dir", out, *extra]


def run(out, *extra):
    proc = subprocess.run(command(out, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def weights(path):
    state = load_checkpoint(path)
    return {f"{part}.{k}": np.asarray(v) for part in ("bottleneck", "student") for k, v in state[part].items()}


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("unbroken"))
    run(out)
    return out


def test_killed_run_resumes_to_the_unbroken_result(unbroken, tmp_path):
    out = str(tmp_path)
    rng = random.Random(2026)  # kill moments: random, but the same on every test run
    resumed_from = []
    state = os.path.join(out, "bottle", "train_state.pdparams")
    def saved_at():
        return os.path.getmtime(state) if os.path.exists(state) else None

    for attempt in range(4):
        before = saved_at()
        proc = subprocess.Popen(command(out, "--resume"), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        if attempt:  # mid-training on any machine: once this run saved a state, a random moment
            while proc.poll() is None and saved_at() in (None, before):
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 2.0))
        else:  # any moment, start-up included
            time.sleep(rng.uniform(0.5, 4.0))
        proc.kill()
        log = proc.communicate()[0]
        resumed_from += [line for line in log.replace("\r", "\n").splitlines() if "resumed after epoch" in line]
    final = run(out, "--resume")
    resumed_from += [line for line in (final.stdout + final.stderr).replace("\r", "\n").splitlines()
                     if "resumed after epoch" in line]
    assert resumed_from, "no run was killed mid-training: the test checked nothing"

    mine, reference = weights(os.path.join(out, "bottle", "model.pdparams")), \
        weights(os.path.join(unbroken, "bottle", "model.pdparams"))
    assert mine.keys() == reference.keys()
    for k in mine:
        np.testing.assert_array_equal(mine[k], reference[k], err_msg=k)
    logs = [json.load(open(os.path.join(d, "bottle", "train_log.json")))["loss_per_step"]
            for d in (out, unbroken)]
    assert logs[0] == logs[1]
    metrics = [json.load(open(os.path.join(d, "bottle", "metrics.json"))) for d in (out, unbroken)]
    assert metrics[0] == metrics[1]
    leftovers = [n for n in os.listdir(os.path.join(out, "bottle")) if n.endswith(".tmp")]
    assert not leftovers and not os.path.exists(os.path.join(out, "bottle", "train_state.pdparams"))


def test_finished_class_is_skipped_and_force_retrains(unbroken):
    before = os.path.getmtime(os.path.join(unbroken, "bottle", "model.pdparams"))
    proc = run(unbroken)
    assert "already finished with these settings: skipped" in proc.stdout + proc.stderr
    assert os.path.getmtime(os.path.join(unbroken, "bottle", "model.pdparams")) == before
    results = json.load(open(os.path.join(unbroken, "results.json")))
    assert 0.0 <= results["classes"]["bottle"]["pixel_auroc"] <= 1.0  # the table still has it


def test_finished_with_other_settings_needs_force(unbroken, tmp_path):
    proc = subprocess.run(command(unbroken, "--lr", "0.001"), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "already finished with other settings (lr=0.005 (now 0.001))" in proc.stderr
    assert "--force" in proc.stderr


def test_training_state_round_trip_continues_identically(tmp_path):
    """In one process: save after a step, restore into a fresh model (other parameter
    names), and the next step equals the original's next step."""
    from model import build_rd4ad
    from engine.config import Config
    from engine.feature_cache import EpochBatchSampler
    from model.loss import cosine_distillation_loss
    from engine.optim import build_optimizer
    from engine.train_state import load_train_state, restore_train_state, save_train_state

    cfg = Config(arch="resnet18", image_size=64, output_dir=str(tmp_path), teacher_weights="none")
    paddle.seed(0)
    x = paddle.randn([2, 3, 64, 64])

    def setup():
        paddle.seed(1)
        net = build_rd4ad("resnet18", "none")
        params = net.trainable_parameters()
        return net, params, build_optimizer(params, 0.005), EpochBatchSampler(8, 2, seed=3)

    def step(net, optimizer):
        net.train()
        feats = net.teacher_features(x)
        loss = cosine_distillation_loss(feats, net.student_features(feats))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        return float(loss)

    net, params, opt, sampler = setup()
    step(net, opt)
    list(sampler)  # one epoch drawn
    save_train_state(cfg, "c", epoch=1, net=net, optimizers={"distillation": opt},
                     sampler_rng=sampler.rng, loss_history=[[1.0]])
    expected_loss, expected_order = step(net, opt), list(sampler)

    net2, params2, opt2, sampler2 = setup()
    assert params2[0].name != params[0].name  # the remapping is exercised
    epoch, history, _ = restore_train_state(load_train_state(cfg, "c"), net2, {"distillation": opt2}, cfg.lr,
                                            sampler2.rng)
    assert (epoch, history) == (1, [[1.0]])
    assert step(net2, opt2) == expected_loss and list(sampler2) == expected_order
    for a, b in zip(params, params2):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_two_runs_with_the_same_seed_are_identical(unbroken, tmp_path):
    """Determinism on CPU: same seed, same loss sequence, weights and metrics."""
    out = str(tmp_path)
    run(out)
    for name in ("train_log.json", "metrics.json"):
        assert json.load(open(os.path.join(out, "bottle", name))) == \
            json.load(open(os.path.join(unbroken, "bottle", name))), name
    a, b = weights(os.path.join(out, "bottle", "model.pdparams")), weights(os.path.join(unbroken, "bottle", "model.pdparams"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
