"""Settings in and out: nested dicts, YAML files and dotted overrides to a `TrainConfig`, and back.

Every value is converted to its field's type on the way in, and every unknown key, wrong type or
choice outside a Literal raises a `DreamBoothError` that names the dotted key (with a "did you
mean" for a near miss). The command line and the web UI describe a field's type with
`type_name`, the same way in both.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import DreamBoothError
from ..presets import TRAIN_PRESETS
from .schema import TrainConfig, field_types, strip_optional


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML or CLI value to the field's type; errors name the key."""
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    if value is None:
        if optional:
            return None
        raise DreamBoothError(f"{key} cannot be null")
    tp = strip_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise DreamBoothError(f"{key} must be a mapping of {sorted(f.name for f in dataclasses.fields(tp))}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            value = [value]
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise DreamBoothError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "yes", "1", "on", "false", "no", "0", "off"}:
            return value.lower() in {"true", "yes", "1", "on"}
        raise DreamBoothError(f"{key} must be true or false; got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise DreamBoothError(f"{key} must be a number; got {value!r}")
        try:
            converted = tp(value)
        except (TypeError, ValueError):
            raise DreamBoothError(f"{key} must be {'an integer' if tp is int else 'a number'}; got {value!r}") from None
        if tp is int and isinstance(value, float) and value != converted:
            raise DreamBoothError(f"{key} must be an integer; got {value!r}")
        return converted
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise DreamBoothError(f"{key} must be a string; got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys raise with a 'did you mean' hint."""
    names = {f.name for f in dataclasses.fields(cls)}
    hints = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(sorted(names))})"
            raise DreamBoothError(f"unknown setting {prefix}{key}{hint}")
        kwargs[key] = _convert(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    """A dataclass (a TrainConfig or one of its sections) as plain nested dicts and lists."""
    return dataclasses.asdict(obj)


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` merged in, recursively for nested mappings."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def dotted_to_nested(flat: dict[str, Any]) -> dict:
    """{'optim.lr': 1e-6} -> {'optim': {'lr': 1e-6}}"""
    nested: dict = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def load_yaml(path: str | Path) -> dict:
    """The mapping of settings in a YAML file; a missing file, bad YAML or a non-mapping raises naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DreamBoothError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DreamBoothError(f"{path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise DreamBoothError(f"{path} must hold a mapping of settings at the top level")
    return data


def yaml_text(cfg: TrainConfig) -> str:
    """The resolved configuration as YAML, in field order (what config.yaml files hold)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def build_config(*layers: dict) -> TrainConfig:
    """Merge nested-dict layers (later wins) over the defaults, applying a named preset first.

    A `preset` key in any layer selects a preset; the preset's values sit under every layer, so
    anything the user gives explicitly wins over it.
    """
    merged: dict = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    preset = merged.get("preset")
    if preset is not None:
        if preset not in TRAIN_PRESETS:
            raise DreamBoothError(f"unknown preset {preset!r}; choose one of {', '.join(TRAIN_PRESETS)}")
        merged = deep_merge(dotted_to_nested(TRAIN_PRESETS[preset]), merged)
    return from_dict(TrainConfig, merged)


def iter_fields(cls, prefix: str = ""):
    """Yield (dotted key, type, default, help) for every leaf field, for --help and the CLI parser."""
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, prefix + f.name + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        yield prefix + f.name, tp, default, f.metadata.get("help", "")


def type_name(tp) -> str:
    """A field's type as `--help` and the web UI show it: `int | null`, `{full,lora}`, `list`."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " | ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " | null"
    if origin is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    if origin is list:
        return "list"
    return getattr(tp, "__name__", str(tp))
