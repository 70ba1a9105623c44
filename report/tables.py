"""Per-class results table (markdown) with the mean row."""
from __future__ import annotations

import math

from engine.evaluate import TABLE_METRICS
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


MODEL_HEADERS = ("Class", "Model", "Backbone", "Image size", "Epochs (trained of planned)", "Batch", "Teacher",
                 "Checkpoint")


def _known(value: object) -> str:
    return "?" if value is None else str(value)


def teacher_name(weights: object) -> str:
    """How a report names the teacher: 'none' is a random one, said so."""
    return "random (none)" if str(weights).lower() == "none" else _known(weights)


def model_cells(model: dict) -> tuple[str, ...]:
    """One class's description (engine/model_info.py) as table cells, MODEL_HEADERS[1:]."""
    return (_known(model.get("model")), _known(model.get("arch")), f"{_known(model.get('image_size'))} px",
            f"{_known(model.get('epochs_trained'))} of {_known(model.get('epochs_planned'))}",
            _known(model.get("batch_size")), teacher_name(model.get("teacher_weights")),
            _known(model.get("checkpoint")))


def model_line(model: dict) -> str:
    """One sentence: what a class's results were computed with."""
    name, arch, size, epochs, batch, teacher, checkpoint = model_cells(model)
    return (f"Model: {name}, backbone {arch}, {size}, trained {epochs} epochs, batch {batch}, "
            f"teacher {teacher}; checkpoint: {checkpoint}.")


def models_table(models: dict[str, dict | None]) -> str:
    """Markdown table: per class, the model its results come from ('no checkpoint' where
    there is none, e.g. the class failed before saving one)."""
    rows = [MODEL_HEADERS, ("---",) * len(MODEL_HEADERS)]
    for cls, model in models.items():
        rows.append((cls,) + (model_cells(model) if model else ("no checkpoint",) + ("",) * (len(MODEL_HEADERS) - 2)))
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)
