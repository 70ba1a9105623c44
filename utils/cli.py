"""What every command line shares: one-line argparse mistakes and one error boundary.

Exit status: 0 when everything asked for succeeded; 1 when the run finished but some item
failed (PartialFailure); 2 for a mistake in the input (UserError, argparse); 130 on Ctrl-C;
143 on SIGTERM (what timeout, docker stop, Kubernetes and Slurm send), which ends a command
the way Ctrl-C does. Nothing here prints a traceback, except with RD4AD_DEBUG=1 for an
internal error.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys
from typing import Callable, NoReturn

from .errors import OutputError, PartialFailure, UserError, bounded_line, shorten
from .numbers import INT32_MAX, fits_float32, fits_int32

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process SIGTERM ended


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds (closing files, releasing the
    output lock) exactly as a Ctrl-C does."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated("SIGTERM")


def stop_on_sigterm() -> None:
    """SIGTERM ends the command like Ctrl-C (one line, exit 143). Paddle's import installs a
    C++ handler that prints a "FatalError: Termination signal" traceback: this, set after
    the import, replaces it."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def parse_bool(value: str | bool) -> bool:
    """A flag's True / False (also 1/0, yes/no, on/off), as TIPC's scripts write them."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {shorten(value)}")


def number_problem(value: int | float, *, unsigned_32: bool = False) -> str | None:
    """Why a flag's (or a config key's) number cannot be used, or None. Whole numbers are
    used as 32-bit C ints (sizes, counts, threads, ports; a seed as an unsigned one), the
    others as float32 (learning rate, betas, thresholds): a value that overflows or
    underflows there is a usage error, not an internal error later or a silent 0."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if unsigned_32:
            return None if 0 <= value < 2 ** 32 else "must lie in 0..4294967295 (an unsigned 32-bit seed)"
        return None if fits_int32(value) else f"overflows a 32-bit integer (at most {INT32_MAX})"
    if not fits_float32(value):
        return "must be a finite number within float32's range (overflows, or underflows to 0)"
    return None


def int_flag(text: str) -> int:
    """type=int of every flag of this project's commands (OneLineArgumentParser)."""
    return _checked(int(text))


def uint32_flag(text: str) -> int:
    return _checked(int(text), unsigned_32=True)


def nan_or_float_flag(text: str) -> float:
    """A float flag whose nan means 'not given' (main.py --threshold)."""
    value = float(text)
    return value if math.isnan(value) else float_flag(text)


def float_flag(text: str) -> float:
    """type=float of every flag of this project's commands (OneLineArgumentParser)."""
    return _checked(float(text))


def _checked(value, **limits):
    """`value`, or argparse's one-line usage error naming what overflows or vanishes."""
    problem = number_problem(value, **limits)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


class OneLineHelp(argparse.RawDescriptionHelpFormatter):
    """--help with each flag, its help and its default on one line; the description and
    the examples after the flags as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=160)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake (unknown flag, bad choice, bad number) is one line plus
    'see --help' instead of the whole usage block; --help gives one line per flag. A flag
    is never matched by a prefix (--epoch is not taken as --epochs)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", OneLineHelp)
        kwargs.setdefault("allow_abbrev", False)  # --epoch is a mistake, not --epochs
        super().__init__(*args, **kwargs)
        # every type=int / type=float flag is checked in the type it is used in
        self.register("type", int, int_flag)
        self.register("type", float, float_flag)

    def _get_value(self, action: argparse.Action, arg_string: str):
        """A number's problem as the project says it elsewhere: '--lr 1e-320: must be ...'."""
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as err:
            if (action.option_strings and action.type in (int, float, uint32_flag, nan_or_float_flag)
                    and "invalid" not in str(err.message)):
                given = arg_string if len(arg_string) <= 40 else arg_string[:40] + "..."
                raise argparse.ArgumentError(None, f"{action.option_strings[0]} {given}: {err.message}") from None
            raise

    def error(self, message: str) -> NoReturn:
        print(f"error: {bounded_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def run_main(body: Callable[[], int | None], *, interrupted: str | Callable[[], str] = "interrupted",
             user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command's body and turn every way it can end into an exit status and, for a
    failure, exactly one `error:` line on stderr. The body returns an exit status, or
    anything else for success; argparse's exit (--help: 0, a mistake: 2) is returned."""
    try:
        code = body()
        return code if isinstance(code, int) and not isinstance(code, bool) else EXIT_OK
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (EXIT_OK if done.code is None else EXIT_USAGE)
    except KeyboardInterrupt as err:
        return _interrupted(interrupted, isinstance(err, Terminated))
    except (UserError, *user_errors) as err:
        return _fail(str(err), EXIT_USAGE)
    except PartialFailure as err:
        return _fail(str(err), EXIT_FAILED)
    except MemoryError as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return _fail("out of memory" + (f" ({bounded_line(detail, 160)})" if detail else "")
                     + "; try a smaller --image_size or --batch_size", EXIT_USAGE)
    except OSError as err:
        if interrupt_inside_paddle(err):
            return _interrupted(interrupted, Terminated.__name__ in str(err))
        return _fail(describe_os_error(err), EXIT_USAGE)
    except Exception as err:  # a bug of ours: still one line, with a way to see more
        if os.environ.get("RD4AD_DEBUG"):
            raise
        return _fail(f"internal error ({type(err).__name__}: {bounded_line(str(err), 200)}); "
                     f"run again with RD4AD_DEBUG=1 for the traceback and report it", EXIT_FAILED)


def _interrupted(message: str | Callable[[], str], terminated: bool) -> int:
    text = message() if callable(message) else message
    if terminated:
        return _fail(text.replace("interrupted", "stopped by SIGTERM", 1), EXIT_TERMINATED)
    return _fail(text, EXIT_INTERRUPTED)


def interrupt_inside_paddle(err: OSError) -> bool:
    """Paddle runs a PyLayer's Python backward (model/onednn.py's convolutions) from C++ and
    hands a Ctrl-C (or SIGTERM) that lands there back as an OSError "(External) ...
    KeyboardInterrupt" (or "Terminated")."""
    text = str(err)
    return text.lstrip().startswith("(External)") and ("KeyboardInterrupt" in text or Terminated.__name__ in text)


def describe_os_error(err: OSError) -> str:
    name = err.filename if err.filename is not None else "output"
    if err.errno == errno.ENOSPC:
        return f"{name}: no space left on device (earlier files are kept)"
    return f"{name}: {err.strerror or type(err).__name__}"


def _fail(message: str, code: int) -> int:
    print(f"error: {bounded_line(message)}", file=sys.stderr)
    return code


def output_error(path: str, err: OSError) -> OutputError:
    """An OSError while writing `path`, as a one-line user error."""
    if err.errno == errno.ENOSPC:
        return OutputError(f"{path}: no space left on device (the previous version is kept)")
    return OutputError(f"{path}: cannot write ({err.strerror or type(err).__name__})")
