"""Per-class results table (markdown) with the mean row."""
from __future__ import annotations

import math

from core.results import TABLE_METRICS
from utils.log import finite_value, percent

TABLE_NAMES = tuple(m.name for m in TABLE_METRICS)
# Shown wherever the table is (console, results.md, HTML): why F1 can be low beside a high AUROC.
TABLE_NOTE = ("Values in percent; n/a where a class cannot define a metric. AUROC and AUPRO measure how the "
              "scores rank; F1, precision and recall are decisions at thresholds calibrated on held-out good "
              "images only, never on the test set: an AUROC of 100 with a low F1 means every defect outscores "
              "every good image, but the calibrated threshold lies elsewhere.")
HEADERS = ("Class",) + tuple(m.header for m in TABLE_METRICS)


def _value(r: dict, name: str) -> float:
    v = finite_value(r.get(name))
    return math.nan if v is None else v


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
        rows.append((cls,) + tuple(percent(_value(r, n)) for n in TABLE_NAMES))
    m = mean_row(results)
    rows.append(("**mean**",) + tuple(percent(m[n]) for n in TABLE_NAMES))
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)
