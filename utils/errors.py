"""The project's error kinds and how a user's value is quoted in a message.

Every mistake a user can make ends as ONE line, `error: FILE: problem`, and exit status 2
(utils/cli.py turns these exceptions into that line). Values are quoted bounded in length:
an error message never grows with the input (a 10 MB YAML value, an alias bomb).
"""
from __future__ import annotations

import math
import re
from typing import Any

QUOTE_LIMIT = 80
_INT_BITS = 128  # a longer int is quoted by its size: its digits would not fit the limit


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
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _INT_BITS:
        # repr() of an int over 4300 digits raises ValueError; any long one is cut anyway
        text, full = f"<{'negative ' if value < 0 else ''}int of about {int(value.bit_length() * math.log10(2)) + 1} digits>", None
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


# Words of the messages of running out of memory: Paddle's allocator ("Out of memory error on
# GPU 0"), CUDA ("CUDA error(2), out of memory"), cuDNN and cuBLAS (..._STATUS_ALLOC_FAILED).
_OUT_OF_MEMORY_WORDS = ("out of memory", "alloc_failed")
# Lines of Paddle's messages that say nothing by themselves: rules, headings, a bare error kind.
_BANNER = re.compile(r"[-=_*\s]*|error message summary:?|c\+\+ traceback.*|\(\w+\)|\w+error:", re.IGNORECASE)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is a device or host running out of memory. Paddle raises MemoryError
    for its allocators' failures (BadAlloc, RESOURCE_EXHAUSTED, GPU or host) but OSError for
    its EXTERNAL errors, among them CUDA's own "CUDA error(2), out of memory" and cuDNN's or
    cuBLAS's ..._STATUS_ALLOC_FAILED (paddle/fluid/pybind/exception.cc); a RuntimeError
    saying so counts too."""
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, (RuntimeError, OSError)) and any(w in text for w in _OUT_OF_MEMORY_WORDS)


def first_line(err: BaseException, limit: int = 200) -> str:
    """The line of an error's message that says what happened, bounded: the first that
    names running out of memory, else the first that is more than a rule, a heading or a
    bare error kind (Paddle's start with blank lines and such banners, and run to many lines
    of C++ context); the error's type name when there is none."""
    lines = [line.strip() for line in str(err).splitlines()]
    memory = [line for line in lines if any(w in line.lower() for w in _OUT_OF_MEMORY_WORDS)]
    said = memory or [line for line in lines if not _BANNER.fullmatch(line)]
    return bounded_line(said[0], limit) if said else type(err).__name__
