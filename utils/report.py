"""Per-class results table (markdown) with the mean row."""
from __future__ import annotations

import math

from .evaluate import DECISION_NAMES, METRIC_NAMES

TABLE_NAMES = METRIC_NAMES + DECISION_NAMES
HEADERS = ("Class", "Pixel AUROC", "Sample AUROC", "AUPRO (per image)", "AUPRO (set)",
           "Image F1", "Precision", "Recall", "Pixel F1")


def _value(r: dict, name: str) -> float:
    v = r.get(name)
    return math.nan if v is None else float(v)


def _fmt(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def mean_row(results: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for name in TABLE_NAMES:
        vals = [_value(r, name) for r in results.values() if not math.isnan(_value(r, name))]
        out[name] = sum(vals) / len(vals) if vals else math.nan
    return out


def results_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table, values in percent, one row per class and the mean; n/a where a
    class cannot define a metric (no defects, no masks, no thresholds)."""
    rows = [HEADERS, ("---",) + ("---:",) * (len(HEADERS) - 1)]
    for cls, r in results.items():
        rows.append((cls,) + tuple(_fmt(_value(r, n)) for n in TABLE_NAMES))
    m = mean_row(results)
    rows.append(("**mean**",) + tuple(_fmt(m[n]) for n in TABLE_NAMES))
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)
