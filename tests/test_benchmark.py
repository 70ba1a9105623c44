"""tools/benchmark.py --quick runs every path and reports each figure (no speed asserted)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from utils.runtime import eager_threads, math_library_threads

NEEDS_TWO_THREADS = pytest.mark.skipif(eager_threads() < 2 or (math_library_threads() or 1) < 2,
                                       reason="one eager thread, or no MKL library in this Paddle build")


def test_quick_benchmark_reports_every_path(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--quick",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    paths = {row["path"]: row for row in report["inference"]}
    assert paths["dynamic graph"]["ms/img b1"] > 0
    assert paths["Paddle Inference fp32 oneDNN"]["ms/img b4"] > 0
    assert "x vs dygraph b1" in paths["Paddle Inference fp32 oneDNN"]
    assert paths["ONNX Runtime int8"]["ms/img b1"] > 0
    assert "note" in paths["Paddle Inference int8 oneDNN"]
    assert report["agreement_with_fp32"]["ONNX Runtime int8"]["min_pearson_per_map"] > 0
    assert report["agreement_with_fp32"]["ONNX Runtime fp32"]["min_pearson_per_map"] > 0.999
    # the default convolutions first; Paddle's own beside them where oneDNN runs them here
    from model.onednn import OneDNNLibrary, load_library
    backends = ["onednn", "paddle"] if isinstance(load_library(), OneDNNLibrary) else ["paddle"]
    training_paths = [f"train, {what}, {b} convolutions" for b in backends
                      for what in ("teacher every step", "teacher-feature cache")]
    assert [r["path"] for r in report["training"]] == training_paths
    assert all(r["images/s"] > 0 for r in report["training"])
    assert [r["metrics finite"] for r in report["evaluation"]] == [True, True]
    aupro = report["aupro"]
    assert abs(aupro["loop value"] - aupro["200-threshold value"]) < 1e-9  # same procedure
    assert abs(aupro["exact value"] - aupro["loop value"]) < 0.005
    assert "## Inference" in proc.stdout and "## Training" in proc.stdout


def test_benchmark_of_a_given_checkpoint_and_chosen_stages(tmp_path):
    import paddle

    from model import build_rd4ad
    from engine.checkpoint import save_checkpoint

    paddle.seed(3)
    ckpt = str(tmp_path / "model.pdparams")
    save_checkpoint(ckpt, build_rd4ad("resnet18", "none"), arch="resnet18", image_size=64, epoch=1,
                    cls="bottle", teacher_weights="none")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--checkpoint", ckpt,
                           "--stages", "inference", "--repeats", "1", "--warmup", "0", "--batch", "2",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["info"]["weights"] == ckpt and report["info"]["arch"] == "resnet18"
    assert report["info"]["image_size"] == 64  # taken from the checkpoint
    assert report["training"] == [] and report["evaluation"] == [] and report["aupro"] == {}
    assert report["agreement_with_fp32"]["ONNX Runtime fp32"]["min_pearson_per_map"] > 0.999


def test_benchmark_mistakes_are_one_line_before_any_work(tmp_path, capsys):
    """A bad --arch, --batch 0 or an unwritable --json: one line, exit 2, no minutes lost."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_tool", os.path.join(ROOT, "tools", "benchmark.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "a_file").write_text("x")
    cases = [(["--arch", "vgg"], "argument --arch: invalid choice: 'vgg'"),
             (["--batch", "0"], "--batch 0: must be at least 1"),
             (["--image_size", "100"], "--image_size 100: must be a multiple of 32"),
             (["--stages", "everything"], "--stages 'everything': choose from"),
             (["--json", str(tmp_path / "a_file" / "out.json")], "cannot write the --json file there"),
             (["--json", "/proc/rd4ad/out.json"], "cannot write the --json file there"),
             (["--reference", str(tmp_path / "not_a_checkout")], "--reference ")]  # no torch, or no files
    for args, message in cases:
        try:
            code = tool.main(args)
        except SystemExit as stop:  # argparse's mistakes end the process, as on the command line
            code = stop.code
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err[-2000:]
        assert message in lines[0], lines[0]
        assert "benchmark:" not in captured.out  # refused before the run started


def eager_after_predictor(*flags):
    import re
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eager_after_predictor.py"), "predictor",
                           "--arch", "resnet18", "--image_size", "64", "--batch", "2", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"predictor( --no_restore)?: step seconds before ([\d.]+), ([\d.]+); after ([\d.]+), "
                         r"([\d.]+); after/before ([\d.]+); math library threads (\d+) -> (\d+)", line)
    assert match and all(float(v) > 0 for v in match.groups()[1:6]), line
    return int(match[7]), int(match[8])


