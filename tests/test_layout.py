"""Static properties of the code layout: utils/ stays a leaf, no reaching into private
parts of other objects, one metric registry drives every table, and every --help names
its defaults."""
import ast
import glob
import os
import re

import numpy as np
import pytest

from conftest import ROOT

ENTRY_POINTS = ("main.py", "infer.py", "export_model.py")
PACKAGES = ("app", "core", "engine", "deploy", "report", "model", "utils")
LAYERS_ABOVE_UTILS = {"model", "dataset", "core", "engine", "deploy", "report", "app"}


def source_files():
    """The entry points, every module of the packages, and dataset.py."""
    files = [os.path.join(ROOT, f) for f in ENTRY_POINTS + ("dataset.py",)]
    for package in PACKAGES:
        files += sorted(glob.glob(os.path.join(ROOT, package, "*.py")))
    return files


def parse(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


# ------------------------------------------------------------------ 1. utils/ is a leaf

def imported_top_levels(tree):
    """(line, top-level name) of every import that could reach a project package from
    utils/: absolute imports, and relative ones that climb out of utils (level >= 2)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, (node.module or "").split(".")[0]))
            elif node.level >= 2:  # from .. import engine / from ..engine.x import y
                if node.module:
                    found.append((node.lineno, node.module.split(".")[0]))
                else:
                    found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
    return found


def test_utils_imports_no_project_layer():
    modules = sorted(glob.glob(os.path.join(ROOT, "utils", "*.py")))
    assert len(modules) >= 10, modules  # the package is really there
    offending = [f"utils/{os.path.basename(path)}:{line} imports {name}"
                 for path in modules for line, name in imported_top_levels(parse(path))
                 if name in LAYERS_ABOVE_UTILS]
    assert not offending, offending


def test_import_checker_sees_every_spelling():
    """The checker above would catch each way of importing a layer (it is not vacuous)."""
    code = ("import model\nimport app.run\nimport core.results\nfrom dataset import x\nfrom report.tables import y\n"
            "from .. import deploy\nfrom ..engine import z\nfrom .cli import ok\nimport os\n")
    names = {name for _, name in imported_top_levels(ast.parse(code))}
    assert LAYERS_ABOVE_UTILS <= names and "cli" not in names


# ------------------------------------------------------------------ 2. no private reaching

def test_entry_points_have_no_late_imports():
    for name in ENTRY_POINTS:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            assert "noqa: E402" not in f.read(), name


def foreign_cache_assignments(tree):
    """Lines assigning `X._cache = ...` where X is not `self`."""
    lines = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and t.attr == "_cache" and not (
                        isinstance(t.value, ast.Name) and t.value.id == "self"):
                    lines.append(node.lineno)
    return lines


def test_no_module_reaches_into_private_parts():
    files = source_files()
    assert len(files) > 30
    offending = []
    for path in files:
        rel = os.path.relpath(path, ROOT)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for number, line in enumerate(text.splitlines(), 1):
            for private in ("._read(", "parser._actions"):
                if private in line:
                    offending.append(f"{rel}:{number}: {private}")
        offending += [f"{rel}:{n}: ._cache = on another object"
                      for n in foreign_cache_assignments(ast.parse(text, filename=path))]
    assert not offending, offending


def test_cache_checker_allows_own_attribute_only():
    code = "class A:\n    def f(self, d):\n        self._cache = {}\n        d._cache = {}\n"
    assert foreign_cache_assignments(ast.parse(code)) == [4]


# ------------------------------------------------------------------ 3. one metric registry

def synthetic_predictions():
    from core.results import Predictions

    rng = np.random.default_rng(0)
    n, size = 6, 16
    labels = np.array([0, 0, 0, 1, 1, 1], dtype=np.int64)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    maps = rng.uniform(0.0, 0.5, size=(n, size, size)).astype(np.float32)
    for i in np.flatnonzero(labels):
        masks[i, 4:9, 5:11] = 1
        maps[i, 4:9, 5:11] += 0.6 + 0.1 * i
    scores = maps.reshape(n, -1).max(axis=1).astype(np.float32)
    return Predictions(maps, scores, masks, labels)


def test_table_headers_come_from_the_registry():
    from core.results import METRICS, TABLE_METRICS
    from report.tables import HEADERS

    assert TABLE_METRICS and len(TABLE_METRICS) < len(METRICS)  # JSON-only metrics exist too
    assert list(HEADERS[1:]) == [m.header for m in TABLE_METRICS]
    assert [m.name for m in TABLE_METRICS] == [m.name for m in METRICS if m.header]


def test_compute_metrics_returns_the_registry_in_order():
    from core.decision import calibrate
    from core.results import METRICS, compute_metrics

    pred = synthetic_predictions()
    good = pred.labels == 0
    calibration = calibrate(pred.scores[good], pred.maps[good], quantile=0.995)
    warnings = []
    metrics = compute_metrics(pred, calibration, warn=warnings.append)
    assert list(metrics) == [m.name for m in METRICS]
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["pixel_auroc"] == pytest.approx(1.0) and metrics["sample_auroc"] == pytest.approx(1.0)
    # without thresholds: exactly the threshold-free ones, still in registry order
    assert list(compute_metrics(pred)) == [m.name for m in METRICS if not m.needs_calibration]


def test_results_table_has_one_column_per_table_metric():
    from core.decision import calibrate
    from core.results import TABLE_METRICS, compute_metrics
    from report.tables import results_table

    pred = synthetic_predictions()
    good = pred.labels == 0
    metrics = compute_metrics(pred, calibrate(pred.scores[good], pred.maps[good]))
    lines = results_table({"a": metrics}).splitlines()
    assert len(lines) == 4  # header, rule, class a, mean
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    assert all(len(row) == 1 + len(TABLE_METRICS) for row in cells), cells
    assert cells[0][1:] == [m.header for m in TABLE_METRICS]
    assert cells[2][0] == "a" and cells[2][1] == "100.0"  # pixel AUROC in percent


# ------------------------------------------------------------------ 4. --help names defaults

def help_of(entry, capsys):
    """(exit status or 'SystemExit(code)', stdout) of ENTRY.main(['--help'])."""
    import importlib

    module = importlib.import_module(entry)
    try:
        code = module.main(["--help"])
    except SystemExit as done:  # main() must return, not exit: recorded for the assertion
        code = f"SystemExit({done.code})"
    return code, capsys.readouterr().out


def option_blocks(text):
    """{flag: its help text, from the flag to the next flag}, for lines starting '  --'."""
    blocks, current = {}, None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            current = None
            if line.startswith("  --"):
                current = line.split()[0].rstrip(",")
                blocks[current] = [line]
        elif not line.strip() or not line.startswith(" "):  # blank line or group title
            current = None
        elif current:
            blocks[current].append(line)
    return blocks


@pytest.mark.parametrize("entry", ["main", "infer", "export_model"])
def test_help_returns_zero(entry, capsys):
    code, out = help_of(entry, capsys)
    assert code == 0, f"{entry}.main(['--help']) gave {code} (should return 0)"
    assert out.startswith("usage:")


@pytest.mark.parametrize("entry", ["main", "infer", "export_model"])
def test_help_names_every_default(entry, capsys):
    _, out = help_of(entry, capsys)
    blocks = option_blocks(out)
    assert len(blocks) >= 10, out
    missing = [flag for flag, lines in blocks.items() if "(default:" not in " ".join(lines)]
    assert not missing, missing


def test_main_help_one_line_per_flag(capsys):
    _, out = help_of("main", capsys)
    blocks = option_blocks(out)
    from engine.config import Config
    import dataclasses

    flags = {f.metadata.get("off_flag") or f"--{f.name}" for f in dataclasses.fields(Config)
             if not f.metadata.get("internal")}
    assert set(blocks) == flags  # every setting has its flag in --help
    wrapped = [flag for flag, lines in blocks.items() if "(default:" not in lines[0]]
    assert not wrapped, f"help not on the flag's line: {wrapped}"
