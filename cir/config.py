"""Typed job configs: dataclasses filled from a YAML file plus `key.path=value` overrides
(`stages.finetune.optim.lr=1e-4` names an item of a list of named sections).

Unknown keys are errors (a typo in a config must not silently fall back to a default),
and every value is checked against the field's type when it is set.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _check_type(value, hint, where: str):
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{where}: {value!r} does not fit {hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        items = [_check_type(v, args[0] if args else Any, where) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {value!r}")
        args = typing.get_args(hint)
        if not args:
            return value
        return {_check_type(k, args[0], where): _check_type(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise TypeError(f"{where}: expected {hint.__name__}, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise TypeError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a (nested) mapping, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(names))}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _child(node, key: str, dotted: str):
    """The section `key` of `node`; in a list of named sections (the train job's
    `stages`), the one whose `name` is `key`."""
    if isinstance(node, list):
        for item in node:
            if isinstance(item, dict) and item.get("name") == key:
                return item
        names = [item.get("name") for item in node if isinstance(item, dict)]
        raise ValueError(f"override {dotted!r}: no item named {key!r} (named: {', '.join(map(str, names))})")
    child = node.setdefault(key, {})
    if not isinstance(child, (dict, list)):
        raise ValueError(f"override {dotted!r}: {key!r} is not a section")
    return child


def _set_path(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = _child(node, key, dotted)
    if isinstance(node, list):
        raise ValueError(f"override {dotted!r}: set a field of an item, e.g. {dotted}.<field>=VALUE")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'mine.band=[0.8, 0.95]' -> ('mine.band', [0.8, 0.95]) (values parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not of the form key.path=value")
    return key.strip(), yaml.safe_load(raw)


def load_config(cls: type[T], path: str | Path | None = None, overrides=()) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then `overrides` (key, value)."""
    data = dataclasses.asdict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        _merge(data, loaded, str(path))
    for key, value in overrides:
        _set_path(data, key, value)
    return from_dict(cls, data, where=str(path or cls.__name__))


def _merge(base: dict, update: dict, where: str) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, f"{where}:{key}")
        else:
            base[key] = value
