"""Import this before anything else that imports paddle: quiet import, every CPU core.

Paddle pins OMP_NUM_THREADS to 1 at import (and warns when it is larger), so its eager CPU
kernels use one core. Raising it right after the import, before the first operator runs,
lets them use every core without the warning. A value the user set is left alone.
"""
import os
import warnings

_THREADS_SET_BY_USER = "OMP_NUM_THREADS" in os.environ
warnings.filterwarnings("ignore", message="No ccache found")  # printed by paddle's import

import paddle  # noqa: E402,F401

if not _THREADS_SET_BY_USER:
    os.environ["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)


def child_environment(**extra: str) -> dict[str, str]:
    """The environment for a child Python process that imports paddle itself: without the
    thread count set here (paddle warns at import when it finds one above 1)."""
    env = dict(os.environ, **extra)
    if not _THREADS_SET_BY_USER:
        env.pop("OMP_NUM_THREADS", None)
    return env
