"""Low precision judged on the exported model (deploy/precision.py): export_model.py
--check_dir records each bf16 / int8 path against fp32 in deploy.json, and infer.py
--precision auto takes the fastest path that kept every verdict."""
import csv
import json
import os

import numpy as np
import paddle
import pytest

import export_model
import infer
from conftest import ROOT
from deploy.deployment import read_deployment
from deploy.precision import PrecisionCheck, choose_path
from deploy.predictor import PredictorOptions, build_predictor, cpu_has_bf16
from engine.checkpoint import save_checkpoint
from model import build_rd4ad

SIZE = 64
TEST_DIR = os.path.join(ROOT, "sample_data", "bottle", "test")
GOOD_DIR = os.path.join(ROOT, "sample_data", "bottle", "train", "good")


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """An export judged on the sample test images, its threshold at the median fp32 score
    so that verdicts split (a threshold below every score would hide any change)."""
    root = tmp_path_factory.mktemp("judged")
    paddle.seed(3)
    net = build_rd4ad("resnet18", teacher_weights="none")
    ckpt = str(root / "bottle" / "model.pdparams")
    first = str(root / "first")

    def save(threshold):
        calibration = {"image_threshold": threshold, "pixel_threshold": threshold, "image_low": threshold - 0.1,
                       "pixel_low": 0.1, "quantile": 0.995, "count": 4, "source": "validation"}
        save_checkpoint(ckpt, net, arch="resnet18", image_size=SIZE, epoch=1, cls="bottle", teacher_weights="none",
                        extra={"calibration": calibration})
    save(1.0)
    assert export_model.main(["--checkpoint", ckpt, "--save_dir", first]) == 0
    scores = scores_of(first, "fp32")
    save(float(np.median(scores)))
    save_dir = str(root / "inference")
    assert export_model.main(["--checkpoint", ckpt, "--save_dir", save_dir, "--onnx", "--int8", "--calib_dir",
                              GOOD_DIR, "--check_dir", TEST_DIR]) == 0
    return save_dir, root


def scores_of(model_dir, precision, backend="paddle"):
    from dataset import index_test_dir, load_image
    images = np.stack([load_image(s.image_path, SIZE) for s in index_test_dir(TEST_DIR, None)])
    predictor = build_predictor(read_deployment(model_dir), PredictorOptions(backend=backend, precision=precision))
    return np.concatenate([predictor(image[None])[1] for image in images])


def test_the_export_records_every_path_that_runs_here(judged):
    save_dir, _ = judged
    checks = json.load(open(os.path.join(save_dir, "deploy.json")))["precision_checks"]
    paths = [(c["backend"], c["precision"], c["recheck_band"] is not None) for c in checks]
    expected = [("paddle", "fp32", False), ("openvino", "int8", False), ("onnxruntime", "int8", False)]
    if cpu_has_bf16():
        expected += [("openvino", "bf16", False), ("paddle", "bf16", False)]
    expected += [("openvino", "fp32", False), ("onnxruntime", "fp32", False),
                 ("openvino", "int8", True), ("onnxruntime", "int8", True)]  # int8 rechecked in fp32
    assert paths == expected
    baseline = checks[0]
    assert baseline["images"] == 10 and baseline["min_pearson"] == 1.0 and baseline["verdict_changes"] == 0
    assert all(c["ms_per_image"] > 0 and c["verdict_changes"] is not None for c in checks)
    for fp32 in checks[-4:-2]:  # the other runtimes' fp32 computes what Paddle's does
        assert fp32["min_pearson"] > 0.9999 and fp32["verdict_changes"] == 0 and fp32["swapped_pairs"] == 0
    assert read_deployment(save_dir).precision_checks  # what infer.py reads back


def test_the_recorded_verdict_changes_are_the_real_ones(judged):
    """Recount one path's changes from its own scores at the recorded threshold."""
    save_dir, _ = judged
    deployment = read_deployment(save_dir)
    threshold = deployment.calibration.image_threshold
    fp32, int8 = scores_of(save_dir, "fp32"), scores_of(save_dir, "int8", backend="onnxruntime")
    record = next(c for c in deployment.precision_checks if c["backend"] == "onnxruntime")
    assert record["verdict_changes"] == int(((fp32 > threshold) != (int8 > threshold)).sum())


