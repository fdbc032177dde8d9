"""The one command-line dialect of every `python -m jaxgpt.<module>`:

    python -m jaxgpt.<module> [VERB] [CONFIG.py | RUN_DIR ...] [section.key=value ...]

A module with several jobs takes a verb first. Operands (a config file, a run directory) come
before or among the `section.key=value` overrides; `--help` lists every key the command takes with
its type and default. A JaxgptError (what a user can fix) prints one line, `error: ...`, on stderr
and exits with status 2; bugs stay tracebacks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import re
import sys
from typing import Any, Callable

from jaxgpt import hardware
from jaxgpt.config import overrides
from jaxgpt.errors import ConfigError, JaxgptError

_OVERRIDE = re.compile(r"^-{0,2}[A-Za-z_]\w*\.\w+=")


@dataclasses.dataclass(frozen=True)
class Command:
    main: Callable[[list[str], list[str]], Any]  # main(operands, overrides)
    usage: str                                   # what follows `python -m jaxgpt.X [VERB] `
    root: type                                   # the config root whose keys it takes
    sections: tuple[str, ...] = ()               # the sections --help lists (default: all)
    operands: tuple[int, int] = (1, 1)           # how many operands: (at least, at most)
    tune_host: bool = True                       # hardware.tune_host() before main


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(operands, overrides): an override is `section.key=value`; anything else is an operand."""
    operands = [a for a in argv if not _OVERRIDE.match(a)]
    return operands, [a for a in argv if _OVERRIDE.match(a)]


def keys_help(root: type, sections: tuple[str, ...] = ()) -> str:
    """Every key of `root` (or of the named sections) with its default and type, for --help."""
    lines = []
    for section in dataclasses.fields(root):
        if sections and section.name not in sections:
            continue
        hints = overrides.type_hints(section.default_factory)
        for f in dataclasses.fields(section.default_factory):
            default = getattr(section.default_factory(), f.name)
            # written as an override would be, so a line can be pasted back
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else \
                "none" if default is None else \
                str(default).lower() if isinstance(default, bool) else default
            lines.append(f"  {section.name}.{f.name}={shown!s}  "
                         f"({overrides.type_name(hints[f.name])})")
    return "\n".join(lines)


def _usage(prog: str, commands: dict[str, Command] | Command) -> str:
    if isinstance(commands, Command):
        return f"usage: {prog} {commands.usage}"
    return "\n".join(f"usage: {prog} {verb} {c.usage}" for verb, c in commands.items())


def run(prog: str, commands: dict[str, Command] | Command, argv: list[str] | None = None) -> None:
    """Parse argv in the dialect above and call the command's main; `commands` is one Command, or
    a dict of them by verb."""
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    argv = [a for a in argv if a not in ("-h", "--help")]
    command, verb = commands, ""
    if isinstance(commands, dict):
        verb = argv.pop(0) if argv and argv[0] in commands else ""
        command = commands.get(verb)
    if command is None or (not argv and not wants_help and command.operands[0] > 0):
        print(_usage(prog, commands)
              + ("\n(--help lists every key)" if command is not None else ""),
              file=sys.stderr if not wants_help else sys.stdout)
        sys.exit(0 if wants_help else 2)
    if wants_help:
        name = f"{prog} {verb}".strip()
        print(f"usage: {name} {command.usage}\n\nkeys (set with section.key=value):\n"
              f"{keys_help(command.root, command.sections)}")
        sys.exit(0)
    operands, settings = split(argv)
    with one_line_errors(prog):
        low, high = command.operands
        if not low <= len(operands) <= high:
            raise ConfigError(f"expected {low if low == high else f'{low} to {high}'} operand(s) "
                              f"before the key=value settings, got {len(operands)} "
                              f"({' '.join(operands) or 'none'}); usage: {prog} "
                              f"{verb + ' ' if verb else ''}{command.usage.splitlines()[0]}")
        if command.tune_host:
            hardware.tune_host()
        command.main(operands, settings)


@contextlib.contextmanager
def one_line_errors(prog: str):
    """A JaxgptError as `error: ...` on stderr and status 2, Ctrl-C as `PROG: interrupted` and 130;
    anything else (a bug) stays a traceback. Every command line runs inside it (run, and scripts
    such as experiments/quickstart.py)."""
    try:
        yield
    except JaxgptError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # Ctrl-C outside train's own handler (which saves and resumes): one line
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def tool_config(root: type, settings: list[str], required: tuple[str, ...] = ()):
    """A tool's root built from its key=value settings, with the keys it cannot do without
    checked."""
    cfg = overrides.apply_overrides(root(), settings)
    for key in required:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) in ("", (), None):
            raise ConfigError(f"{key} is required (set {key}=...)")
    return cfg


def named_function(spec: str, key: str) -> Callable:
    """The callable "module:function" names (function may be dotted: "module:Class.method"); `key`
    (the setting that gave it) is named in the one-line error of a bad spec."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}={spec}: expected module:function")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # an error inside the user's module is still theirs to fix: one line
        raise ConfigError(f"{key}={spec}: cannot import {module_name} "
                          f"({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}={spec}: {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}={spec}: {module_name}.{attr} is not callable")
    return obj
