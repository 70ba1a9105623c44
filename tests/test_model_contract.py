"""The model contract (model/base.py): a method the engine has never seen trains, resumes,
evaluates, exports and reloads through engine/, deploy/ and app/ unchanged.

The toy method below has what RD++ needs from the engine: two optimizer groups with their
own learning rates, gradient accumulation 2, a training input transform adding a key
("noisy"), two named loss terms, trained parts inside the exported forward, and an option
(--toy_noise) that becomes a flag. It is registered in a subprocess before the settings
are built (as model/registry.py's MODELS line would), then driven through the commands.
"""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from conftest import ROOT
from model.anomaly_map import AnomalyMapHead
from model.base import AnomalyModel, ModelOption, OptimizerGroup
from model.teacher import Teacher

TESTS = os.path.dirname(os.path.abspath(__file__))


class ToyModel(AnomalyModel):
    """Teacher layer1 -> encoder -> decoder; the map: the project's head between layer1
    and its reconstruction (1 - cosine, upsampled, smoothed)."""
    name = "toy"
    options = {"toy_noise": ModelOption(0.5, "amplitude of the noisy copy", type=float)}
    grad_accumulation = 2

    def __init__(self, arch: str, image_size: int | None = None, toy_noise: float = 0.5) -> None:
        super().__init__()
        self.arch, self.image_size, self.toy_noise = arch, image_size, toy_noise
        self.teacher = Teacher(arch)
        self.encoder = nn.Conv2D(64, 8, 1)
        self.decoder = nn.Conv2D(8, 64, 1)
        self.head = AnomalyMapHead.for_image(image_size, (4,)) if image_size else None

    def build_args(self):
        return {"arch": self.arch, "image_size": self.image_size, "toy_noise": self.toy_noise}

    def trainable_parts(self):
        return {"encoder": self.encoder, "decoder": self.decoder}

    def optimizer_groups(self, lr):
        return [OptimizerGroup("encoding", self.encoder.parameters(), lr),
                OptimizerGroup("decoding", self.decoder.parameters(), lr / 10, betas=(0.9, 0.99))]

    def train_inputs(self, images):
        noise = np.random.uniform(-1, 1, size=images.shape).astype(np.float32) * self.toy_noise
        return {"images": images, "noisy": images + paddle.to_tensor(noise)}

    def reconstruct(self, feats):
        return self.decoder(self.encoder(feats))

    def loss_terms(self, inputs, teacher_feats):
        clean = teacher_feats[0]
        noisy = self.teacher_features(inputs["noisy"])[0]
        rebuilt = ((self.reconstruct(clean) - clean) ** 2).mean()
        denoised = ((self.reconstruct(noisy) - clean) ** 2).mean()
        return {"loss": rebuilt + denoised, "rebuilt": rebuilt, "denoised": denoised}

    def forward(self, images):
        feats = self.teacher(images)[0]
        return self.head([feats], [self.reconstruct(feats)])


def register() -> None:
    from model.registry import MODELS
    MODELS["toy"] = ToyModel


@pytest.fixture
def toy_registered():
    """The toy method in this process's registry for one test (its settings class is
    the one built at import, without --toy_noise)."""
    from model.registry import MODELS
    register()
    yield
    MODELS.pop("toy", None)


SCRIPT = f"""
import sys
sys.path[:0] = [{ROOT!r}, {TESTS!r}]
import test_model_contract
test_model_contract.register()
import paddle
# every optimizer step, by group learning rate: what the engine really did
steps = []
real_step = paddle.optimizer.Adam.step
def counting_step(self):
    steps.append(round(float(self.get_lr()), 8))
    return real_step(self)
paddle.optimizer.Adam.step = counting_step
import json, atexit
atexit.register(lambda: print("STEPS " + json.dumps(steps), flush=True))
what, argv = sys.argv[1], sys.argv[2:]
if what == "main":
    from app.command import main
else:
    from deploy.export_command import main
code = main(argv)
sys.stdout.flush()
sys.exit(code)
"""

TINY = ["--data_dir", os.path.join(ROOT, "sample_data"), "--cls", "bottle", "--arch", "resnet18",
        "--image_size", "64", "--teacher_weights", "none", "--batch_size", "1", "--lr", "0.01",
        "--eval_interval", "0", "--log_interval", "1", "--no_report"]


