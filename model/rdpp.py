"""RD++ (Tien et al., CVPR 2023, "Revisiting Reverse Distillation for Anomaly Detection").

RD4AD with a projector between the frozen teacher and OCBE, trained with three more terms,
as the reference codes it (tientrandinh/Revisiting-Reverse-Distillation @7f2ceb7):

- forward: teacher -> projector -> OCBE -> decoder; the anomaly map is RD4AD's, between the
  UNprojected teacher features and the decoder's outputs (evaluation_multi_proj). The
  projector runs at test time, so it is inside every export.
- training input: each image plus a pseudo-anomalous copy (model/pseudo_anomaly.py).
- loss: L_KD + 0.2 (SSOT + 0.01 reconstruction + 0.1 contrast) / 1.11 (Revisit_RDLoss).
- optimisers: Adam for the projector at lr / 5 (1e-3 at the default 5e-3) and Adam for
  OCBE + decoder at lr, betas (0.5, 0.999); two backward passes per step, loss not divided.

SSOT as coded is zero: the reference hands geomloss [N, C*H*W] tensors, which it reads as N
points in C*H*W dimensions, against the same batch permuted, i.e. the same point cloud; the
divergence is about 1e-10 and has no gradient. `ssot="as_coded"` (the default, and what the
published numbers used) keeps that for parity; `ssot="pairwise"` is the evident intent, a
labelled variant: for each pair (i, perm(i)) the Sinkhorn divergence between the two
images' clouds of HW points in C dimensions (each point softmax-normalised over its
channels), batched over pairs.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .arch import get_arch
from .base import OptimizerGroup
from .registry import MODELS
from .loss import cosine_distillation_loss
from .rd4ad import RD4AD
from .pseudo_anomaly import PseudoAnomalies
from .sinkhorn import cost_matrix, epsilon_schedule, sinkhorn_from_costs

# Revisit_RDLoss's settings
KD_WEIGHT_OF_PROJ = 0.2            # main.py --weight_proj
SSOT_W, RECONSTRUCT_W, CONTRAST_W, PROJ_NORM = 1.0, 0.01, 0.1, 1.11
CONTRAST_MARGIN = 0.5
SINKHORN = {"p": 2, "blur": 0.05, "scaling": 0.95, "diameter": 10000000.0}
PROJECTOR_LR_RATIO = 0.2           # the reference's proj_lr 1e-3 beside distill_lr 5e-3
SSOT_CHOICES = ("as_coded", "pairwise")

# The normalisation training images arrive in (dataset.py): noise is added in [0, 1] units.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


class BiasedConv3x3(nn.Layer):
    """A 3x3 convolution with a bias, as torch's nn.Conv2d(bias=True), written as a bias-free
    convolution plus the bias so that model/onednn.py can run the convolution (it takes
    bias-free ones only). Initialised as torch's default: uniform(+-1/sqrt(fan_in))."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        bound = 1.0 / (in_ch * 9) ** 0.5
        init = nn.initializer.Uniform(-bound, bound)
        self.conv = nn.Conv2D(in_ch, out_ch, 3, padding=1, bias_attr=False, weight_attr=init)
        self.bias = self.create_parameter([out_ch], default_initializer=init)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.conv(x) + self.bias.reshape([1, -1, 1, 1])


class InstanceNorm(nn.Layer):
    """torch's nn.InstanceNorm2d defaults: no affine, no running statistics, eps 1e-5."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.instance_norm(x, eps=1e-5)


class ProjLayer(nn.Layer):
    """C -> C/2 -> C/4 -> C/2 -> C: four (3x3 conv with bias, InstanceNorm, LeakyReLU 0.01).
    Sublayer indices follow the reference's nn.Sequential (convolutions at 0, 3, 6, 9)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        widths = [channels, channels // 2, channels // 4, channels // 2, channels]
        layers: list[nn.Layer] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [BiasedConv3x3(c_in, c_out), InstanceNorm(), nn.LeakyReLU(0.01)]
        self.proj = nn.Sequential(*layers)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.proj(x)


class MultiProjectionLayer(nn.Layer):
    """One ProjLayer per teacher scale (the reference's proj_a, proj_b, proj_c)."""

    def __init__(self, channels: tuple[int, int, int]) -> None:
        super().__init__()
        self.proj_a, self.proj_b, self.proj_c = (ProjLayer(c) for c in channels)

    def forward(self, feats: list[paddle.Tensor]) -> list[paddle.Tensor]:
        return [self.proj_a(feats[0]), self.proj_b(feats[1]), self.proj_c(feats[2])]


def reconstruction_loss(a: list[paddle.Tensor], b: list[paddle.Tensor]) -> paddle.Tensor:
    """Sum over scales of mean(1 - cos over channels) (the reference's CosineReconstruct)."""
    return paddle.add_n([paddle.mean(1.0 - F.cosine_similarity(x, y, axis=1, eps=1e-8))
                         for x, y in zip(a, b)])


def contrast_loss(noisy_teacher: list[paddle.Tensor], projected: list[paddle.Tensor],
                  margin: float = CONTRAST_MARGIN) -> paddle.Tensor:
    """Sum over scales of torch's CosineEmbeddingLoss(margin) with target -1 on flattened
    features: mean over the batch of max(0, cos - margin), cos = x.y / sqrt((|x|^2 + 1e-12)
    (|y|^2 + 1e-12)) as torch computes it."""
    terms = []
    for x, y in zip(noisy_teacher, projected):
        x, y = x.flatten(1), y.flatten(1)
        cos = (x * y).sum(1) / paddle.sqrt(((x * x).sum(1) + 1e-12) * ((y * y).sum(1) + 1e-12))
        terms.append(paddle.mean(paddle.clip(cos - margin, min=0.0)))
    return paddle.add_n(terms)


