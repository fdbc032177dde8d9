"""Typed settings: the keys of a root of frozen dataclass sections, `section.key=value` overrides
parsed by each field's annotation (bool, int, float, str, `Literal[...]` choices, optional, tuples),
and nested dicts (a run's config.json) checked the same way. config.py holds the roots.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from jaxgpt.errors import ConfigError


def all_keys(root) -> list[str]:
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(root)
            for f in dataclasses.fields(getattr(root, s.name))]


def type_hints(section) -> dict[str, Any]:
    return typing.get_type_hints(section if isinstance(section, type) else type(section))


def _choices(annotation) -> tuple | None:
    """The allowed values of a Literal field (None included when optional), else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [_choices(a) for a in args if a is not type(None)]
        if len(inner) == 1 and inner[0] is not None:
            return inner[0] + ((None,) if type(None) in args else ())
    return None


def type_name(annotation) -> str:
    """How --help writes a field's type: its choices, or the type's name."""
    if (choices := _choices(annotation)) is not None:
        return " | ".join("none" if c is None else str(c) for c in choices)
    if typing.get_origin(annotation) is tuple:
        return f"comma-separated {typing.get_args(annotation)[0].__name__}s"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = (args[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType)
            else annotation)
    return getattr(base, "__name__", str(base)) + (" | none" if args else "")


def _parse(text: str, annotation: Any, key: str) -> Any:
    """Parse an override's text by the field's type annotation."""
    if (choices := _choices(annotation)) is not None:
        for choice in choices:
            if (text == ("none" if choice is None else str(choice))
                    or (choice is None and text.lower() == "null")):
                return choice
        raise ConfigError(f"{key}={text}: expected one of "
                          f"{', '.join('none' if c is None else str(c) for c in choices)}")
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        return tuple(_parse(part.strip(), item, key) for part in text.split(",") if part.strip())
    try:
        if annotation is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            value = float(text)
            if value != int(value):
                raise ValueError
            return int(value)
        if annotation is float:
            return float(text)
        return text
    except ValueError:
        raise ConfigError(f"{key}={text}: expected {annotation.__name__}") from None


def _check(value: Any, annotation: Any, key: str) -> Any:
    """A value from a config file or JSON, checked (and normalised: int -> float, list -> tuple) by
    type."""
    if (choices := _choices(annotation)) is not None:
        if value not in choices:
            raise ConfigError(f"{key}={value!r}: expected one of "
                              f"{', '.join(repr(c) for c in choices)}")
        return value
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if typing.get_origin(annotation) is tuple and isinstance(value, (list, tuple)):
        return tuple(_check(v, typing.get_args(annotation)[0], key) for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(annotation, type) and not (isinstance(value, annotation) and
                                            (annotation is bool or not isinstance(value, bool))):
        raise ConfigError(f"{key}={value!r}: expected {type_name(annotation)}")
    return value


def _unknown(key: str, keys: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    return ConfigError(f"unknown config key {key!r}"
                       + (f"; did you mean {', '.join(close)}?" if close else ""))


# Keys that were renamed, as configs, runs and command lines written before them still say them:
# the old key sets the new one (model.attention picked the norm, matmul and head kernels too).
RENAMED = {"model.attention": "model.kernels"}


def apply_overrides(root, overrides: list[str]):
    """A copy of `root` (a Config or a tool's root) with `section.key=value` overrides applied;
    an unknown key or a value of the wrong type fails at once."""
    keys = all_keys(root)
    changes: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = RENAMED.get(key.strip().lstrip("-"), key.strip().lstrip("-"))
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.n_layer=6")
        if key not in keys:
            raise _unknown(key, keys)
        section_name, name = key.split(".")
        changes.setdefault(section_name, {})[name] = _parse(
            text.strip(), type_hints(getattr(root, section_name))[name], key)
    return dataclasses.replace(root, **{s: dataclasses.replace(getattr(root, s), **c)
                                        for s, c in changes.items()})


def from_dict(d: dict, root_type: type):
    """Build a root from a (possibly partial) nested dict, e.g. a run's config.json."""
    root = root_type()
    if not isinstance(d, dict):
        raise ConfigError(f"a config is an object of sections, not {type(d).__name__}")
    sections = {}
    for section_name, values in d.items():
        if section_name not in {f.name for f in dataclasses.fields(root)}:
            raise ConfigError(f"unknown config section {section_name!r}")
        section = getattr(root, section_name)
        hints = type_hints(section)
        values = {RENAMED.get(f"{section_name}.{k}", f"{section_name}.{k}").split(".", 1)[1]: v
                  for k, v in values.items()}
        for name in values:
            if name not in hints:
                raise _unknown(f"{section_name}.{name}", all_keys(root))
        sections[section_name] = dataclasses.replace(
            section, **{k: _check(v, hints[k], f"{section_name}.{k}") for k, v in values.items()})
    return dataclasses.replace(root, **sections)