def with_toy(what, *argv):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, what, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    steps = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("STEPS ")]
    return proc, steps[0] if steps else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy"))
    proc, steps = with_toy("main", "--model", "toy", "--toy_noise", "0.25", *TINY, "--epochs", "2",
                           "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, steps


def test_two_groups_step_at_their_own_rates_every_second_batch(trained):
    _, proc, steps = trained
    # 3 training images (1 held out), batch 1: per epoch an update after batch 2 and the
    # unfinished accumulation flushed after batch 3 -> 2 updates x 2 epochs, both groups
    assert steps == [0.01, 0.001] * 4, steps
    assert "x 2 accumulated" in proc.stdout


def test_every_loss_term_is_logged(trained):
    _, proc, _ = trained
    lines = [line for line in proc.stdout.replace("\r", "\n").splitlines() if " step " in line and "loss" in line]
    assert len(lines) == 6  # log_interval 1: one line per batch
    assert all(" rebuilt " in line and " denoised " in line for line in lines), lines[0]
    postfix = proc.stderr.replace("\r", "\n")
    assert "rebuilt=" in postfix and "denoised=" in postfix


def test_checkpoint_records_the_model_its_arguments_and_parts(trained, toy_registered):
    from engine.checkpoint import load_checkpoint

    out, _, _ = trained
    state = load_checkpoint(os.path.join(out, "bottle", "model.pdparams"))
    assert state["model"] == "toy" and state["parts"] == ["encoder", "decoder"]
    assert state["model_args"] == {"arch": "resnet18", "image_size": 64, "toy_noise": 0.25}
    assert "bottleneck" not in state and set(state["encoder"]) == {"weight", "bias"}


def test_eval_rebuilds_the_model_from_its_checkpoint(trained):
    out, train_proc, _ = trained
    trained_metrics = json.load(open(os.path.join(out, "results.json")))["classes"]["bottle"]
    proc, steps = with_toy("main", "--mode", "eval", "--eval_backend", "dygraph", "--no_report", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert steps == []  # evaluation never steps an optimizer
    again = json.load(open(os.path.join(out, "results.json")))["classes"]["bottle"]
    for name in ("pixel_auroc", "sample_auroc", "image_f1"):
        assert again[name] == pytest.approx(trained_metrics[name], abs=1e-6), name
    assert json.load(open(os.path.join(out, "results.json")))["config"]["model"] == "toy"


def test_a_flag_of_another_model_is_refused(trained):
    out, _, _ = trained
    proc, _ = with_toy("main", "--model", "rd4ad", "--toy_noise", "0.3", *TINY, "--epochs", "1",
                       "--output_dir", os.path.join(out, "other"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: --toy_noise: not an option of --model rd4ad (it belongs to toy)"


def test_export_holds_the_trained_parts_and_reloads(trained, tmp_path, toy_registered):
    out, _, _ = trained
    save_dir = str(tmp_path / "export")
    proc, _ = with_toy("export", "--output_dir", out, "--cls", "bottle", "--save_dir", save_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.load(open(os.path.join(save_dir, "deploy.json")))
    assert meta["model"] == "toy" and meta["model_args"]["toy_noise"] == 0.25
    # the exported graph equals the model rebuilt from the checkpoint (here, in this process)
    from deploy.deployment import read_deployment
    from deploy.predictor import PredictorOptions, build_predictor
    from engine.checkpoint import load_trained

    net, _ = load_trained(os.path.join(out, "bottle", "model.pdparams"), conv_backend="paddle")
    assert isinstance(net, ToyModel) and net.toy_noise == 0.25
    images = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    maps, scores = net(paddle.to_tensor(images))
    predictor = build_predictor(read_deployment(save_dir), PredictorOptions(backend="paddle", device="cpu"))
    static_maps, static_scores = predictor(images)
    np.testing.assert_allclose(static_maps, maps.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(static_scores, scores.numpy(), rtol=1e-4, atol=1e-6)
    # a model trained further would differ: the graph really holds the trained parts
    net.decoder.weight.set_value(-net.decoder.weight)
    assert not np.allclose(net(paddle.to_tensor(images))[0].numpy(), static_maps, rtol=1e-3)


def test_training_state_keeps_each_group_under_its_name(tmp_path, toy_registered):
    """save_train_state / restore_train_state with two groups: the next step of a restored
    model equals the original's."""
    from engine.config import BaseConfig
    from engine.feature_cache import EpochBatchSampler
    from engine.train import LossOf, build_optimizers, train_step
    from engine.train_state import _checked_state, restore_train_state, save_train_state
    from utils.safe_pickle import load_plain_pickle

    cfg = BaseConfig(arch="resnet18", image_size=64, output_dir=str(tmp_path), teacher_weights="none")
    cfg = _as_toy(cfg)
    images = paddle.to_tensor(np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32))

    def setup():
        paddle.seed(5)
        net = ToyModel("resnet18", 64, toy_noise=0.25)
        net.train()
        return net, build_optimizers(net, cfg), EpochBatchSampler(4, 2, seed=3)

    def step(net, optimizers):
        np.random.seed(9)
        inputs = net.train_inputs(images)
        return train_step(LossOf(net), optimizers, inputs, net.teacher_features(images), None)

    net, optimizers, sampler = setup()
    step(net, optimizers)
    save_train_state(cfg, "c", epoch=1, net=net, optimizers=optimizers, sampler_rng=sampler.rng,
                     loss_history=[[1.0]])
    raw = load_plain_pickle(cfg.paths.train_state("c"), "training state")
    assert set(raw["optimizers"]) == {"encoding", "decoding"} and raw["parts"] == ["encoder", "decoder"]
    expected = step(net, optimizers)

    net2, optimizers2, sampler2 = setup()
    epoch, history, _ = restore_train_state(_checked_state(raw, "state"), net2, optimizers2, cfg.lr, sampler2.rng)
    assert (epoch, history) == (1, [[1.0]])
    assert step(net2, optimizers2) == expected
    for a, b in zip(net.parameters(), net2.parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _as_toy(cfg):
    """A settings object for the toy model in this process (its option is not a field of
    the Config class built at import): model 'toy', toy_noise as an attribute."""
    import dataclasses

    fields = [("toy_noise", float, dataclasses.field(default=0.25))]
    kind = dataclasses.make_dataclass("ToyConfig", fields, bases=(type(cfg),))
    return kind(**{**dataclasses.asdict(cfg), "model": "toy"})
