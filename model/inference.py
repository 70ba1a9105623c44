"""The deployable pipeline: image batch -> (anomaly map, image score), one Layer."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn

from utils.anomaly import SIGMA, AnomalyMapHead

from .rd4ad import RD4AD

# ResNet feature strides of layer1, layer2, layer3
FEATURE_STRIDES = (4, 8, 16)


class InferenceModel(nn.Layer):
    """teacher (layer1..3) -> bottleneck -> student -> anomaly-map head, for export.

    Input `image` [N, 3, S, S] float32, ImageNet-normalised. Outputs `anomaly_map`
    [N, S, S] (smoothed, as evaluation) and `score` [N] (its maximum).
    """

    def __init__(self, net: RD4AD, image_size: int, sigma: float = SIGMA) -> None:
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size {image_size} must be a multiple of 32")
        self.teacher = net.teacher
        self.bottleneck = net.bottleneck
        self.student = net.student
        self.head = AnomalyMapHead([image_size // s for s in FEATURE_STRIDES], image_size, sigma)
        self.image_size = image_size
        self.eval()

    def forward(self, image: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        teacher_feats = self.teacher(image)
        student_feats = self.student(self.bottleneck(teacher_feats))
        return self.head(teacher_feats, student_feats)


def save_static(model: InferenceModel, path_prefix: str) -> None:
    """paddle.jit.save the whole pipeline: input `image` [N, 3, S, S], any N."""
    size = model.image_size
    spec = [paddle.static.InputSpec([None, 3, size, size], "float32", name="image")]
    paddle.jit.save(paddle.jit.to_static(model, input_spec=spec, full_graph=True), path_prefix)


class PredictorSession:
    """A Paddle Inference predictor of an exported pipeline: images -> (maps, scores)."""

    def __init__(self, config) -> None:
        import paddle.inference as pi

        self.predictor = pi.create_predictor(config)
        self.input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self.outputs = [self.predictor.get_output_handle(n) for n in self.predictor.get_output_names()]

    def __call__(self, images) -> tuple:
        array = images.numpy() if isinstance(images, paddle.Tensor) else images
        self.input.reshape(list(array.shape))
        self.input.copy_from_cpu(np.ascontiguousarray(array, dtype=np.float32))
        self.predictor.run()
        return tuple(h.copy_to_cpu() for h in self.outputs)


class StaticGraphRunner(PredictorSession):
    """The current weights as a Paddle Inference predictor (oneDNN on CPU): evaluation
    runs about 5x faster than the dynamic graph on a 2-core CPU (tools/benchmark.py).
    Build it again after the weights change."""

    def __init__(self, net: RD4AD, image_size: int, threads: int) -> None:
        import tempfile

        import paddle.inference as pi

        self._dir = tempfile.TemporaryDirectory(prefix="rd4ad-static-")
        prefix = f"{self._dir.name}/model"
        save_static(InferenceModel(net, image_size), prefix)
        net.eval()  # InferenceModel put the shared sublayers in eval mode; say so for the caller
        config = pi.Config(prefix + ".json", prefix + ".pdiparams")
        config.disable_glog_info()
        config.disable_gpu()
        config.enable_mkldnn()
        config.set_cpu_math_library_num_threads(threads)
        super().__init__(config)

    def close(self) -> None:
        self._dir.cleanup()
