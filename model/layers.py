"""Building blocks shared by the bottleneck and the student."""
from __future__ import annotations

import warnings

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

# Paddle warns on every training-mode BatchNorm call that it tracks running statistics,
# which is exactly what we want; keep logs readable.
warnings.filterwarnings("ignore", message="When training, we now always track global mean")
# In an exported static graph relu_ is plain relu, which is what we want there.
warnings.filterwarnings("ignore", message=r"In static graph mode, relu_\(\) is the same as relu\(\)")


class TorchBatchNorm2D(nn.BatchNorm2D):
    """BatchNorm2D whose running variance follows PyTorch's update rule.

    Paddle's fused kernel normalises with the biased batch variance (as torch does) but
    also stores the *biased* variance in the running statistic, while torch stores the
    unbiased one (n / (n - 1)). The reference RD4AD trains with torch's rule, so after
    Paddle's update we rescale the new contribution. Momentum 0.9 in Paddle is torch's 0.1.
    """

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if not self.training or self._use_global_stats:
            return super().forward(x)
        old_variance = self._variance.clone()
        out = super().forward(x)
        n = x.shape[0] * x.shape[2] * x.shape[3]
        if n > 1:
            m = self._momentum
            with paddle.no_grad():
                batch_part = self._variance - old_variance * m
                self._variance.set_value(old_variance * m + batch_part * (float(n) / (n - 1)))
        return out


class InplaceReLU(nn.Layer):
    """ReLU that overwrites its input, as the reference's nn.ReLU(inplace=True).

    Paddle's out-of-place ReLU allocates a fresh tensor per call; on a CPU that was 14x
    slower than in place (8M floats: 13.6 ms vs 1.0 ms) and a sixth of a training step.
    Safe where the input is not needed for backward (after BatchNorm or an addition).
    """

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.relu_(x)


def use_inplace_relu(layer: nn.Layer) -> None:
    """Swap every nn.ReLU under `layer` (e.g. in paddle.vision's ResNet blocks) for InplaceReLU."""
    for sub in layer.sublayers(include_self=True):
        for name, child in list(sub.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(sub, name, InplaceReLU())


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2D:
    return nn.Conv2D(in_ch, out_ch, 3, stride=stride, padding=1, bias_attr=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2D:
    return nn.Conv2D(in_ch, out_ch, 1, stride=stride, bias_attr=False)


def deconv2x2(in_ch: int, out_ch: int, stride: int = 2) -> nn.Conv2DTranspose:
    """Learned 2x upsampling, the student's counterpart of a strided convolution."""
    return nn.Conv2DTranspose(in_ch, out_ch, 2, stride=stride, bias_attr=False)


def reference_init_(layer: nn.Layer) -> None:
    """The reference's initialisation, so training starts from the same distribution.

    Conv2D: kaiming normal (fan_out, relu); BatchNorm: weight 1, bias 0; Conv2DTranspose
    keeps torch's default, uniform(+-1/sqrt(fan_in)) with fan_in = out_channels * k * k
    (torch reads fan_in from dim 1 of a transposed weight [in, out, k, k]).
    """
    for sub in layer.sublayers():
        if isinstance(sub, nn.Conv2DTranspose):
            shape = sub.weight.shape
            bound = 1.0 / (shape[1] * shape[2] * shape[3]) ** 0.5
            sub.weight.set_value(paddle.uniform(shape, min=-bound, max=bound))
        elif isinstance(sub, nn.Conv2D):
            shape = sub.weight.shape
            std = (2.0 / (shape[0] * shape[2] * shape[3])) ** 0.5
            sub.weight.set_value(paddle.randn(shape) * std)
        elif isinstance(sub, nn.BatchNorm2D):
            sub.weight.set_value(paddle.ones(sub.weight.shape))
            sub.bias.set_value(paddle.zeros(sub.bias.shape))
