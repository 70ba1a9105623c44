"""The process's runtime, set up once by each command before Paddle loads.

`start()` runs first in every entry point's main(), which imports the rest only then:
- Paddle's import warns that no ccache is installed (it only matters when compiling
  custom operators): filtered before the import, so no command prints it.
- Paddle pins OMP_NUM_THREADS to 1 at import (and warns when it finds a larger value),
  so its eager CPU kernels use one core. Raising it right after the import, before the
  first operator runs, lets them use every core without the warning. A value the user
  set is left alone.
- Paddle's C++ INFO and WARNING log lines are off (GLOG_minloglevel=2, unless set, or
  RD4AD_DEBUG=1); its errors still show.
- Paddle's import also installs C++ signal handlers; SIGTERM's prints a "FatalError"
  traceback. A Python handler set after the import wins: SIGTERM then ends a command like
  Ctrl-C (utils/cli.py, exit 143).
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_USER_THREADS = "OMP_NUM_THREADS" in os.environ  # read when this module loads, before Paddle
_started = False


def start() -> None:
    """Import Paddle quietly and let its CPU kernels use every core (idempotent)."""
    global _started
    if _started:
        return
    warnings.filterwarnings("ignore", message="No ccache found")
    if not os.environ.get("RD4AD_DEBUG"):
        # Paddle's C++ (glog) warnings, e.g. "While running Node ... raises" when Ctrl-C lands
        # in a backward pass, would stand between the command and its one line
        os.environ.setdefault("GLOG_minloglevel", "2")
    import paddle  # noqa: F401  (the import that pins OMP_NUM_THREADS)

    if not _USER_THREADS:
        os.environ["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    from .cli import stop_on_sigterm

    stop_on_sigterm()
    _started = True


def eager_threads() -> int:
    """The thread count of Paddle's eager CPU kernels: OMP_NUM_THREADS, which start() (or the
    user) set and which Paddle's import sets to 1 when unset."""
    value = os.environ.get("OMP_NUM_THREADS", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def restore_eager_threads() -> None:
    """Give the math library (MKL on Intel OpenMP) back its thread count after a Paddle
    Inference predictor has run. Paddle 3.3.1's predictor sets it to 1 for the whole
    process at its first run and leaves it so; eager training afterwards ran on one core,
    1.4-1.7x slower (tools/eager_after_predictor.py). The predictor's own speed is unchanged:
    it sets its threads again each run."""
    from paddle.base import core

    core.set_num_threads(eager_threads())


def math_library_threads() -> int | None:
    """The thread count MKL (Paddle's CPU math library) will use, or None where Paddle
    carries no MKL library (other builds)."""
    import ctypes

    import paddle

    path = os.path.join(os.path.dirname(paddle.__file__), "libs", "libmklml_intel.so")
    if not os.path.isfile(path):
        return None
    return int(ctypes.CDLL(path).MKL_Get_Max_Threads())


def child_environment(**extra: str) -> dict[str, str]:
    """The environment for a child Python process that imports paddle itself: without the
    thread count set here (paddle warns at import when it finds one above 1)."""
    env = dict(os.environ, **extra)
    if not _USER_THREADS:
        env.pop("OMP_NUM_THREADS", None)
    return env


@contextmanager
def quiet_output() -> Iterator[None]:
    """Send the process's stdout and stderr (file descriptors 1 and 2) to a temporary file
    while a third-party step runs: Paddle's and paddle2onnx's C++ logging bypasses Python,
    so only this silences it. With RD4AD_DEBUG=1 what was caught is shown when the step
    fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 1)
        os.dup2(caught.fileno(), 2)
        try:
            yield
        except BaseException:
            if os.environ.get("RD4AD_DEBUG"):
                caught.seek(0)
                os.write(saved[1], caught.read())
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
