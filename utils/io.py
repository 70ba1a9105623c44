"""Files written whole or not at all, and JSON that strict readers accept.

Every write goes to a temporary file in the same folder and is renamed over the target,
so a kill at any moment leaves the previous file intact.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable

import numpy as np

from .cli import output_error


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) then rename tmp_path over path (same folder, so atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        # The temporary name is bounded so a long (but valid) target name still fits 255 bytes.
        prefix = "." + os.path.basename(path).encode("utf-8", "surrogateescape")[:64].decode(
            "utf-8", "ignore") + "."
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file a normal mode
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # disk full, permission, a file where a folder should be
        _remove_quietly(tmp)
        raise output_error(path, err) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str | None) -> None:
    if path and os.path.exists(path):
        try:
            os.remove(path)
        except OSError:
            pass


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def strict_json(obj: Any) -> Any:
    """obj with every non-finite float (nan, inf) as None: JSON has no NaN, and a strict
    reader (JSON.parse, jq) rejects the bare NaN that json.dumps writes by default."""
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(strict_json(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def is_whole_number(value: Any) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