def test_precision_auto_keeps_every_verdict_of_the_check_images(judged, tmp_path, capsys):
    save_dir, _ = judged
    rows = {}
    for precision in ("fp32", "auto"):
        out = tmp_path / precision
        assert infer.main(["--model_dir", save_dir, "--image", TEST_DIR, "--output_dir", str(out),
                           "--precision", precision, "--save_images", "False"]) == 0
        rows[precision] = {r["image"]: r["verdict"] for r in csv.DictReader(open(out / "scores.csv"))}
    assert rows["auto"] == rows["fp32"] and set(rows["fp32"].values()) == {"OK", "DEFECT"}
    chosen = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--precision auto: ")]
    assert len(chosen) == 1 and "kept every verdict of the export's 10 check images" in chosen[0]


def test_precision_auto_needs_a_judged_export(judged, tmp_path, capsys):
    _, root = judged
    code = infer.main(["--model_dir", str(root / "first"), "--image", TEST_DIR, "--output_dir", str(tmp_path / "o"),
                       "--precision", "auto"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "holds no precision checks" in err[0]


FORGERIES = [
    ("NaN ms", lambda c: {**c, "ms_per_image": float("nan")}),  # NaN: the fastest under min()
    ("tiny ms", lambda c: {**c, "ms_per_image": 1e-300}),
    ("pearson 5", lambda c: {**c, "min_pearson": 5.0}),
    ("too many swaps", lambda c: {**c, "swapped_pairs": 46}),  # 10 images: 45 pairs
    ("more changes than images", lambda c: {**c, "verdict_changes": 11}),
    ("huge band", lambda c: {**c, "precision": "int8", "recheck_band": 1e300, "rechecked": 0}),
    ("band on fp32", lambda c: {**c, "precision": "fp32", "recheck_band": 0.1, "rechecked": 0}),
    ("band a bool", lambda c: {**c, "precision": "int8", "recheck_band": True, "rechecked": 0}),
]
BIAS_FORGERIES = [("NaN bias", {"openvino": float("nan")}), ("huge bias", {"onnxruntime": 1e300}),
                  ("bias of 50", {"openvino": 50.0}),  # turns every verdict; int8's bias is thousandths
                  ("bias a list", [0.1]), ("bias a string", {"openvino": "0.1"})]


def edited_copy(save_dir, folder, edit, **dump) -> dict:
    """A copy of the export in `folder` whose deploy.json `edit(meta)` has changed in place."""
    import shutil
    shutil.copytree(save_dir, folder)
    path = os.path.join(folder, "deploy.json")
    meta = json.load(open(path))
    edit(meta)
    json.dump(meta, open(path, "w"), **dump)
    return meta


@pytest.mark.parametrize("case,forge", FORGERIES, ids=[f[0] for f in FORGERIES])
def test_a_forged_judgement_is_refused(judged, tmp_path, capsys, case, forge):
    save_dir, _ = judged
    forged = str(tmp_path / "forged")

    def forge_one(meta):
        meta["precision_checks"][1] = forge(meta["precision_checks"][1])
    edited_copy(save_dir, forged, forge_one)
    code = infer.main(["--model_dir", forged, "--image", TEST_DIR, "--output_dir", str(tmp_path / "o"),
                       "--precision", "auto"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "'precision_checks' must be a list of" in err[0], err


@pytest.mark.parametrize("case,bias", BIAS_FORGERIES, ids=[f[0] for f in BIAS_FORGERIES])
def test_a_forged_int8_bias_is_refused(judged, tmp_path, capsys, case, bias):
    save_dir, _ = judged
    forged = str(tmp_path / "forged")
    edited_copy(save_dir, forged, lambda meta: meta["onnx_int8"].update(score_bias=bias))
    code = infer.main(["--model_dir", forged, "--image", TEST_DIR, "--output_dir", str(tmp_path / "o"),
                       "--precision", "int8", "--backend", "onnxruntime"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "'onnx_int8' 'score_bias' must map runtime names" in err[0], err


def test_an_export_of_format_1_runs_int8_raw_and_a_later_format_is_refused(judged, tmp_path, capsys):
    """Exports before the bias was measured (format /1) still read, and their int8 runs
    uncorrected; the new exports say /2, which a reader of /1 refuses rather than running
    their int8 without its bias. A format from a later version is refused in one line."""
    from deploy.predictor import BACKENDS
    save_dir, _ = judged
    assert json.load(open(os.path.join(save_dir, "deploy.json")))["format"] == "rd4ad-paddle-inference/2"
    old = str(tmp_path / "old")
    def as_format_1(meta):
        meta.update(format="rd4ad-paddle-inference/1")
        meta["onnx_int8"].pop("score_bias", None)
    edited_copy(save_dir, old, as_format_1)
    deployment = read_deployment(old)
    options = PredictorOptions(backend="onnxruntime", precision="int8")
    assert deployment.int8_score_bias == {} and build_predictor(deployment, options).score_bias == 0
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    np.testing.assert_array_equal(build_predictor(deployment, options)(x)[1], BACKENDS["onnxruntime"](deployment,
                                                                                                       options)(x)[1])
    carrying = str(tmp_path / "carrying")  # a /1 file that has a bias was judged with it: it is applied
    edited_copy(old, carrying, lambda meta: meta["onnx_int8"].update(score_bias={"onnxruntime": 0.003}))
    assert read_deployment(carrying).int8_score_bias == {"onnxruntime": 0.003}
    later = str(tmp_path / "later")
    edited_copy(save_dir, later, lambda meta: meta.update(format="rd4ad-paddle-inference/3"))
    code = infer.main(["--model_dir", later, "--image", TEST_DIR, "--output_dir", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "export format 'rd4ad-paddle-inference/3' is not one this version " \
        "reads (rd4ad-paddle-inference/1, rd4ad-paddle-inference/2)" in err[0], err


def test_the_judgement_reads_in_any_key_order(judged, tmp_path):
    save_dir, _ = judged
    copy = str(tmp_path / "sorted")
    edited_copy(save_dir, copy, lambda meta: None, sort_keys=True)  # as a JSON tool may rewrite it
    assert read_deployment(copy).precision_checks == read_deployment(save_dir).precision_checks


def check(backend, precision, ms, changes=0, pearson=0.999):
    return PrecisionCheck(backend, precision, 10, ms, pearson, 0, changes)


CHECKS = [check("paddle", "fp32", 300.0), check("openvino", "int8", 90.0, changes=1),
          check("onnxruntime", "int8", 120.0), check("openvino", "bf16", 140.0, pearson=0.95),
          check("paddle", "bf16", 190.0)]


def path(choice):
    return choice.backend, choice.precision, choice.recheck_band


def test_choose_path_takes_the_fastest_that_kept_verdicts_and_maps():
    choice = choose_path(CHECKS, lambda c: True)
    assert path(choice) == ("onnxruntime", "int8", None)  # openvino int8 changed a verdict
    assert "rejected (verdicts or maps changed): openvino int8, openvino bf16" in choice.why
    rechecked = PrecisionCheck("openvino", "int8", 10, 110.0, 0.999, 0, 0, 0.01, 2)
    choice = choose_path(CHECKS + [rechecked], lambda c: True)
    assert path(choice) == ("openvino", "int8", 0.01) and "110 ms/image there, 2 of them rechecked" in choice.why


def test_choose_path_within_a_backend_and_what_runs_here():
    assert path(choose_path(CHECKS, lambda c: True, "paddle")) == ("paddle", "bf16", None)
    assert path(choose_path(CHECKS, lambda c: c.precision != "bf16", "paddle")) == ("paddle", "fp32", None)
    choice = choose_path(CHECKS, lambda c: True, "openvino")  # both openvino paths failed
    assert path(choice) == ("openvino", "fp32", None) and "no checked path of openvino" in choice.why
    assert path(choose_path(CHECKS, lambda c: c.precision == "fp32")) == ("paddle", "fp32", None)


def test_another_threshold_takes_only_fp32_or_rechecked_paths():
    """infer.py --threshold X: a plain int8 path kept the verdicts at the judged threshold
    only; a rechecked one rechecks around X, and fp32 is fp32."""
    plain = CHECKS[:3]  # paddle fp32, openvino int8 (changed one), onnxruntime int8 (kept all)
    choice = choose_path(plain, lambda c: True, other_threshold=True)
    assert path(choice) == ("paddle", "fp32", None) and "with --threshold only fp32 and rechecked" in choice.why
    rechecked = PrecisionCheck("onnxruntime", "int8", 10, 200.0, 0.999, 0, 0, 0.01, 1)
    assert path(choose_path(plain + [rechecked], lambda c: True, other_threshold=True)) == (
        "onnxruntime", "int8", 0.01)


def test_without_a_threshold_no_low_precision_path_is_chosen():
    unjudged = [check("paddle", "fp32", 300.0, changes=None), check("onnxruntime", "int8", 100.0, changes=None)]
    assert path(choose_path(unjudged, lambda c: True)) == ("paddle", "fp32", None)


class FakePredictor:
    """Scores are the images' first pixel plus an offset; maps that pixel everywhere."""
    model_path, provider, image_size = "fake", "fake", 4

    def __init__(self, offset):
        self.offset, self.calls, self.closed = offset, [], False

    def __call__(self, images):
        self.calls.append(len(images))
        scores = images[:, 0, 0, 0] + self.offset
        return np.broadcast_to(scores[:, None, None], (len(images), 4, 4)).copy(), scores

    def close(self):
        self.closed = True


def test_rechecked_scores_borderline_images_in_fp32_and_only_those():
    from deploy.predictor import Rechecked
    images = np.zeros((5, 3, 4, 4), np.float32)
    images[:, 0, 0, 0] = [0.2, 0.49, 0.5, 0.515, np.nan]  # threshold 0.5, band 0.02: 0.49, 0.5, NaN recheck
    fast, exact = FakePredictor(0.01), FakePredictor(0.0)
    rechecked = Rechecked(fast, exact, threshold=0.5, band=0.02)
    maps, scores = rechecked(images)
    np.testing.assert_allclose(scores[:4], [0.21, 0.49, 0.5, 0.525], rtol=1e-6)  # 0.515 + 0.01: outside the band
    assert exact.calls == [3] and rechecked.rechecked == 3 and maps[1].max() == pytest.approx(0.49)
    rechecked.close()
    assert fast.closed and exact.closed


def test_a_bias_that_does_not_hold_on_the_check_images_is_not_removed():
    from deploy.precision import bias_note
    baseline = np.array([0.49, 0.51, 0.6])
    calibration = np.array([0.01, 0.02, 0.03])  # raw int8 - fp32 on good images: bias 0.02, band 2 * 0.01
    # raw int8 keeps every verdict at 0.5; less its bias 0.02, 0.515 turns OK
    note = bias_note("openvino", 0.02, np.array([0.495, 0.515, 0.605]), baseline, 0.5, calibration)
    assert "verdicts changed 1 with it removed, 0 without" in note and "int8 runs raw" in note
    # raw turns the first image DEFECT; less 0.02 every verdict is fp32's: removed
    assert bias_note("openvino", 0.02, np.array([0.505, 0.525, 0.615]), baseline, 0.5, calibration) is None
    # as many changes (none): the smaller mean score error decides, both ways
    assert bias_note("openvino", 0.02, np.array([0.52, 0.54, 0.63]), baseline, None, calibration) is None
    assert "mean score error" in bias_note("openvino", 0.02, np.array([0.49, 0.51, 0.6]), baseline, None,
                                           calibration)
    # fewer changes and a smaller mean error, but one error (0.025) beyond the band (0.02) it gives
    note = bias_note("openvino", 0.02, np.array([0.51, 0.53, 0.645]), baseline, 0.5, calibration)
    assert "an error of 0.025 with it removed, beyond the recheck band of 0.02" in note


def test_a_judged_block_starts_with_an_untimed_run_whose_recheck_is_not_counted():
    from deploy.precision import lead_in
    from deploy.predictor import Rechecked
    borderline = np.full((1, 3, 4, 4), 0.5, np.float32)
    fast, exact = FakePredictor(0.0), FakePredictor(0.0)
    rechecked = Rechecked(fast, exact, threshold=0.5, band=0.01)
    rechecked.rechecked = 3
    lead_in(rechecked, borderline)
    assert fast.calls == [1] and exact.calls == [1] and rechecked.rechecked == 3  # run, rechecked, not counted
    plain = FakePredictor(0.0)
    lead_in(plain, borderline)
    assert plain.calls == [1]


def test_warm_up_reaches_the_fp32_recheck_too():
    """Zero images score far from the threshold: warming up the int8 predictor alone would
    leave the fp32 one cold for the first borderline image."""
    from deploy.predictor import Rechecked, warm_up
    fast, exact = FakePredictor(0.0), FakePredictor(0.0)
    rechecked = Rechecked(fast, exact, threshold=0.5, band=0.01)
    warm_up(rechecked, np.zeros((1, 3, 4, 4), np.float32))
    assert fast.calls == [1] and exact.calls == [1] and rechecked.rechecked == 0


def test_the_recorded_recheck_band_is_twice_the_int8_error_on_the_calibration_images(judged):
    from deploy.export import calibration_images
    from deploy.precision import RECHECK_SAFETY
    save_dir, _ = judged
    record = next(c for c in read_deployment(save_dir).precision_checks
                  if c["backend"] == "onnxruntime" and c["recheck_band"])
    calibration = np.concatenate(calibration_images(GOOD_DIR, SIZE, 16))
    deployment = read_deployment(save_dir)
    fp32, int8 = (build_predictor(deployment, PredictorOptions(backend=b, precision=p))
                  for b, p in (("paddle", "fp32"), ("onnxruntime", "int8")))
    error = max(abs(float(int8(x[None])[1][0]) - float(fp32(x[None])[1][0])) for x in calibration)
    assert record["recheck_band"] == pytest.approx(RECHECK_SAFETY * error, rel=1e-4)
    assert record["verdict_changes"] is not None and 0 <= record["rechecked"] <= record["images"]


def test_int8_runs_less_the_score_bias_the_export_measured_when_it_held(judged, tmp_path):
    """The export measures each runtime's mean int8 - fp32 score on the calibration images
    and records it when removing it kept the check images at least as faithful (bias_note);
    build_predictor's int8 predictor subtracts a recorded bias from maps and scores alike."""
    from dataset import index_test_dir, load_image
    from deploy.export import calibration_images
    from deploy.precision import bias_note
    from deploy.predictor import BACKENDS
    save_dir, _ = judged
    deployment = read_deployment(save_dir)
    calibration = np.concatenate(calibration_images(GOOD_DIR, SIZE, 16))
    checks = np.stack([load_image(s.image_path, SIZE) for s in index_test_dir(TEST_DIR, None)])
    fp32 = build_predictor(deployment, PredictorOptions())
    measured = {}
    for backend in ("onnxruntime", "openvino"):
        raw = BACKENDS[backend](deployment, PredictorOptions(backend=backend, precision="int8"))
        errors = np.array([float(raw(x[None])[1][0]) - float(fp32(x[None])[1][0]) for x in calibration])
        measured[backend] = errors.mean()
        kept = bias_note(backend, float(f"{measured[backend]:.6g}"),
                         np.array([float(raw(x[None])[1][0]) for x in checks]),
                         np.array([float(fp32(x[None])[1][0]) for x in checks]),
                         deployment.calibration.image_threshold, errors) is None
        assert (backend in deployment.int8_score_bias) == kept  # the export's decision, made again here
        if kept:
            assert deployment.int8_score_bias[backend] == pytest.approx(measured[backend], rel=1e-4, abs=1e-7)
    biased = str(tmp_path / "biased")  # every runtime's measured bias recorded, kept or not
    edited_copy(save_dir, biased, lambda meta: meta["onnx_int8"].update(
        score_bias={b: float(f"{v:.6g}") for b, v in measured.items()}))
    deployment = read_deployment(biased)
    for backend, bias in deployment.int8_score_bias.items():
        options = PredictorOptions(backend=backend, precision="int8")
        raw, corrected = BACKENDS[backend](deployment, options), build_predictor(deployment, options)
        raw_maps, raw_scores = raw(calibration)
        maps, scores = corrected(calibration)
        np.testing.assert_allclose(maps, raw_maps - np.float32(bias), atol=1e-6)
        np.testing.assert_allclose(scores, raw_scores - np.float32(bias), atol=1e-6)
        np.testing.assert_allclose(scores, maps.max(axis=(1, 2)), atol=1e-6)  # a score is still its map's maximum
        assert f"int8 bias {bias:+.4g} removed" in corrected.provider
        corrected.remove_bias(0.0)
        assert corrected.provider == raw.provider and corrected.score_bias == 0
        # so the corrected scores' mean error on the calibration images is nil
        assert np.mean(scores - fp32(calibration)[1]) == pytest.approx(0, abs=1e-5)


def rechecked_fastest(save_dir, folder):
    """A copy of the judged export whose fastest verdict-keeping path is ONNX Runtime int8
    rechecked within 10 (every image rechecked)."""
    def edit(meta):
        for record in meta["precision_checks"]:
            keep = record["backend"] == "onnxruntime" and record["recheck_band"] is not None
            record["ms_per_image"] = 1.0 if keep else 999.0
            record["recheck_band"] = 10.0 if keep else record["recheck_band"]
            record["verdict_changes"] = 0 if keep or record["backend"] == "paddle" else 1
        meta["onnx_int8"]["score_bias"] = {"onnxruntime": 0.003}  # moot: every image is rechecked in fp32
    meta = edited_copy(save_dir, folder, edit)
    return folder, meta["calibration"]["image_threshold"]


def test_precision_auto_runs_a_chosen_rechecked_path_with_fp32_verdicts(judged, tmp_path, capsys):
    """infer.py runs the chosen rechecked path, int8 and fp32 both: every verdict is fp32's."""
    save_dir, _ = judged
    edited, threshold = rechecked_fastest(save_dir, str(tmp_path / "model"))
    out = tmp_path / "auto"
    assert infer.main(["--model_dir", edited, "--image", TEST_DIR, "--output_dir", str(out), "--precision", "auto",
                       "--save_images", "False"]) == 0
    printed = capsys.readouterr().out
    assert "--precision auto: onnxruntime int8 + fp32 recheck within 10," in printed
    assert "10 rechecked in fp32 within 10 of the threshold" in printed
    fp32 = scores_of(save_dir, "fp32")
    rows = list(csv.DictReader(open(out / "scores.csv")))
    np.testing.assert_allclose([float(r["score"]) for r in rows], fp32, atol=1e-4)  # ONNX Runtime fp32's scores
    assert [r["verdict"] for r in rows] == ["DEFECT" if s > threshold else "OK" for s in fp32]


def test_serve_takes_the_same_auto_choice(judged, tmp_path):
    """serve.py --precision auto chooses as infer.py does, and answers with fp32's scores."""
    pytest.importorskip("fastapi")
    from test_service import Server
    save_dir, _ = judged
    edited, threshold = rechecked_fastest(save_dir, str(tmp_path / "model"))
    server = Server(edited, "--precision", "auto")
    try:
        status, model, _ = server.get("/model")
        assert status == 200 and (model["backend"], model["precision"], model["recheck_band"]) == (
            "onnxruntime", "int8", 10.0) and "fp32 recheck" in model["provider"], model
        assert model["int8_score_bias"] == 0.003 and "int8 bias +0.003 removed" in model["provider"], model
        from dataset import index_test_dir
        fp32 = scores_of(save_dir, "fp32")
        for sample, expected in zip(index_test_dir(TEST_DIR, None), fp32):
            status, answer, _ = server.request("POST", "/predict", open(sample.image_path, "rb").read(),
                                               {"Content-Type": "image/png"})
            assert status == 200 and answer["score"] == pytest.approx(float(expected), abs=1e-4)
            assert answer["verdict"] == ("DEFECT" if expected > threshold else "OK")
    finally:
        assert server.stop() == 0


def test_recheck_band_settings_are_checked(judged, tmp_path, capsys):
    save_dir, _ = judged
    for flags, words in ((["--recheck_band", "0.01"], "it needs --precision int8, not fp32"),
                         (["--recheck_band", "0.001", "--precision", "auto"], "--precision auto takes the band the "
                                                                              "export judged"),
                         (["--recheck_band", "-1", "--precision", "int8", "--backend", "onnxruntime"],
                          "--recheck_band -1.0: must be"),
                         (["--recheck_band", "nan", "--precision", "int8", "--backend", "onnxruntime"],
                          "--recheck_band nan: must be a finite number")):
        code = infer.main(["--model_dir", save_dir, "--image", TEST_DIR, "--output_dir", str(tmp_path / "o"), *flags])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and words in err[0], err


def test_an_export_judged_before_rechecking_still_reads(judged, tmp_path):
    save_dir, _ = judged
    old = str(tmp_path / "old")
    edited_copy(save_dir, old, lambda meta: meta.update(precision_checks=[
        {k: v for k, v in c.items() if k not in ("recheck_band", "rechecked")}
        for c in meta["precision_checks"] if c["recheck_band"] is None]))
    checks = read_deployment(old).precision_checks
    assert checks and all(c["recheck_band"] is None and c["rechecked"] is None for c in checks)
