"""Per-class results table (markdown) with the mean row."""
from __future__ import annotations

import math

from .evaluate import METRIC_NAMES

HEADERS = ("Class", "Pixel AUROC", "Sample AUROC", "AUPRO (per image)", "AUPRO (set)")


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def mean_row(results: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for name in METRIC_NAMES:
        vals = [r[name] for r in results.values() if not math.isnan(r[name])]
        out[name] = sum(vals) / len(vals) if vals else math.nan
    return out


def results_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table, values in percent, one row per class and the mean."""
    rows = [HEADERS, ("---",) + ("---:",) * (len(HEADERS) - 1)]
    for cls, r in results.items():
        rows.append((cls,) + tuple(_fmt(r[n]) for n in METRIC_NAMES))
    m = mean_row(results)
    rows.append(("**mean**",) + tuple(_fmt(m[n]) for n in METRIC_NAMES))
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)
