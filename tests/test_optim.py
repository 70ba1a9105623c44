"""The optimizer main.py uses (merged Adam kernel) updates exactly as plain Adam does."""
import numpy as np
import paddle

from model import build_rd4ad
from model.loss import cosine_distillation_loss
from engine.optim import build_optimizer


def test_merged_adam_equals_per_parameter_adam():
    trained = []
    for merged in (True, False):
        paddle.seed(7)
        net = build_rd4ad("resnet18", teacher_weights="none")
        net.train()
        params = net.trainable_parameters()
        if merged:
            optimizer = build_optimizer(params, 0.005, 0.5, 0.999)
            assert optimizer._use_multi_tensor
        else:
            optimizer = paddle.optimizer.Adam(learning_rate=0.005, beta1=0.5, beta2=0.999, parameters=params)
        images = paddle.to_tensor(np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32))
        # One step: later steps amplify float32 ReLU flips (see test_parity.py).
        cosine_distillation_loss(*net(images)).backward()
        optimizer.step()
        trained.append({k: v.numpy() for k, v in net.student.state_dict().items()})
    for key, value in trained[0].items():
        np.testing.assert_allclose(value, trained[1][key], rtol=1e-6, atol=1e-7, err_msg=key)
