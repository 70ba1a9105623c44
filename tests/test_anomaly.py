"""Anomaly map against a direct numpy formula; smoothing against scipy; loss formula."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from scipy.ndimage import gaussian_filter

from model.anomaly_map import AnomalyMapHead, bilinear_matrix, gaussian_matrix, image_scores
from model.loss import cosine_distillation_loss


def numpy_bilinear_align_corners(img, out_h, out_w):
    """Textbook bilinear resampling with align_corners=True, one output pixel at a time."""
    h, w = img.shape
    out = np.empty((out_h, out_w))
    for i in range(out_h):
        y = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = min(int(np.floor(y)), h - 2) if h > 1 else 0
        dy = y - y0
        for j in range(out_w):
            x = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = min(int(np.floor(x)), w - 2) if w > 1 else 0
            dx = x - x0
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            out[i, j] = ((1 - dy) * (1 - dx) * img[y0, x0] + (1 - dy) * dx * img[y0, x1]
                         + dy * (1 - dx) * img[y1, x0] + dy * dx * img[y1, x1])
    return out


def anomaly_map(teacher_feats, student_feats, out_size, smooth=True):
    """The model's head, built for these features' sizes."""
    head = AnomalyMapHead([tuple(t.shape[-2:]) for t in teacher_feats], out_size, smooth=smooth)
    return head(teacher_feats, student_feats)[0]


def numpy_anomaly_map(teacher, student, size):
    """sum_scales upsample(1 - cos over channels), then gaussian_filter(sigma=4), per image."""
    maps = []
    for n in range(teacher[0].shape[0]):
        total = np.zeros((size, size))
        for t, s in zip(teacher, student):
            t, s = t[n].astype(np.float64), s[n].astype(np.float64)
            cos = (t * s).sum(0) / np.maximum(np.linalg.norm(t, axis=0) * np.linalg.norm(s, axis=0), 1e-8)
            total += numpy_bilinear_align_corners(1 - cos, size, size)
        maps.append(gaussian_filter(total, sigma=4))
    return np.stack(maps)


def random_feats(seed, shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


def test_anomaly_map_matches_numpy_formula():
    shapes = [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4)]
    teacher, student = random_feats(0, shapes), random_feats(1, shapes)
    ours = anomaly_map([paddle.to_tensor(t) for t in teacher],
                       [paddle.to_tensor(s) for s in student], 64).numpy()
    expected = numpy_anomaly_map(teacher, student, 64)
    assert ours.shape == (2, 64, 64)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    scores = image_scores(paddle.to_tensor(ours)).numpy()
    np.testing.assert_allclose(scores, expected.reshape(2, -1).max(1), rtol=1e-5)


def test_identical_features_give_a_zero_map():
    feats = [paddle.to_tensor(f) for f in random_feats(2, [(1, 4, 8, 8), (1, 8, 4, 4), (1, 8, 2, 2)])]
    assert float(paddle.abs(anomaly_map(feats, feats, 32, smooth=False)).max()) < 1e-5


@pytest.mark.parametrize("h,w", [(64, 64), (128, 96), (20, 33), (7, 5)])
def test_gaussian_smoothing_matches_scipy(h, w):
    # 7x5 is smaller than the kernel radius (16): scipy reflects repeatedly, so must we.
    x = np.random.default_rng(h * w).random((3, h, w))
    ours = gaussian_matrix(h) @ x @ gaussian_matrix(w).T  # what the head folds into its matrices
    expected = np.stack([gaussian_filter(m, sigma=4) for m in x])
    np.testing.assert_allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("src,dst", [((8, 6), (64, 40)), ((4, 4), (128, 128)), ((16, 16), (16, 16))])
def test_bilinear_matrix_matches_paddle_interpolate(src, dst):
    x = np.random.default_rng(0).random((2, 1) + src).astype(np.float32)
    ref = F.interpolate(paddle.to_tensor(x), size=list(dst), mode="bilinear", align_corners=True).numpy()
    ours = bilinear_matrix(src[0], dst[0]) @ x[:, 0] @ bilinear_matrix(src[1], dst[1]).T
    np.testing.assert_allclose(ours, ref[:, 0], atol=1e-6)


def test_loss_is_sum_over_scales_of_flattened_cosine_distance():
    shapes = [(3, 4, 8, 8), (3, 8, 4, 4), (3, 16, 2, 2)]
    teacher, student = random_feats(3, shapes), random_feats(4, shapes)
    expected = 0.0
    for t, s in zip(teacher, student):
        t, s = t.reshape(3, -1).astype(np.float64), s.reshape(3, -1).astype(np.float64)
        cos = (t * s).sum(1) / (np.linalg.norm(t, axis=1) * np.linalg.norm(s, axis=1))
        expected += np.mean(1 - cos)
    loss = cosine_distillation_loss([paddle.to_tensor(t) for t in teacher],
                                    [paddle.to_tensor(s) for s in student])
    assert loss.shape == [] or list(loss.shape) == []
    assert abs(float(loss) - expected) < 1e-5
    same = cosine_distillation_loss([paddle.to_tensor(t) for t in teacher],
                                    [paddle.to_tensor(t * 2.5) for t in teacher])
    assert abs(float(same)) < 1e-5  # scale-invariant: only direction matters