def ssot_loss(projected: list[paddle.Tensor], perm: np.ndarray, mode: str = "as_coded") -> paddle.Tensor:
    """Sum over scales of the Sinkhorn divergence between projected features and the same
    batch permuted by `perm` (geomloss settings of the reference: p 2, blur 0.05, scaling
    0.95, diameter 1e7). as_coded: one cloud of N points in C*H*W dimensions per scale (the
    softmax of each flattened image), the three scales' cost matrices batched into one
    Sinkhorn loop (the same numbers as three calls). pairwise: per scale, a batch of N
    problems, image i's HW points against image perm(i)'s, each point softmax over C."""
    perm_t = paddle.to_tensor(perm, dtype="int64")
    eps_list = epsilon_schedule(SINKHORN["p"], SINKHORN["diameter"], SINKHORN["blur"], SINKHORN["scaling"])
    if mode == "as_coded":
        costs: list[list[paddle.Tensor]] = [[], [], [], []]
        for f in projected:
            x = F.softmax(f.flatten(1), axis=-1).unsqueeze(0)   # [1, N, C*H*W]
            y = paddle.gather(x, perm_t, axis=1)
            for out, (u, v) in zip(costs, ((x, y), (y, x), (x, x), (y, y))):
                out.append(cost_matrix(u, v.detach(), 2))
        return sinkhorn_from_costs(*[paddle.concat(c, axis=0) for c in costs], eps_list).sum()
    if mode == "pairwise":
        total = []
        for f in projected:
            cloud = F.softmax(f.flatten(2).transpose([0, 2, 1]), axis=-1)   # [N, HW, C]
            other = paddle.gather(cloud, perm_t, axis=0)
            costs = [cost_matrix(u, v.detach(), 2)
                     for u, v in ((cloud, other), (other, cloud), (cloud, cloud), (other, other))]
            total.append(sinkhorn_from_costs(*costs, eps_list).sum())
        return paddle.add_n(total)
    raise ValueError(f"ssot {mode!r}: choose one of {', '.join(SSOT_CHOICES)}")


class RDPP(RD4AD):
    """RD++: RD4AD (teacher, OCBE, decoder, anomaly-map head) plus a projector."""

    name = "rdpp"
    # its option (--ssot) is declared on its line in model/registry.py, readable without Paddle
    options = MODELS["rdpp"].options
    grad_accumulation = 2
    needs_images_with_cache = True  # the noisy copy goes through the teacher

    def __init__(self, arch: str = "wide_resnet50_2", image_size: int | None = None,
                 ssot: str = "as_coded") -> None:
        if ssot not in SSOT_CHOICES:
            raise ValueError(f"ssot {ssot!r}: choose one of {', '.join(SSOT_CHOICES)}")
        super().__init__(arch, image_size)
        self.ssot = ssot
        self.projector = MultiProjectionLayer(get_arch(arch).feature_channels)
        self.pseudo_anomalies = PseudoAnomalies(IMAGENET_MEAN, IMAGENET_STD)

    def build_args(self) -> dict[str, Any]:
        return {"arch": self.arch, "image_size": self.image_size, "ssot": self.ssot}

    def trainable_parts(self) -> dict[str, nn.Layer]:
        return {"projector": self.projector, "bottleneck": self.bottleneck, "student": self.student}

    def optimizer_groups(self, lr: float) -> list[OptimizerGroup]:
        def trainable(*layers):
            return [p for layer in layers for p in layer.parameters() if not p.stop_gradient]
        return [OptimizerGroup("projector", trainable(self.projector), lr * PROJECTOR_LR_RATIO),
                OptimizerGroup("distillation", trainable(self.bottleneck, self.student), lr)]

    def trainable_parameters(self) -> list[paddle.Tensor]:
        return [p for g in self.optimizer_groups(1.0) for p in g.parameters]

    def train_inputs(self, images: paddle.Tensor) -> dict[str, paddle.Tensor]:
        patches = self.pseudo_anomalies.normalised_patches(images.shape[0], images.shape[-1])
        return {"images": images, "noisy": images + paddle.to_tensor(patches, dtype=images.dtype)}

    def student_features(self, teacher_feats: list[paddle.Tensor]) -> list[paddle.Tensor]:
        """Projector -> OCBE -> decoder (eval and export run this through RD4AD.forward)."""
        return self.student(self.bottleneck(self.projector(teacher_feats)))

    def loss_terms(self, inputs: dict[str, paddle.Tensor],
                   teacher_feats: list[paddle.Tensor]) -> dict[str, paddle.Tensor]:
        noisy_feats = self.teacher_features(inputs["noisy"])
        n = teacher_feats[0].shape[0]
        projected = self.projector(teacher_feats)
        projected_noisy = self.projector(noisy_feats)
        student_feats = self.student(self.bottleneck(projected))
        student_feats = [s if s.dtype == t.dtype else s.astype(t.dtype)
                         for t, s in zip(teacher_feats, student_feats)]
        kd = cosine_distillation_loss(teacher_feats, student_feats)
        ssot = ssot_loss(projected, np.random.permutation(n), self.ssot)
        reconstruct = reconstruction_loss(projected_noisy, projected)
        contrast = contrast_loss(noisy_feats, projected)
        proj = (SSOT_W * ssot + RECONSTRUCT_W * reconstruct + CONTRAST_W * contrast) / PROJ_NORM
        return {"loss": kd + KD_WEIGHT_OF_PROJ * proj, "kd": kd, "proj": proj, "ssot": ssot,
                "reconstruct": reconstruct, "contrast": contrast}
