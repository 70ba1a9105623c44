"""Debiased Sinkhorn divergence between point clouds, as geomloss's tensorized backend.

geomloss.SamplesLoss("sinkhorn", p, blur, diameter, scaling, debias=True) with uniform
weights, without a `reach` (balanced OT): log-domain Sinkhorn iterations with epsilon
scaling (geomloss's epsilon_schedule), symmetric averaged updates for OT(a, b), OT(a, a)
and OT(b, b), the loop without gradients, one last extrapolation step through which the
gradient flows (the potentials' inputs detached, the cost matrices not), and
S = <a, f_ba - f_aa> + <b, g_ab - g_bb>. The cost is |x - y|^2 / 2 (p = 2) or |x - y|
(p = 1), computed as geomloss does (|x|^2 - 2 x.y + |y|^2). Checked against geomloss
itself in tests/test_sinkhorn.py.
"""
from __future__ import annotations

import numpy as np
import paddle


def epsilon_schedule(p: int, diameter: float, blur: float, scaling: float) -> list[float]:
    """geomloss's temperatures: diameter^p, then geometric steps down to blur^p."""
    steps = np.arange(p * np.log(diameter), p * np.log(blur), p * np.log(scaling))
    return [diameter ** p] + [float(np.exp(e)) for e in steps] + [blur ** p]


def _squared_distances(x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    """[B, N, M] |x_i - y_j|^2 in geomloss's form (not clamped: it may dip below 0)."""
    xx = (x * x).sum(-1).unsqueeze(2)
    yy = (y * y).sum(-1).unsqueeze(1)
    return xx - 2 * paddle.matmul(x, y, transpose_y=True) + yy


def cost_matrix(x: paddle.Tensor, y: paddle.Tensor, p: int) -> paddle.Tensor:
    if p == 2:
        return _squared_distances(x, y) / 2
    if p == 1:
        return paddle.sqrt(paddle.clip(_squared_distances(x, y), min=1e-8))
    raise ValueError(f"Sinkhorn cost p={p}: only 1 and 2 are implemented")


def _softmin(eps: float, cost: paddle.Tensor, h: paddle.Tensor) -> paddle.Tensor:
    """-eps log sum_j exp(h_j - C_ij / eps): [B, N] from C [B, N, M] and h [B, M]."""
    return -eps * paddle.logsumexp(h.unsqueeze(1) - cost / eps, axis=2)


def _max_diameter(x: paddle.Tensor, y: paddle.Tensor) -> float:
    d = x.shape[-1]
    both = paddle.concat([x.reshape([-1, d]), y.reshape([-1, d])], axis=0)
    return float(paddle.linalg.norm(both.max(0) - both.min(0)))


def sinkhorn_divergence(x: paddle.Tensor, y: paddle.Tensor, p: int = 2, blur: float = 0.05,
                        scaling: float = 0.5, diameter: float | None = None) -> paddle.Tensor:
    """Debiased Sinkhorn divergence between uniform clouds x [B, N, D] and y [B, M, D]
    (one value per batch entry, [B]); [N, D] and [M, D] give a scalar, as geomloss."""
    single = x.ndim == 2
    if single:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.ndim != 3 or y.ndim != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"Sinkhorn: clouds [B, N, D] and [B, M, D] expected, got {x.shape} and {y.shape}")
    if diameter is None:
        diameter = _max_diameter(x.detach(), y.detach())
    eps_list = epsilon_schedule(p, diameter, blur, scaling)
    value = sinkhorn_from_costs(cost_matrix(x, y.detach(), p), cost_matrix(y, x.detach(), p),
                                cost_matrix(x, x.detach(), p), cost_matrix(y, y.detach(), p), eps_list)
    return value[0] if single else value


def sinkhorn_from_costs(c_xy: paddle.Tensor, c_yx: paddle.Tensor, c_xx: paddle.Tensor,
                        c_yy: paddle.Tensor, eps_list: list[float]) -> paddle.Tensor:
    """[B] debiased divergences from the four cost matrices C(x, y) [B, N, M], C(y, x),
    C(x, x), C(y, y), each built with its second argument detached, as geomloss does; the
    gradient reaches x and y through them. Uniform weights.

    The four problems (a -> b, b -> a, a -> a, b -> b) are updated together; when N == M
    their matrices are stacked into one batch, so each iteration is one softmin (the same
    numbers as geomloss's four calls: every row is computed alone)."""
    batch, n, m = c_xy.shape
    # uniform weights and their logs, as geomloss's (a = ones / N, a.log())
    a = paddle.full([batch, n], 1.0 / n, dtype=c_xy.dtype)
    b = paddle.full([batch, m], 1.0 / m, dtype=c_xy.dtype)
    a_log, b_log = paddle.log(a), paddle.log(b)
    costs = [c_xy, c_yx, c_xx, c_yy]
    logs = [b_log, a_log, a_log, b_log]       # the weights each softmin sums over
    stacked = n == m

    def softmins(eps: float, mats, hs: list[paddle.Tensor]) -> list[paddle.Tensor]:
        if stacked:
            return list(paddle.split(_softmin(eps, mats, paddle.concat(hs, axis=0)), 4, axis=0))
        return [_softmin(eps, c, h) for c, h in zip(mats, hs)]

    with paddle.no_grad():
        mats = paddle.concat([c.detach() for c in costs], axis=0) if stacked else [c.detach() for c in costs]
        eps = eps_list[0]
        f_ba, g_ab, f_aa, g_bb = softmins(eps, mats, logs)
        for eps in eps_list:
            ft_ba, gt_ab, ft_aa, gt_bb = softmins(eps, mats, [
                b_log + g_ab / eps, a_log + f_ba / eps, a_log + f_aa / eps, b_log + g_bb / eps])
            f_ba, g_ab = 0.5 * (f_ba + ft_ba), 0.5 * (g_ab + gt_ab)
            f_aa, g_bb = 0.5 * (f_aa + ft_aa), 0.5 * (g_bb + gt_bb)
        last = [b_log + g_ab / eps, a_log + f_ba / eps, a_log + f_aa / eps, b_log + g_bb / eps]

    # The last extrapolation: the gradient flows through the cost matrices only.
    mats = paddle.concat(costs, axis=0) if stacked else costs
    f_ba, g_ab, f_aa, g_bb = softmins(eps, mats, last)
    return (a * (f_ba - f_aa)).sum(1) + (b * (g_ab - g_bb)).sum(1)
