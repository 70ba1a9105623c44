"""Reading a file the user named: only a regular file is opened, and opening never blocks.

A FIFO named like an image (or a checkpoint, a config) would block `open()` until some
writer came, hanging the run; a character device (/dev/zero, /dev/urandom) never ends;
a folder or a symbolic-link loop is no file. `open_regular` refuses each with a one-line
reason: it checks the path first (nothing but a regular file is even opened), then opens
with O_NONBLOCK (a FIFO swapped in meanwhile does not block) and checks the descriptor it
got (what is read is what was checked).
"""
from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from .errors import UserError


class NotARegularFile(UserError):
    """A path that names something other than a regular file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def kind_of(mode: int) -> str:
    """What a stat mode names, for a message ('a FIFO', 'a folder', ...)."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a file"


def _refusal(path: str, mode: int) -> NotARegularFile:
    return NotARegularFile(path, f"not a regular file ({kind_of(mode)})")


def check_regular(path: str) -> None:
    """NotARegularFile unless `path` (links followed) is a regular file; OSError (missing,
    permission denied) as os.stat raises it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise NotARegularFile(path, "not a regular file (a symbolic link loop)") from None
        raise
    if not stat.S_ISREG(mode):
        raise _refusal(path, mode)


def open_regular(path: str) -> BinaryIO:
    """`path` opened for binary reading, when it is a regular file (see the module)."""
    check_regular(path)
    nonblocking = getattr(os, "O_NONBLOCK", 0)  # POSIX; elsewhere there are no FIFOs to fear
    fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced between the check and the open
            raise _refusal(path, mode)
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
