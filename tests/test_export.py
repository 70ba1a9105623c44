"""export_model.py -> static graph / ONNX -> infer.py: agreement and files written."""
import csv
import sys
import json
import os

import numpy as np
import paddle
import pytest
from scipy.ndimage import gaussian_filter

import export_model
from conftest import ROOT
import infer
from deploy.deployment import ModelError, read_deployment
from deploy.predictor import PredictorOptions, build_predictor
from report.pictures import layout
from model import build_rd4ad
from engine.checkpoint import save_checkpoint

SIZE = 96  # not a power of two on purpose: feature maps 24, 12, 6
CALIBRATION = {"image_threshold": 1.0, "pixel_threshold": 1.0, "image_low": 0.8, "pixel_low": 0.2,
               "quantile": 0.995, "count": 20, "source": "validation"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    paddle.seed(5)
    net = build_rd4ad("resnet18", teacher_weights="none")
    ckpt = str(root / "bottle" / "model.pdparams")
    stats = {"count": 4, "mean": 1.0, "std": 0.1, "min": 0.9, "max": 1.1, "q99": 1.1, "map_min": 0.5}
    save_checkpoint(ckpt, net, arch="resnet18", image_size=SIZE, epoch=3, cls="bottle",
                    teacher_weights="none", extra={"score_stats": stats, "calibration": CALIBRATION})
    save_dir = str(root / "inference" / "bottle")
    assert export_model.main(["--checkpoint", ckpt, "--save_dir", save_dir, "--onnx"]) == 0
    net.eval()
    return net, save_dir, root


def images(n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)


def predictor(save_dir, **overrides):
    return build_predictor(read_deployment(save_dir), PredictorOptions(**overrides))


def test_export_writes_graph_onnx_and_metadata(exported):
    _, save_dir, _ = exported
    assert sorted(os.listdir(save_dir)) == ["deploy.json", "model.json", "model.onnx", "model.pdiparams"]
    meta = json.load(open(os.path.join(save_dir, "deploy.json")))
    assert (meta["arch"], meta["image_size"], meta["class"]) == ("resnet18", SIZE, "bottle")
    assert meta["outputs"] == ["anomaly_map", "score"] and meta["input"] == "image"
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["score_stats"]["mean"] == 1.0
    assert meta["calibration"] == CALIBRATION  # thresholds travel with the exported model


@pytest.mark.parametrize("mkldnn", [True, False])
def test_static_graph_matches_dynamic_graph(exported, mkldnn):
    net, save_dir, _ = exported
    x = images()
    with paddle.no_grad():
        maps, scores = net(paddle.to_tensor(x))
    runner = predictor(save_dir, enable_mkldnn=mkldnn, cpu_threads=2)
    assert runner.provider == ("cpu oneDNN" if mkldnn else "cpu")  # off is off: Paddle 3 starts with it on
    static_maps, static_scores = runner(x)
    assert static_maps.shape == (3, SIZE, SIZE) and static_scores.shape == (3,)
    np.testing.assert_allclose(static_maps, maps.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(static_scores, scores.numpy(), rtol=1e-4, atol=1e-4)
    # dynamic batch size: one image at a time gives the same answers
    one_map, one_score = predictor(save_dir, enable_mkldnn=mkldnn)(x[1:2])
    np.testing.assert_allclose(one_map[0], static_maps[1], rtol=1e-4, atol=1e-4)


def test_onnxruntime_matches_paddle_inference(exported):
    _, save_dir, _ = exported
    import onnxruntime as ort
    session = ort.InferenceSession(os.path.join(save_dir, "model.onnx"))
    assert [o.name for o in session.get_outputs()] == ["anomaly_map", "score"]
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape == ["N", 3, SIZE, SIZE]
    x = images(seed=1)
    paddle_maps, paddle_scores = predictor(save_dir)(x)
    ort_maps, ort_scores = predictor(save_dir, backend="onnxruntime")(x)
    np.testing.assert_allclose(ort_maps, paddle_maps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ort_scores, paddle_scores, rtol=1e-4, atol=1e-4)


def test_smoothing_in_the_graph_matches_scipy(exported):
    """The graph's map equals scipy.gaussian_filter(sigma 4) of the unsmoothed map that
    numpy computes from the same features."""
    net, save_dir, _ = exported
    x = images(2, seed=2)
    with paddle.no_grad():
        teacher_feats, student_feats = net.features(paddle.to_tensor(x))
    raw = np.zeros((2, SIZE, SIZE))
    for t, s in zip(teacher_feats, student_feats):
        t, s = t.numpy().astype(np.float64), s.numpy().astype(np.float64)
        cos = (t * s).sum(1) / np.maximum(np.linalg.norm(t, axis=1) * np.linalg.norm(s, axis=1), 1e-8)
        up = paddle.nn.functional.interpolate(paddle.to_tensor((1 - cos)[:, None]), size=[SIZE, SIZE],
                                              mode="bilinear", align_corners=True)
        raw += up.numpy()[:, 0]
    expected = np.stack([gaussian_filter(m, sigma=4) for m in raw])
    graph_maps, graph_scores = predictor(save_dir, enable_mkldnn=False)(x)
    np.testing.assert_allclose(graph_maps, expected, atol=1e-5)
    np.testing.assert_allclose(graph_scores, expected.reshape(2, -1).max(1), atol=1e-5)


def test_infer_cli_writes_pictures_csv_and_benchmark(exported, tmp_path):
    _, save_dir, root = exported
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image
    Image.fromarray(np.full((50, 70), 128, np.uint8)).save(folder / "gray.png")  # any size, grayscale
    Image.fromarray(np.zeros((30, 30, 4), np.uint8)).save(folder / "rgba.png")
    (folder / "broken.png").write_bytes(b"not a png")
    out = str(tmp_path / "out")
    # exit 1: every readable image is scored, but the unreadable one is a failure
    assert infer.main(["--model_dir", save_dir, "--image", str(folder), "--output_dir", out,
                       "--benchmark", "True", "--batch_size", "2"]) == 1
    rows = {os.path.basename(r["image"]): r for r in csv.DictReader(open(os.path.join(out, "scores.csv")))}
    assert set(rows) == {"gray.png", "rgba.png", "broken.png"}
    assert "cannot read image" in rows["broken.png"]["error"] and rows["broken.png"]["score"] == ""
    assert float(rows["gray.png"]["score"]) > 0 and "z_score" not in rows["gray.png"]
    for name in ("gray.png", "rgba.png"):  # verdicts and masks at the exported threshold
        score, mask = float(rows[name]["score"]), np.asarray(Image.open(os.path.join(out, "masks", name)))
        assert rows[name]["verdict"] == ("DEFECT" if score > 1.0 else "OK")
        assert float(rows[name]["normalized_score"]) == pytest.approx(
            min(1.0, max(0.0, 0.5 + 0.5 * (score - 1.0) / 0.2)), abs=1e-4)
        assert mask.shape == (SIZE, SIZE) and mask.any() == (rows[name]["verdict"] == "DEFECT")
    picture = Image.open(os.path.join(out, "gray.png"))
    # a loose image: image | ground truth ("no mask") | anomaly map | predicted mask
    assert picture.size == layout(SIZE, SIZE, predicted=True)[1]
    report = json.load(open(os.path.join(out, "benchmark.json")))
    assert report["images"] == 2 and report["inference_ms"] > 0 and report["batch_size"] == 2
    assert report["cpu_rss_mb"] > 0 and report["provider"] == "cpu oneDNN"  # as Paddle Inference's config says


def test_infer_refuses_what_it_cannot_do(exported, tmp_path, capsys):
    _, save_dir, _ = exported
    assert infer.main(["--model_dir", save_dir, "--image", str(tmp_path), "--precision", "int8",
                       "--output_dir", str(tmp_path / "o")]) == 2
    assert "int8" in capsys.readouterr().err
    assert infer.main(["--model_dir", str(tmp_path), "--image", str(tmp_path)]) == 2
    assert "deploy.json: not found" in capsys.readouterr().err


def test_export_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert export_model.main(["--checkpoint", str(tmp_path / "none.pdparams"),
                              "--save_dir", str(tmp_path / "x")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_int8_onnx_export_runs_and_follows_fp32(exported, tmp_path, capsys):
    """ONNX Runtime int8 (post-training quantised on good images) beside fp32."""
    _, save_dir, root = exported
    ckpt = str(root / "bottle" / "model.pdparams")
    int8_dir = str(tmp_path / "int8")
    calib = os.path.join(ROOT, "sample_data", "bottle", "train", "good")
    assert export_model.main(["--checkpoint", ckpt, "--save_dir", int8_dir, "--int8", "--calib_dir", calib]) == 2
    assert "--int8 needs --onnx and --calib_dir" in capsys.readouterr().err
    assert export_model.main(["--checkpoint", ckpt, "--save_dir", int8_dir, "--onnx", "--int8",
                              "--calib_dir", calib]) == 0
    meta = json.load(open(os.path.join(int8_dir, "deploy.json")))
    # and each runtime's int8 score bias, measured on those images (tests/test_precision_auto.py)
    assert meta["onnx_int8"]["calibration_images"] == 4
    biases = meta["onnx_int8"].get("score_bias", {})  # those that held on the check images
    assert set(biases) <= {"onnxruntime", "openvino"}
    assert all(np.isfinite(v) and abs(v) < 0.1 for v in biases.values())
    import onnx
    graph = onnx.load(os.path.join(int8_dir, "model_int8.onnx")).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # really quantised
    x = images(3)
    fp32_maps, _ = predictor(int8_dir, backend="onnxruntime")(x)
    int8_maps, int8_scores = predictor(int8_dir, backend="onnxruntime", precision="int8")(x)
    assert int8_maps.shape == fp32_maps.shape and int8_scores.shape == (3,)
    for a, b in zip(fp32_maps, int8_maps):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9
    # OpenVINO runs the same QDQ graph in int8: near ONNX Runtime's int8, and near fp32
    ov_maps, ov_scores = predictor(int8_dir, backend="openvino", precision="int8")(x)
    assert "OpenVINO" in predictor(int8_dir, backend="openvino", precision="int8").provider
    for a, b in zip(fp32_maps, ov_maps):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9
    np.testing.assert_allclose(ov_scores, int8_scores, rtol=0.05)



def test_openvino_matches_paddle_inference(exported):
    """OpenVINO on model.onnx: the same maps and scores as Paddle Inference, any batch."""
    _, save_dir, _ = exported
    x = images(seed=2)
    paddle_maps, paddle_scores = predictor(save_dir)(x)
    runner = predictor(save_dir, backend="openvino", cpu_threads=2)
    assert runner.provider.startswith("CPU (OpenVINO ") and runner.provider.endswith(", f32)")
    ov_maps, ov_scores = runner(x)
    np.testing.assert_allclose(ov_maps, paddle_maps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ov_scores, paddle_scores, rtol=1e-4, atol=1e-4)
    one_map, one_score = runner(x[2:3])  # the graph's batch dimension stays dynamic
    np.testing.assert_allclose(one_map[0], paddle_maps[2], rtol=1e-4, atol=1e-4)


def test_openvino_refuses_what_it_would_not_honour(exported, monkeypatch):
    from deploy import predictor as predictor_module
    from deploy.predictor import UsageError
    _, save_dir, _ = exported
    with pytest.raises(UsageError, match="runs on the CPU here"):
        predictor(save_dir, backend="openvino", device="gpu")
    with pytest.raises(UsageError, match="fp32, bf16 or int8, not fp16"):
        predictor(save_dir, backend="openvino", precision="fp16")
    monkeypatch.setattr(predictor_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(UsageError, match="no bf16 instructions"):  # OpenVINO would quietly run f32
        predictor(save_dir, backend="openvino", precision="bf16")
    with pytest.raises(ModelError, match="model_int8.onnx"):  # not exported with --int8
        predictor(save_dir, backend="openvino", precision="int8")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(UsageError, match="--backend openvino needs: pip install -r requirements-deploy.txt"):
        predictor(save_dir, backend="openvino")


def test_infer_cli_with_openvino_gives_paddles_rows(exported, tmp_path):
    _, save_dir, _ = exported
    folder = os.path.join(ROOT, "sample_data", "bottle", "test")
    rows = {}
    for backend in ("paddle", "openvino"):
        out = tmp_path / backend
        assert infer.main(["--model_dir", save_dir, "--image", folder, "--output_dir", str(out),
                           "--backend", backend, "--save_images", "False"]) == 0
        rows[backend] = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows["paddle"]) == len(rows["openvino"]) > 0
    for a, b in zip(rows["paddle"], rows["openvino"]):
        assert (a["image"], a["verdict"]) == (b["image"], b["verdict"])
        assert float(a["score"]) == pytest.approx(float(b["score"]), abs=1e-4)

class FakeTimes:
    """AutoLog's Times protocol (auto_log/utils.py): start(), one stamp() per time key, end()."""

    def __init__(self, keys):
        self.keys, self.batches, self.stamps = keys, [], None

    def start(self):
        assert self.stamps is None, "start() twice without end()"
        self.stamps = []

    def stamp(self):
        assert self.stamps is not None, "stamp() outside start()/end()"
        self.stamps.append(self.keys[len(self.stamps) % len(self.keys)])

    def end(self, stamp=False):
        assert self.stamps == self.keys, f"a batch stamped {self.stamps}, not {self.keys}"
        self.batches.append(self.stamps)
        self.stamps = None


def fake_auto_log(created):
    class AutoLogger:
        def __init__(self, **kwargs):
            self.kwargs, self.times, self.reports = kwargs, FakeTimes(list(kwargs["time_keys"])), 0
            created.append(self)

        def report(self):
            self.reports += 1
            print(f"fake auto_log: {len(self.times.batches)} batches")
    return type(sys)("auto_log"), AutoLogger


def test_infer_benchmark_reports_through_auto_log_when_installed(exported, tmp_path, monkeypatch, capsys):
    _, save_dir, _ = exported
    created = []
    module, module.AutoLogger = fake_auto_log(created)
    monkeypatch.setitem(sys.modules, "auto_log", module)
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(folder / name)
    out = tmp_path / "out"
    assert infer.main(["--model_dir", save_dir, "--image", str(folder), "--output_dir", str(out),
                       "--benchmark", "True", "--batch_size", "2"]) == 0
    [logger] = created
    assert logger.reports == 1 and len(logger.times.batches) == 2  # 3 images in batches of 2
    assert logger.kwargs["model_precision"] == "fp32" and logger.kwargs["data_shape"] == [2, 3, SIZE, SIZE]
    assert logger.kwargs["time_keys"] == ["preprocess_time", "inference_time", "postprocess_time"]
    printed = capsys.readouterr().out
    assert "fake auto_log: 2 batches" in printed and "Env info" not in printed  # AutoLog's report, not ours
    assert json.load(open(out / "benchmark.json"))["images"] == 3


def test_a_broken_auto_log_install_falls_back_to_our_lines(exported, tmp_path, monkeypatch, capsys):
    _, save_dir, _ = exported
    package = tmp_path / "site" / "auto_log"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "auto_log", raising=False)
    from PIL import Image
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(tmp_path / "one.png")
    assert infer.main(["--model_dir", save_dir, "--image", str(tmp_path / "one.png"),
                       "--output_dir", str(tmp_path / "out"), "--benchmark", "True"]) == 0
    captured = capsys.readouterr()
    assert "auto_log is installed but cannot be imported" in captured.err
    assert "inference_time(ms)" in captured.out and "Env info" in captured.out


def test_saving_again_follows_the_weights_and_converts_once():
    """An evaluation with a predictor saves the current weights through the one static
    conversion of the model (converting again at every save kept another program alive)."""
    from deploy.predictor import StaticGraphRunner
    from model import build_rd4ad
    paddle.seed(0)
    net = build_rd4ad("resnet18", teacher_weights="none", image_size=64)
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    first = StaticGraphRunner(net, threads=1)
    first_scores = first(x)[1]
    first.close()
    static_forward = net.forward
    with paddle.no_grad():
        for param in net.trainable_parameters():
            param.set_value(param * 1.5)
    second = StaticGraphRunner(net, threads=1)
    maps, scores = second(x)
    second.close()
    assert net.forward is static_forward
    fresh = build_rd4ad("resnet18", teacher_weights="none", image_size=64)  # never converted
    fresh.set_state_dict(net.state_dict())
    fresh.eval()
    with paddle.no_grad():
        fresh_maps, fresh_scores = (t.numpy() for t in fresh(paddle.to_tensor(x)))
    np.testing.assert_allclose(maps, fresh_maps, atol=1e-4)
    np.testing.assert_allclose(scores, fresh_scores, atol=1e-4)
    assert np.abs(scores - first_scores).max() > 1e-3  # the weights did change the scores
