"""One run per output folder: OUTPUT_DIR/.rd4ad.lock, held with an exclusive flock.

Two runs into one folder would overwrite each other's checkpoints and tables, so the
second stops with one line naming the first (the lock file records pid, host, start time
and command). The kernel drops a flock when its process dies, however it dies, so the
lock of a killed run is stale by construction and simply taken over. A parent that fans
out children into the same folder (tools/train_all.py) passes its lock on to them through
RD4AD_LOCK_TOKEN. Where fcntl is missing (Windows) runs are not locked.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import sys
import time
import uuid

from .errors import OutputError
from .files import kind_of, open_regular

try:
    import fcntl
except ImportError:  # pragma: no cover - not Linux/macOS
    fcntl = None

LOCK_NAME = ".rd4ad.lock"
TOKEN_ENV = "RD4AD_LOCK_TOKEN"


class OutputLock:
    """Context manager: hold `folder` (which must exist) for this process."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.token: str | None = None
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if fcntl is None:
            return
        inherited = os.environ.get(TOKEN_ENV)
        if inherited and self._record().get("token") == inherited:
            self.token = inherited  # the parent holds the lock for this folder
            return
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as err:
                raise OutputError(f"{self.path}: cannot create the lock file ({err.strerror})") from None
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):  # planted (a FIFO would block whoever reads the owner)
                os.close(fd)
                raise OutputError(f"{self.path}: the lock file is not a regular file ({kind_of(mode)}); remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                owner = self._record()
                raise OutputError(
                    f"{self.folder}: in use by another run (pid {owner.get('pid', '?')} on "
                    f"{owner.get('host', '?')}, started {owner.get('started', '?')}: "
                    f"{str(owner.get('command', ''))[:120]}); wait for it to finish, or use another "
                    f"--output_dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file while we opened it: try again
                os.close(fd)
                continue
            self._fd, self.token = fd, uuid.uuid4().hex
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": self.token,
                      "command": " ".join(sys.argv)[:500]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
            return
        raise OutputError(f"{self.path}: could not take the lock; try again")

    def release(self) -> None:
        if self._fd is None:
            self.token = None
            return
        try:
            os.remove(self.path)  # still holding the flock: nobody else can be inside
        except OSError:
            pass
        os.close(self._fd)
        self._fd = self.token = None

    def _record(self) -> dict:
        try:
            with open_regular(self.path) as f:  # a FIFO planted here: refused, never blocks
                owner = json.loads(f.read(4096).decode("utf-8"))
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}
