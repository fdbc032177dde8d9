"""What every `python -m jaxgpt.<module>` command line shares: --help and one-line user errors."""
from __future__ import annotations

import dataclasses
import sys

from jaxgpt import hardware
from jaxgpt.config import Config
from jaxgpt.errors import JaxgptError


def config_help() -> str:
    """Every config key with its type and default, for --help."""
    lines = []
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            default = getattr(section.default_factory(), f.name)
            lines.append(f"  {section.name}.{f.name}={default!r}  ({f.type})")
    return "\n".join(lines)


def run(main, argv: list[str], usage: str, tune_host: bool = True) -> None:
    """Call main(argv) on a host tuned for XLA (hardware.tune_host); a JaxgptError becomes
    `error: ...` on stderr and exit status 2."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {usage}\n\nconfig keys (override with key=value):\n{config_help()}")
        sys.exit(0 if argv else 2)
    if tune_host:
        hardware.tune_host()
    try:
        main(argv)
    except JaxgptError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
