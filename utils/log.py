"""Console lines that do not break progress bars, and numbers that read n/a, never nan."""
from __future__ import annotations

import math
import numbers

from tqdm import tqdm


def log(message: str) -> None:
    tqdm.write(message)


def warn(message: str) -> None:
    log(f"warning: {message}")


def finite_value(v: object) -> float | None:
    """v as a finite float; None for n/a: None (null in a JSON read back), nan, inf, or not
    a number."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        return None
    return float(v)


def number(v: object, digits: int = 4) -> str:
    """A value for a log line: `digits` decimals, or n/a."""
    value = finite_value(v)
    return "n/a" if value is None else f"{value:.{digits}f}"


def percent(v: object) -> str:
    """A metric in percent with one decimal, or n/a."""
    value = finite_value(v)
    return "n/a" if value is None else f"{100 * value:.1f}"
