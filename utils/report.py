"""Per-class results table (markdown) with the mean row."""
from __future__ import annotations

import math
import numbers

from .evaluate import DECISION_NAMES, METRIC_NAMES

TABLE_NAMES = METRIC_NAMES + DECISION_NAMES
HEADERS = ("Class", "Pixel AUROC", "Sample AUROC", "AUPRO (per image)", "AUPRO (set)",
           "Image F1", "Precision", "Recall", "Pixel F1")


def finite_value(v: object) -> float | None:
    """v as a finite float; None for n/a: None (null in a results.json read back), nan,
    inf, or not a number."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        return None
    return float(v)


def _value(r: dict, name: str) -> float:
    v = finite_value(r.get(name))
    return math.nan if v is None else v


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"


def mean_row(results: dict[str, dict[str, float | None]]) -> dict[str, float]:
    """Mean over the classes that define each metric (n/a ones left out); nan when none
    does (written as null by atomic_write_json)."""
    out = {}
    for name in TABLE_NAMES:
        vals = [v for v in (_value(r, name) for r in results.values()) if not math.isnan(v)]
        out[name] = sum(vals) / len(vals) if vals else math.nan
    return out


def results_table(results: dict[str, dict[str, float | None]]) -> str:
    """Markdown table, values in percent, one row per class and the mean; n/a where a
    class cannot define a metric (no defects, no masks, no thresholds)."""
    rows = [HEADERS, ("---",) + ("---:",) * (len(HEADERS) - 1)]
    for cls, r in results.items():
        rows.append((cls,) + tuple(_fmt(_value(r, n)) for n in TABLE_NAMES))
    m = mean_row(results)
    rows.append(("**mean**",) + tuple(_fmt(m[n]) for n in TABLE_NAMES))
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)
