"""A number is checked in the type it will be used in: a float64 weight of 1e300 is
finite but becomes inf in float32; --lr 1e-320 is above 0 but is 0 in float32; an
--image_size of 2**40 is a fine Python int but overflows the C int it is handed to."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32
FLOAT32_MAX = float(np.finfo(np.float32).max)
INT32_MAX = 2 ** 31 - 1
MAX_EPOCHS = 1_000_000  # an epoch count or number beyond it is a damaged file or a typo


def finite_in_float32(values: Any) -> bool:
    """Every value finite after the cast to float32 (the dtype of the model's weights)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.asarray(values).astype(np.float32, copy=False)).all())


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite as a float. A file's int may have
    thousands of digits: math.isfinite and float() of it raise OverflowError, and so would
    every check after them."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def fits_float32(value: float) -> bool:
    """Finite in float32 and not flushed to 0 by it (1e40 overflows, 1e-320 underflows;
    float32's subnormals, down to 1.4e-45, are kept)."""
    try:
        if not math.isfinite(value):
            return False
    except OverflowError:  # an int beyond float64's range
        return False
    with np.errstate(over="ignore", under="ignore"):
        held = np.float32(value)
    return bool(np.isfinite(held)) and (held == 0) == (value == 0)


def as_float32(value: float) -> float:
    """The value float32 holds for `value` (as a Python float): what a range check on a
    float32 setting must look at (0.99999999999 is 1.0 in float32)."""
    return float(np.float32(value))


def fits_int32(value: int) -> bool:
    return -INT32_MAX - 1 <= value <= INT32_MAX


def image_size_fits(size: int) -> bool:
    """An image's 3 x S x S values stay within int32 (Paddle's and PIL's sizes and offsets
    are 32-bit): S <= 26754. MVTec's images are 700-1024 pixels."""
    return 0 < size and 3 * size * size <= INT32_MAX
