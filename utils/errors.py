"""The project's error kinds and how a user's value is quoted in a message.

Every mistake a user can make ends as ONE line, `error: FILE: problem`, and exit status 2
(utils/cli.py turns these exceptions into that line). Values are quoted bounded in length:
an error message never grows with the input (a 10 MB YAML value, an alias bomb).
"""
from __future__ import annotations

from typing import Any

QUOTE_LIMIT = 80


class UserError(ValueError):
    """A bad setting, file or folder: one line, exit status 2. Subclassed per area."""


class OutputError(UserError):
    """An output could not be written (disk full, permission, not a folder)."""


class PartialFailure(RuntimeError):
    """The run finished what it could, but some requested item failed: exit status 1."""


def shorten(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """repr(value), cut to `limit` characters with the full length said. Never builds the
    whole repr of a huge or self-similar value (a YAML alias bomb shares its parts, so its
    repr is exponential in the file's size while the object is small)."""
    if isinstance(value, (str, bytes)):
        text = repr(value[:limit + 1])
        full = len(value)
    elif isinstance(value, (int, float, bool)) or value is None:
        text, full = repr(value), None
    else:
        text, full = f"<{type(value).__name__}>", None
        if isinstance(value, (list, tuple, dict, set)):
            text = f"<{type(value).__name__} of {len(value)} items>"
    if len(text) > limit:
        text = text[:limit] + "..." + (f" ({full} characters)" if full is not None else "")
    return text


def bounded_line(message: str, limit: int = 600) -> str:
    """One line of at most about `limit` characters (newlines folded). A longer one keeps
    its start and its end, where the problem is said: a huge path or value in the middle
    is elided."""
    line = " ".join(str(message).split())
    if len(line) <= limit:
        return line
    head = limit // 3
    return f"{line[:head]} [... {len(line) - limit} characters ...] {line[-(limit - head):]}"
