"""Settings as a dataclass: flags, a YAML file of flag values, and the YAML a run saves.

A settings class declares each field with `setting(default, help, ...)`; from that one
declaration come the command-line flag (with its default in --help), the check of a
YAML file's keys, types and choices, and the YAML written back. Nothing here knows what
the settings mean.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from .cli import OneLineArgumentParser, nan_or_float_flag, number_problem, parse_bool, uint32_flag
from .errors import UserError, shorten
from .files import NotARegularFile, open_regular

MAX_CONFIG_BYTES = 1 << 20   # a config of flag values is a few hundred bytes
MAX_YAML_ALIASES = 20        # bounds what an alias bomb can expand to


class ConfigError(UserError):
    """A setting that cannot work (checked before any work starts)."""


def setting(default: Any, help: str, *, choices: Sequence | None = None, group: str | None = None,
            off_flag: str | None = None, internal: bool = False, unsigned_32: bool = False,
            nan_means_unset: bool = False) -> Any:
    """A dataclass field that is also a flag. `off_flag` makes a True-by-default bool a
    switch that turns it off (--no_report); a False-by-default bool is a switch that turns
    it on. `internal`: not a flag, not saved (bookkeeping of the run). A whole number is
    a 32-bit int, `unsigned_32` an unsigned one; any other number a float32 (utils/cli.py),
    which may be nan when `nan_means_unset`."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": tuple(choices) if choices else None, "group": group,
        "off_flag": off_flag, "internal": internal, "unsigned_32": unsigned_32,
        "nan_means_unset": nan_means_unset})


def _flag_fields(kind: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(kind) if not f.metadata.get("internal")]


def build_parser(kind: type, description: str, *, suppress: bool = False,
                 epilog: str | None = None) -> argparse.ArgumentParser:
    """The command line of a settings class; every flag's help ends with its default.
    suppress=True: a parser that returns only the flags actually given."""
    parser = OneLineArgumentParser(description=description, add_help=not suppress, epilog=epilog,
                                   argument_default=argparse.SUPPRESS if suppress else None)
    groups: dict[str | None, Any] = {None: parser}
    for f in _flag_fields(kind):
        meta = f.metadata
        target = groups.get(meta["group"]) or groups.setdefault(
            meta["group"], parser.add_argument_group(meta["group"]))
        if isinstance(f.default, bool):
            # a switch: its default is not to give it (--no_report: the report is written);
            # --flag=True / --flag=False also work, as TIPC's scripts write them
            off = bool(meta["off_flag"])
            target.add_argument(meta["off_flag"] or f"--{f.name}", dest=f.name, nargs="?", const=not off,
                                type=_switch(off), metavar="BOOL", help=f"{meta['help']} (default: off)",
                                **({} if suppress else {"default": f.default}))
            continue
        choices = f"; one of {', '.join(map(str, meta['choices']))}" if meta["choices"] else ""
        default = "none" if f.default == "" else f.default
        kind = (uint32_flag if meta.get("unsigned_32") else nan_or_float_flag if meta.get("nan_means_unset")
                else type(f.default))
        target.add_argument(f"--{f.name}", type=kind, choices=meta["choices"],
                            **({} if suppress else {"default": f.default}),
                            help=f"{meta['help']}{choices} (default: {default})", metavar=_metavar(f))
    return parser


def _switch(off: bool) -> Callable[[str], bool]:
    """The setting a switch's value gives: --amp=True turns amp on, --no_report=True turns
    the report off."""
    return lambda value: parse_bool(value) != off


def _metavar(f: dataclasses.Field) -> str:
    return {int: "N", float: "X"}.get(type(f.default), "NAME" if f.metadata["choices"] else "TEXT")


def given_flags(kind: type, argv: Sequence[str] | None) -> dict[str, Any]:
    """The settings named on the command line, with their values (no defaults)."""
    return vars(build_parser(kind, "", suppress=True).parse_known_args(argv)[0])


def read_yaml_mapping(path: str, what: str = "config file") -> dict:
    """A YAML mapping from a file, read safely (no code, bounded size and aliases)."""
    import yaml

    try:
        with open_regular(path) as f:  # a FIFO or device: refused, never blocks
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except NotARegularFile as err:
        raise ConfigError(f"{path}: cannot read {what} ({err.reason})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what} ({err.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {what} larger than {MAX_CONFIG_BYTES >> 20} MB; expected a few flag: value lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        values = yaml.load(text, Loader=_bounded_loader(path)) or {}  # a SafeLoader: no code
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of flag: value")
    return values


def checked_values(kind: type, values: dict, path: str) -> dict[str, Any]:
    """A YAML mapping's values as settings of `kind`: each key a setting (or its off flag,
    e.g. no_report: true), each value of the setting's type and among its choices."""
    fields = {f.name: f for f in _flag_fields(kind)}
    off_flags = {f.metadata["off_flag"].lstrip("-"): f.name for f in fields.values() if f.metadata["off_flag"]}
    out = {}
    for key, value in values.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in off_flags and isinstance(value, bool):  # the flag's own spelling
            name, value = off_flags[name], not value
        if name not in fields or name == "config":
            raise ConfigError(f"{path}: unknown setting {shorten(key)}")
        kind_of = type(fields[name].default)
        if kind_of is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind_of) or (kind_of is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: {str(key)[:80]} must be {kind_of.__name__}, got {shorten(value)}")
        meta = fields[name].metadata
        problem = None
        if kind_of in (int, float) and not (meta.get("nan_means_unset") and value != value):  # nan
            problem = number_problem(value, unsigned_32=meta.get("unsigned_32", False))
        if problem:  # as a flag would be refused (utils/cli.py)
            raise ConfigError(f"{path}: {str(key)[:80]} {shorten(value)} {problem}")
        choices = fields[name].metadata["choices"]
        if choices and value not in choices:
            raise ConfigError(f"{path}: {key} must be one of {', '.join(map(str, choices))}, "
                              f"got {shorten(value)}")
        out[name] = value
    return out


def _bounded_loader(path: str):
    """yaml.SafeLoader that refuses more than MAX_YAML_ALIASES aliases: an alias bomb (a
    few hundred bytes that expand to gigabytes) is refused before anything walks it."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise ConfigError(f"{path}: more than {MAX_YAML_ALIASES} YAML aliases "
                                      f"(refused: a config of flags needs none)")
            return super().compose_node(parent, index)

    return BoundedLoader


def settings_dict(obj: Any) -> dict[str, Any]:
    """The settings of a dataclass instance (internal bookkeeping left out)."""
    return {f.name: getattr(obj, f.name) for f in _flag_fields(type(obj))}


def settings_yaml(obj: Any, leave_out: Sequence[str] = ()) -> str:
    """The settings actually used, as YAML that checked_values reads back."""
    import yaml

    return yaml.safe_dump({k: v for k, v in settings_dict(obj).items() if k not in leave_out},
                          sort_keys=False)
