"""tools/benchmark.py --quick runs every path and reports each figure (no speed asserted)."""
import json
import os
import subprocess
import sys

from conftest import ROOT


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
    assert "int8" in paths and "note" in paths["int8"]
    assert report["agreement_with_fp32"]["ONNX Runtime fp32"]["min_pearson_per_map"] > 0.999
    assert [r["path"] for r in report["training"]] == ["train, teacher every step",
                                                      "train, teacher-feature cache"]
    assert all(r["images/s"] > 0 for r in report["training"])
    assert [r["metrics finite"] for r in report["evaluation"]] == [True, True]
    aupro = report["aupro"]
    assert abs(aupro["loop value"] - aupro["200-threshold value"]) < 1e-9  # same procedure
    assert abs(aupro["exact value"] - aupro["loop value"]) < 0.005
    assert "## Inference" in proc.stdout and "## Training" in proc.stdout
