"""Fan out a multi-class run: one class per device at a time, the common case on a
multi-GPU box (each class trains alone on its GPU; no gradient traffic at all).

    python tools/train_all.py --devices 0,1,2,3 -- --data_dir mvtec --config configs/rd4ad_wrn50.yaml

Everything after `--` goes to main.py unchanged (the class list comes from its --cls, or
every class under --data_dir). Each class runs as `main.py ... --cls CLASS` with
CUDA_VISIBLE_DEVICES set to its device, logging to OUTPUT_DIR/logs/CLASS.log. Classes that
already finished are skipped by main.py itself, so a killed fan-out is simply started
again (add --resume to continue unfinished classes from their training state). When every
class is done, one last `main.py` pass (all classes skipped) writes the combined
results.md / results.json / report.html.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a script in tools/: the repository's packages by path
from utils import runtime  # noqa: E402

runtime.start()  # before Paddle loads: a quiet import

from dataset import resolve_sources  # noqa: E402
from engine.config import parse_config  # noqa: E402
from engine.preflight import check_before_work, check_config  # noqa: E402
from utils.cli import OneLineArgumentParser, run_main, stop_on_sigterm  # noqa: E402
from utils.config import ConfigError  # noqa: E402
from utils.lock import TOKEN_ENV, OutputLock  # noqa: E402
from utils.runtime import child_environment  # noqa: E402


def visible_device(device: str, visible: str | None = None) -> str:
    """The GPU a child sees as its only one: --devices counts the GPUs this process may use,
    so under CUDA_VISIBLE_DEVICES=2,3 device 0 is GPU 2, not GPU 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    ids = [d.strip() for d in (visible or "").split(",") if d.strip()]
    if not ids:
        return device
    if int(device) >= len(ids):
        raise ConfigError(f"--devices {device}: CUDA_VISIBLE_DEVICES={visible} leaves {len(ids)} GPU(s), "
                          f"numbered 0..{len(ids) - 1}")
    return ids[int(device)]


def main(argv: list[str] | None = None) -> int:
    stop_on_sigterm()  # a supervisor's SIGTERM cleans up like Ctrl-C (exit 143)
    return run_main(lambda: fan_out(sys.argv[1:] if argv is None else argv),
                    interrupted="interrupted; run again with --resume to continue")


def fan_out(argv: list[str]) -> int:
    ours, main_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="0", help="comma list of GPU ids; one class runs on each at a time")
    args = p.parse_args(ours)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if not devices or not all(d.isdigit() for d in devices):
        raise ConfigError(f"--devices {args.devices[:80]!r}: expected a comma list of GPU ids such as 0,1")
    for device in devices:
        visible_device(device)  # each within CUDA_VISIBLE_DEVICES, before anything starts
    cfg = parse_config(main_args)
    if cfg.mode != "train":
        raise ConfigError("tools/train_all.py runs training; use main.py for --mode eval/infer")
    # main.py's own checks, once for every class, before any child starts or anything is written
    check_config(cfg)
    sources = resolve_sources(cfg.data_dir, cfg.cls, cfg.train_dir, cfg.test_dir, cfg.layout)
    check_before_work(cfg, sources)
    classes = [s.name for s in sources]
    os.makedirs(cfg.output_dir, exist_ok=True)
    with OutputLock(cfg.output_dir) as lock:  # the children write into it under this lock
        return run_classes(cfg, classes, devices, main_args, lock.token)


def stop_children(procs: list[subprocess.Popen], grace: float = 60.0) -> None:
    """Ctrl-C each child (it saves nothing half-written and exits 130), then kill what
    is still running after `grace` seconds: no child may outlive the lock."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.time() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_classes(cfg, classes: list[str], devices: list[str], main_args: list[str], token: str | None) -> int:
    log_dir = cfg.paths.log_dir()
    os.makedirs(log_dir, exist_ok=True)
    print(f"{len(classes)} classes on devices {', '.join(devices)}; logs in {log_dir}")

    queue, running, outcome = list(classes), {}, {}
    started = time.time()
    try:
        while queue or running:
            for device in devices:
                if device not in running and queue:
                    cls = queue.pop(0)
                    log = open(os.path.join(log_dir, f"{cls}.log"), "w", encoding="utf-8")
                    env = child_environment(CUDA_VISIBLE_DEVICES=visible_device(device),
                                            **({TOKEN_ENV: token} if token else {}))
                    cmd = [sys.executable, os.path.join(ROOT, "main.py"), *main_args, "--cls", cls]
                    running[device] = (cls, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                             env=env, preexec_fn=_die_with_parent), log, time.time())
                    print(f"  start {cls} on device {device}")
            time.sleep(0.2)
            for device, (cls, proc, log, t0) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    outcome[cls] = (proc.returncode, time.time() - t0, device)
                    print(f"  {'done  ' if proc.returncode == 0 else 'FAILED'} {cls} on device {device} "
                          f"({time.time() - t0:.0f} s)")
                    del running[device]
    finally:  # interrupted (or failed): the children stop too, before the lock is released
        stop_children([proc for _, proc, _, _ in running.values()])

    print("\n| Class | Device | Seconds | Exit |\n| --- | --- | ---: | ---: |")
    for cls in classes:
        code, seconds, device = outcome[cls]
        print(f"| {cls} | {device} | {seconds:.0f} | {code} |")
    failed = [c for c in classes if outcome[c][0] != 0]
    if failed:
        print(f"\n{len(failed)} class(es) failed: {', '.join(failed)} (see {log_dir}); "
              f"run again to retry them (finished classes are skipped)", file=sys.stderr)
        return 1
    # Every class finished: main.py skips them all and writes the combined table and report.
    final = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *main_args], cwd=ROOT,
                           capture_output=True, text=True,
                           env=child_environment(**({TOKEN_ENV: token} if token else {})))
    if final.returncode != 0:
        print(final.stderr, file=sys.stderr)
        return final.returncode
    print(final.stdout.strip().split("\n\n")[-1])
    print(f"all {len(classes)} classes in {time.time() - started:.0f} s; results in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
