"""The contract between a method under model/ and engine/ (issue 24 §1; doc/pipeline.md).

A method is one file under model/ with one AnomalyModel subclass, and one line in
model/registry.py. The engine trains, checkpoints, evaluates and exports it knowing only
what it declares here: its trainable parts (saved under their keys), its optimizer groups
(one optimizer each, its own learning rate), its training-time input transform, what of
the teacher may be cached, its loss as named terms, and one eval forward (anomaly maps,
scores) that export saves whole. No loss formula and no part name lives in engine/.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import paddle
import paddle.nn as nn

from utils.runtime import eager_threads

from .onednn import use_conv_backend
from .registry import ModelOption  # noqa: F401  (re-exported: the contract's names in one place)
from .teacher import load_teacher_weights


@dataclass
class OptimizerGroup:
    """Parameters that one optimizer updates at one learning rate; `name` keys the
    optimizer's state in training states and appears in logs."""
    name: str
    parameters: list[paddle.Tensor]
    lr: float
    betas: tuple[float, float] = (0.5, 0.999)


class AnomalyModel(nn.Layer):
    """Base of every method. Subclasses set `name`, build `self.teacher` (frozen) in
    __init__(arch, image_size, **options) and implement the methods marked below."""

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, ModelOption]] = {}
    # backward passes per optimizer step; the loss is NOT divided by it (as the reference RD++)
    grad_accumulation: ClassVar[int] = 1
    # False: loss_terms reads nothing of `inputs` beyond the teacher's features, so when
    # those are cached the engine need not decode the training images at all (RD4AD).
    needs_images_with_cache: ClassVar[bool] = True

    teacher: nn.Layer

    def build_args(self) -> dict[str, Any]:
        """JSON values with which MODELS[self.name](**build_args()) rebuilds this
        architecture: arch, image_size and every option."""
        raise NotImplementedError

    def trainable_parts(self) -> dict[str, nn.Layer]:
        """Checkpoint / training-state key -> layer: what trains, saved and restored by
        the engine under these keys."""
        raise NotImplementedError

    def optimizer_groups(self, lr: float) -> list[OptimizerGroup]:
        """One optimizer per group; `lr` is the --lr setting."""
        raise NotImplementedError

    def train_inputs(self, images: paddle.Tensor) -> dict[str, paddle.Tensor]:
        """The training-time input transform of a normalised batch [N, 3, S, S]; the key
        "images" is what teacher_features (and the feature cache) see."""
        return {"images": images}

    @paddle.no_grad()
    def teacher_features(self, images: paddle.Tensor) -> list[paddle.Tensor]:
        """The frozen teacher's output for inputs["images"]: the only thing the engine
        may cache (computed once per training image)."""
        return self.teacher(images)

    def loss_terms(self, inputs: dict[str, paddle.Tensor],
                   teacher_feats: list[paddle.Tensor]) -> dict[str, paddle.Tensor]:
        """Named scalar terms, each logged; "loss" is the total that is back-propagated.
        Only the model's own layers may be used (the engine may call this through a
        wrapper Layer, e.g. paddle.DataParallel)."""
        raise NotImplementedError

    def train(self) -> "AnomalyModel":
        # The teacher is frozen: its BatchNorm must keep ImageNet statistics.
        super().train()
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[paddle.Tensor]:
        """Every parameter of every optimizer group (lr unused)."""
        return [p for group in self.optimizer_groups(1.0) for p in group.parameters]


def prepared(net: AnomalyModel, teacher_weights: str, conv_backend: str) -> AnomalyModel:
    """`net` with its teacher's weights loaded ("imagenet", "none" or a .pdparams path)
    and its dynamic-graph convolutions on `conv_backend` (model/onednn.py)."""
    load_teacher_weights(net.teacher, teacher_weights)
    net.conv_backend = use_conv_backend(net, conv_backend, eager_threads())
    return net
