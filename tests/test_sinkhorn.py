"""model/sinkhorn.py against geomloss's SamplesLoss("sinkhorn", debias=True, tensorized).

The committed fixture (tests/make_rdpp_fixture.py) holds geomloss's values and gradients on
four cases, so this runs without torch; the live test compares with geomloss itself where
torch and geomloss are installed. RD++'s SSOT as coded (a batch against itself permuted)
is exactly the property checked last: the same cloud, a zero divergence, no gradient.
"""
import os

import numpy as np
import paddle
import pytest

from model.rdpp import SINKHORN, ssot_loss
from model.sinkhorn import epsilon_schedule, sinkhorn_divergence

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "parity_rdpp_resnet18.npz")


def ours(x, y, scaling, diameter, dtype="float64"):
    px = paddle.to_tensor(np.asarray(x, dtype), stop_gradient=False)
    py = paddle.to_tensor(np.asarray(y, dtype), stop_gradient=False)
    value = sinkhorn_divergence(px, py, p=2, blur=0.05, scaling=scaling, diameter=diameter or None)
    value.sum().backward()
    return value.numpy(), px.grad.numpy(), py.grad.numpy()


@pytest.mark.parametrize("case", range(4))
def test_matches_geomloss_fixture(case):
    ref = np.load(FIXTURE)
    key = f"sinkhorn{case}_"
    value, gx, gy = ours(ref[key + "x"], ref[key + "y"], float(ref[key + "scaling"]), float(ref[key + "diameter"]))
    np.testing.assert_allclose(value, ref[key + "value"], rtol=1e-10, atol=1e-14)
    for got, want in ((gx, ref[key + "grad_x"]), (gy, ref[key + "grad_y"])):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12 * max(1.0, np.abs(want).max()))


def test_matches_geomloss_live():
    torch = pytest.importorskip("torch")
    geomloss = pytest.importorskip("geomloss")
    rng = np.random.default_rng(3)
    for dtype, rtol in (("float64", 1e-10), ("float32", 1e-4)):
        x = rng.normal(size=(3, 20, 6)).astype(dtype) * 0.5
        y = (rng.normal(size=(3, 25, 6)) * 0.5 + 0.2).astype(dtype)
        loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, diameter=1e7, scaling=0.95, backend="tensorized")
        tx, ty = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
        want = loss(tx, ty)
        want.sum().backward()
        value, gx, gy = ours(x, y, 0.95, 1e7, dtype)
        np.testing.assert_allclose(value, want.detach().numpy(), rtol=rtol)
        np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=rtol * 10, atol=rtol * np.abs(gx).max())
        np.testing.assert_allclose(gy, ty.grad.numpy(), rtol=rtol * 10, atol=rtol * np.abs(gy).max())


def test_epsilon_schedule_is_geomlosss():
    """diameter^p first, blur^p last, geometric steps of scaling^p between: RD++'s settings
    (diameter 1e7, blur 0.05, scaling 0.95) give 375 temperatures."""
    eps = epsilon_schedule(SINKHORN["p"], SINKHORN["diameter"], SINKHORN["blur"], SINKHORN["scaling"])
    assert eps[0] == 1e14 and eps[-1] == pytest.approx(0.0025) and len(eps) == 375
    ratios = np.array(eps[2:-1]) / np.array(eps[1:-2])
    np.testing.assert_allclose(ratios, 0.95 ** 2, rtol=1e-9)


def test_divergence_of_a_cloud_with_itself_is_zero_and_positive_otherwise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 10, 3))
    value, gx, _ = ours(x, x[:, ::-1], 0.5, None)      # same points, other order
    assert np.abs(value).max() < 1e-12 and np.abs(gx).max() < 1e-10
    value, _, _ = ours(x, x + 1.0, 0.5, None)           # shifted by (1, 1, 1): about |d|^2 / 2
    assert np.all(value > 1.0) and np.all(value < 1.6)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="clouds"):
        sinkhorn_divergence(paddle.ones([2, 4, 3]), paddle.ones([2, 4, 5]))


def test_ssot_as_coded_is_zero_and_pairwise_is_not():
    """The reference's SSOT reads a batch [N, C*H*W] as N points: against the same batch
    permuted, that is one cloud, so the term is 0 with no gradient. The pairwise variant
    compares each image's HW points with another image's: positive, with a gradient."""
    rng = np.random.default_rng(1)
    feats = [paddle.to_tensor(rng.normal(size=(4, c, s, s)), stop_gradient=False) for c, s in ((8, 4), (16, 2), (32, 1))]
    perm = np.array([2, 0, 3, 1])
    as_coded = ssot_loss(feats, perm, "as_coded")
    as_coded.backward()
    assert abs(float(as_coded)) < 1e-12
    assert all(f.grad is None or np.abs(f.grad.numpy()).max() < 1e-12 for f in feats)
    for f in feats:
        f.clear_gradient()
    pairwise = ssot_loss(feats, perm, "pairwise")
    pairwise.backward()
    assert float(pairwise) > 1e-4 and np.abs(feats[0].grad.numpy()).max() > 1e-6
    with pytest.raises(ValueError, match="ssot"):
        ssot_loss(feats, perm, "other")
