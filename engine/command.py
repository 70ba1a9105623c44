"""`python main.py`: the settings, then the run; every ending as an exit status.

The settings are read and checked before Paddle is imported: --help and a mistake in a
flag answer at once; Paddle loads (utils/runtime.start) only when work starts."""
from __future__ import annotations

import os
from collections.abc import Sequence

from utils import runtime
from utils.cli import run_main

from .config import Config, parse_config, resume_command

QUICK_START = "python main.py --config configs/sample_bottle.yaml (in the repository's folder)"


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 all asked for succeeded; 1 some class failed (the others finished);
    2 a mistake in the settings or inputs (one line); 130 interrupted (Ctrl-C); 143 SIGTERM."""
    interrupted = ["interrupted"]

    def body() -> None:
        cfg = parse_config(argv)
        if cfg.mode == "train":
            interrupted[0] = resume_hint(cfg)
        runtime.start()  # only now: Paddle, quietly, on every core; SIGTERM ends like Ctrl-C
        from .run import run

        check_data_folder(cfg)
        run(cfg)

    return run_main(body, interrupted=lambda: interrupted[0])


def resume_hint(cfg: Config) -> str:
    """What an interrupted training says: what is kept and the one command that continues."""
    return (f"interrupted; the training state saved every {cfg.save_interval} epoch(s) is kept: "
            f"continue with {resume_command(cfg)}")


def check_data_folder(cfg: Config) -> None:
    """A missing data folder or training run, named with the way to a first run."""
    from dataset import DataError

    if cfg.mode != "train" and not os.path.isdir(cfg.output_dir):
        raise DataError(f"{cfg.output_dir}: no training run here (no such folder); --mode {cfg.mode} reads "
                        f"the checkpoints of a run: train first, e.g. {QUICK_START}, or give its --output_dir")
    if not cfg.train_dir and not os.path.isdir(cfg.data_dir):
        default = "data_dir" not in cfg.explicit and cfg.data_dir == Config.data_dir
        raise DataError(f"{cfg.data_dir}: data directory not found"
                        + (" (the default --data_dir)" if default else "")
                        + f"; try the bundled sample first: {QUICK_START}, or give --data_dir DIR "
                          f"holding CLASS/train/good (the MVTec AD layout, README 'Data')")
