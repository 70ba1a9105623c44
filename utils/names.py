"""Names that become parts of output paths: class names from users, per-image output names.

A user's name is never a path: a class name is one path component (no separator, no
'..', not absolute, not empty), so OUTPUT_DIR/CLASS stays inside OUTPUT_DIR.

Per-image outputs (picture, mask) are named after the image's path relative to its root,
folders joined by '_' ("broken_large/000.png" -> "broken_large_000"). Two images whose
names would collide ("x.png" and "x.jpg"; "a/b_x.png" and "a_b/x.png"; names equal up to
case, for case-insensitive file systems) each get '~' and 8 hex digits of a hash of their
relative path. A name longer than MAX_NAME_BYTES is cut and given the same kind of hash,
so that the name plus the atomic-write temporary prefix and suffix fits the file system's
255-byte limit.
"""
from __future__ import annotations

import hashlib
import os

from .errors import UserError, shorten

MAX_NAME_BYTES = 150   # + ".png" and the ".NAME.xxxxxxxx.tmp" of an atomic write < 255
# What a run writes at the top of OUTPUT_DIR: a class of the same name would collide.
RESERVED_NAMES = ("config.yaml", "config_eval.yaml", "config_infer.yaml", "results.md", "results.json",
                  "report.html", "report", "inference", "visualdl", "logs", "infer")


class NameError_(UserError):
    """Not a valid name (kept apart from the builtin NameError)."""


def check_class_name(name: str, what: str = "--cls") -> str:
    """`name` if it is a single, ordinary path component; else a one-line error."""
    problem = None
    if not name or not name.strip():
        problem = "is empty"
    elif name in (".", ".."):
        problem = "is not a name"
    elif "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        problem = "contains a path separator"
    elif os.path.isabs(name):
        problem = "is an absolute path"
    elif any(ord(c) < 32 for c in name):
        problem = "contains control characters"
    elif name != name.strip():
        problem = "starts or ends with a space"
    elif name.startswith("."):
        problem = "starts with '.' (hidden)"
    elif len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    elif name.lower() in RESERVED_NAMES:
        problem = "is the name of one of the run's own outputs"
    if problem:
        raise NameError_(f"{what} {shorten(name)}: a class name must be one folder name ({problem})")
    return name


def is_within(path: str, folder: str) -> bool:
    """`path` is `folder` or lies below it (real paths: links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _hash8(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _fit(name: str, key: str) -> str:
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_NAME_BYTES:
        return name
    cut = raw[:MAX_NAME_BYTES - 9].decode("utf-8", "ignore")  # never half a character
    return f"{cut}~{_hash8(key)}"


def readable_name(relative_path: str) -> str:
    """'a/b/x.png' -> 'a_b_x': the relative path without extension, folders joined by '_',
    control characters and backslashes replaced."""
    stem = os.path.splitext(relative_path.replace(os.sep, "/"))[0]
    parts = [p for p in stem.split("/") if p not in ("", ".")]
    return _safe("_".join(parts))


def _safe(name: str) -> str:
    """Control characters, separators and backslashes replaced; never hidden, never empty."""
    name = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in name) or "image"
    return "_" + name if name.startswith(".") else name


def output_names(relative_paths: list[str], readable: list[str] | None = None) -> list[str]:
    """A distinct, file-system-safe output name for each relative path (see module doc).
    `readable` gives the preferred names (default: readable_name of each path)."""
    wanted = [_fit(_safe(n), p) for n, p in zip(readable or [readable_name(p) for p in relative_paths],
                                                relative_paths)]
    counts: dict[str, int] = {}
    for name in wanted:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    out, taken = [], set()
    for name, path in zip(wanted, relative_paths):
        if counts[name.lower()] > 1:
            name = _fit(f"{name}~{_hash8(path)}", path)
        base, k = name, 1
        while name.lower() in taken:  # a real file already named like a hashed one
            k += 1
            name = _fit(f"{base}~{k}", f"{path}~{k}")
        taken.add(name.lower())
        out.append(name)
    return out