@NEEDS_TWO_THREADS
def test_eager_after_predictor_keeps_the_math_library_threads():
    """tools/eager_after_predictor.py on a small model (no speed asserted): Paddle's
    predictor leaves the math library on one thread (--no_restore), and ours gives the
    threads back, which is why eager training after it keeps its speed."""
    threads = math_library_threads()  # the child inherits OMP_NUM_THREADS; MKL caps it at the cores
    assert eager_after_predictor() == (threads, threads)
    assert eager_after_predictor("--no_restore") == (threads, 1)


@NEEDS_TWO_THREADS
def test_a_predictor_run_leaves_the_eager_threads_as_they_were():
    from deploy.predictor import StaticGraphRunner
    from model import build_rd4ad
    net = build_rd4ad("resnet18", teacher_weights="none", image_size=64)
    before = math_library_threads()
    runner = StaticGraphRunner(net, threads=1)
    try:
        runner(np.zeros((1, 3, 64, 64), np.float32))
    finally:
        runner.close()
    assert math_library_threads() == before


def test_rdpp_stage_times_an_rdpp_iteration_and_refuses_a_bad_reference(tmp_path):
    """--stages rdpp (not run by default): RD++ training rows, and a --reference_rdpp folder
    that is not the reference's checkout is one line, exit 2, before any work."""
    pytest.importorskip("opensimplex")
    out = tmp_path / "bench.json"
    tool = os.path.join(ROOT, "tools", "benchmark.py")
    proc = subprocess.run([sys.executable, tool, "--quick", "--stages", "rdpp", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["training"]
    assert [r["path"].split(",")[0] for r in rows] == ["RD++ train (as_coded)"] * 2
    assert all(r["images/s"] > 0 and r["batch"] == 4 for r in rows)
    bad = subprocess.run([sys.executable, tool, "--stages", "rdpp", "--reference_rdpp", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1, bad.stderr[-500:]
    assert errors[0].startswith(f"error: --reference_rdpp {tmp_path}: no model/resnet.py there")


def test_convolution_benchmark_times_every_convolution_onednn_runs_in_a_step():
    """tools/benchmark_convs.py: each layer oneDNN takes is counted as often as a training
    step calls it, under its part (RD++: the teacher and the projector twice, for the clean
    and the noisy batch), the 1x1 ones among them, and the table prints a row per shape
    and the totals; no speed is asserted."""
    from model.onednn import OneDNNConv2D, OneDNNConv2DTranspose, OneDNNLibrary, load_library, use_conv_backend
    from model.registry import build_model
    if not isinstance(load_library(), OneDNNLibrary):
        pytest.skip("no usable oneDNN in this Paddle build")
    from tools.benchmark_convs import step_convolutions
    net = build_model("rdpp", "resnet18", 64, teacher_weights="none")
    use_conv_backend(net, "onednn", 1)
    layers = step_convolutions(net, 2, 64)
    # bottleneck.conv4 is built but unused in forward, as in the reference (model/bottleneck.py)
    taken = [s for name, s in net.named_sublayers() if isinstance(s, (OneDNNConv2D, OneDNNConv2DTranspose))
             and name != "bottleneck.conv4"]
    in_teacher = [s for s in net.teacher.sublayers() if isinstance(s, OneDNNConv2D)]
    in_projector = [s for s in net.projector.sublayers() if isinstance(s, OneDNNConv2D)]
    assert len(in_projector) == 12  # four per scale
    assert sum(v["count"] for v in layers.values()) == len(taken) + len(in_teacher) + len(in_projector)
    assert sum(v["count"] for k, v in layers.items() if k[0] == "teacher") == 2 * len(in_teacher) > 0
    assert any(k[2][2:] == (1, 1) for k in layers), "the 1x1 convolutions run on oneDNN"
    assert all(k[1][0] == 2 for k in layers)  # the step's batch
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark_convs.py"), "--arch", "resnet18",
                           "--image_size", "64", "--batch", "2", "--repeats", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| teacher |") or line.startswith("| trained |")]
    rd4ad = build_model("rd4ad", "resnet18", 64, teacher_weights="none")
    use_conv_backend(rd4ad, "onednn", 1)
    rd4ad_layers = step_convolutions(rd4ad, 2, 64)  # the tool's default model: RD4AD, each layer once
    assert sum(v["count"] for v in rd4ad_layers.values()) == sum(
        isinstance(s, (OneDNNConv2D, OneDNNConv2DTranspose)) for s in rd4ad.sublayers()) - 1  # bottleneck.conv4
    assert len(rows) == len(rd4ad_layers)
    assert "| all, every layer of a step |" in proc.stdout
