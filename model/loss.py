"""Training loss: cosine distance between teacher and student features."""
from __future__ import annotations

import paddle

from .anomaly_map import cosine_similarity


def cosine_distillation_loss(teacher_feats: list[paddle.Tensor],
                             student_feats: list[paddle.Tensor]) -> paddle.Tensor:
    """Sum over scales of mean over the batch of 1 - cos(flattened teacher, flattened student).

    Each sample's whole feature map (C*H*W) is one vector, as the reference's
    `loss_fucntion` (torch CosineSimilarity, eps 1e-8), with the anomaly map's
    overflow-free cosine (equal to it for vectors of norm 1e-4 or more).
    """
    terms = [paddle.mean(1.0 - cosine_similarity(t.flatten(1), s.flatten(1), axis=1))
             for t, s in zip(teacher_feats, student_feats)]
    return paddle.add_n(terms)
