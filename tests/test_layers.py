"""The import rules of doc/pipeline.md ("Layers"), checked on the source with ast: each
layer imports only layers below it, so results flow one way (engine produces plain
results, app/ hands them to report/) and no two packages import each other."""
import ast
import glob
import os

import pytest

from conftest import ROOT

# layer -> the project layers it may import (every import, also inside functions)
ALLOWED = {
    "utils": set(),
    "core": {"utils"},
    "dataset": {"utils"},
    "model": {"utils"},
    "report": {"utils", "core", "dataset", "model"},  # model: its registry's names (no Paddle)
    "engine": {"utils", "core", "dataset", "model"},
    "deploy": {"utils", "core", "dataset", "model", "engine", "report"},
    "app": {"utils", "core", "dataset", "model", "engine", "report", "deploy"},
}


def layer_of(path: str) -> str:
    rel = os.path.relpath(path, ROOT)
    return rel.split(os.sep)[0].removesuffix(".py")


def project_imports(tree: ast.AST, own: str) -> list[tuple[int, str]]:
    """(line, layer) of every absolute import of another project layer."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue  # relative imports stay inside their package
        found += [(node.lineno, n.split(".")[0]) for n in names
                  if n.split(".")[0] in ALLOWED and n.split(".")[0] != own]
    return found


def layer_files():
    files = [os.path.join(ROOT, "dataset.py")]
    for package in ALLOWED:
        files += sorted(glob.glob(os.path.join(ROOT, package, "*.py")))
    return files


def violations(files):
    out = []
    for path in files:
        own = layer_of(path)
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        out += [f"{os.path.relpath(path, ROOT)}:{line} imports {name}"
                for line, name in project_imports(tree, own) if name not in ALLOWED[own]]
    return out


def test_every_layer_imports_only_layers_below_it():
    files = layer_files()
    assert {layer_of(f) for f in files} == set(ALLOWED)  # every layer really is there
    assert not violations(files)


def test_the_rules_form_a_hierarchy():
    """No two layers may import each other, directly or round a cycle."""
    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in ALLOWED[start])
    assert not [layer for layer in ALLOWED if reaches(layer, layer)]


@pytest.mark.parametrize("source, layer, bad", [
    ("from deploy.predictor import StaticGraphRunner\n", "engine", "engine/x.py:1 imports deploy"),
    ("def f():\n    import report.html\n", "engine", "engine/x.py:2 imports report"),
    ("from engine.evaluate import Predictions\n", "report", "report/x.py:1 imports engine"),
    ("import app.run\n", "deploy", "deploy/x.py:1 imports app"),
])
def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch, source, layer, bad):
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    (tmp_path / layer).mkdir()
    (tmp_path / layer / "x.py").write_text(source + "from utils.io import atomic_write\nfrom .y import z\n")
    assert violations([str(tmp_path / layer / "x.py")]) == [bad]
