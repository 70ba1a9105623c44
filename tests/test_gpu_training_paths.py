"""GPU and multi-process training paths, checked on the CPU: ranks agree before stopping,
a CPU group uses gloo, the cache budget is shared, --amp's scaler state survives a resume,
train_all maps --devices through CUDA_VISIBLE_DEVICES. (No GPU runs here: what needs one
is checked by reading Paddle's source; doc/gpu.md.)"""
import os
import sys

import numpy as np
import paddle
import pytest

from conftest import ROOT
from engine import train
from utils import distributed
from utils.config import ConfigError

sys.path.insert(0, os.path.join(ROOT, "tools"))
import train_all  # noqa: E402


def test_ranks_agree_before_any_stops(monkeypatch):
    seen = {}

    def all_reduce(tensor, op=None):  # another rank reports a NaN loss
        seen["op"] = op
        tensor.set_value(paddle.to_tensor([0], dtype="int32"))

    monkeypatch.setattr(paddle.distributed, "all_reduce", all_reduce)
    two = distributed.Context(rank=0, world_size=2)
    assert distributed.all_true(two, True) is False and seen["op"] == paddle.distributed.ReduceOp.MIN
    assert distributed.all_true(distributed.Context(), True) is True  # alone: no collective


def test_a_finite_loss_elsewhere_still_stops_every_rank(monkeypatch):
    """train_step raises on this rank too when another rank's loss was not finite."""
    net = paddle.nn.Linear(2, 2)
    optimizer = paddle.optimizer.Adam(parameters=net.parameters())
    monkeypatch.setattr(distributed, "all_true", lambda ctx, flag: False)
    monkeypatch.setattr(train, "cosine_distillation_loss", lambda t, s: (s[0] ** 2).mean())
    before = net.weight.numpy().copy()
    with pytest.raises(train.TrainingDiverged):
        train.train_step(lambda feats: [net(feats[0])], optimizer, [paddle.ones([1, 2])], None,
                         ctx=distributed.Context(0, 2))
    np.testing.assert_array_equal(net.weight.numpy(), before)  # no update on any rank


def test_a_cpu_group_uses_gloo(monkeypatch):
    import paddle.distributed as dist

    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    monkeypatch.delenv("PADDLE_DISTRI_BACKEND", raising=False)
    backends = []
    monkeypatch.setattr(dist, "init_parallel_env", lambda: backends.append(os.environ.get("PADDLE_DISTRI_BACKEND")))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert distributed.init(cpu=True) == distributed.Context(1, 2) and backends == ["gloo"]
    monkeypatch.delenv("PADDLE_DISTRI_BACKEND")
    distributed.init(cpu=False)
    assert backends[-1] is None  # on GPUs Paddle's own choice (NCCL)


def test_the_cache_budget_is_shared_by_the_local_ranks(monkeypatch):
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "4")
    assert distributed.local_world_size() == 4
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "x")
    assert distributed.local_world_size() == 1


def test_the_amp_scaler_state_travels_as_json():
    class Scaler:  # a GPU GradScaler's state_dict, as Paddle 3.3.1 returns it
        def state_dict(self):
            return {"scale": np.array([1024.0], dtype=np.float32), "incr_ratio": 2.0, "decr_ratio": 0.5,
                    "incr_every_n_steps": 1000, "decr_every_n_nan_or_inf": 2, "incr_count": 17,
                    "decr_count": 0, "use_dynamic_loss_scaling": True}

    import json

    state = json.loads(json.dumps(train.scaler_state(Scaler())))
    assert state["scale"] == [1024.0] and state["incr_count"] == 17
    assert train.scaler_state(None) == {}
    assert "conv2d_transpose" in train.AMP_WHITE_LIST


def test_train_all_maps_devices_through_cuda_visible_devices():
    assert train_all.visible_device("0", "2,3") == "2" and train_all.visible_device("1", "2,3") == "3"
    assert train_all.visible_device("1", "") == "1"  # nothing hidden: the id itself
    with pytest.raises(ConfigError, match="numbered 0..1"):
        train_all.visible_device("2", "2,3")
