"""The "advanced" form: one input per TrainConfig field, generated from the dataclasses.

`advanced_fields()` walks `config.iter_fields` (the same walk that generates the CLI flags), so a
field added to config/schema.py appears in the UI with its type, default and help text, grouped by its
section, without touching this file. `overrides()` turns the form's values back into dotted
settings: only the fields the user changed, so a preset's values stay in force for the others.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from ..config import TrainConfig, iter_fields, type_name

# Set by the main part of the Train tab (the first five), or not offered at all:
MAIN_FORM = ("model.path", "concept.instance_dir", "concept.instance_prompt", "concept.class_prompt",
             "concept.identifier", "train.output_dir", "train.resume", "preset")
NOT_OFFERED = {
    "concepts": "several concepts: YAML only (dreambooth train --config)",
    "model.allow_pickle": "the UI never loads pickle files",
}
# Fields that name a file or folder: checked against the workspace root like every other path.
PATH_FIELDS = ("model.vae_path", "concept.class_dir")


@dataclass(frozen=True)
class FieldSpec:
    key: str  # dotted, e.g. "optim.lr"
    section: str  # "optim"
    kind: str  # bool | optional_bool | choice | list | text
    type_name: str  # as `dreambooth train --help` shows it
    default: Any
    help: str
    choices: tuple = ()

    @property
    def label(self) -> str:
        return self.key.split(".", 1)[-1]

    def display_default(self):
        """The default as the input shows it."""
        if self.kind == "bool":
            return bool(self.default)
        if self.kind == "optional_bool":
            return AUTO if self.default is None else str(self.default).lower()
        if self.kind == "list":
            return "\n".join(map(str, self.default or []))
        return "" if self.default is None else str(self.default)


AUTO = "auto (default)"


def advanced_fields() -> list[FieldSpec]:
    """Every TrainConfig field the advanced form offers, in the dataclasses' order (config/schema.py)."""
    specs = []
    for key, tp, default, help_text in iter_fields(TrainConfig):
        if key in MAIN_FORM or key in NOT_OFFERED:
            continue
        optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
        base = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
        if base is bool:
            kind, choices = ("optional_bool", (AUTO, "true", "false")) if optional else ("bool", ())
        elif typing.get_origin(base) is typing.Literal:
            kind, choices = "choice", typing.get_args(base)
        elif typing.get_origin(base) is list:
            kind, choices = "list", ()
        else:
            kind, choices = "text", ()
        specs.append(FieldSpec(key, key.split(".")[0] if "." in key else "general", kind, type_name(tp), default,
                               help_text, tuple(choices)))
    return specs


def sections(specs: list[FieldSpec]) -> dict[str, list[FieldSpec]]:
    grouped: dict[str, list[FieldSpec]] = {}
    for spec in specs:
        grouped.setdefault(spec.section, []).append(spec)
    return grouped


def overrides(specs: list[FieldSpec], values: list) -> dict[str, Any]:
    """The changed fields as dotted settings; values are converted and checked later, by build_config."""
    if len(specs) != len(values):
        raise ValueError(f"{len(values)} values for {len(specs)} fields")
    out: dict[str, Any] = {}
    for spec, value in zip(specs, values):
        if value is None or value == spec.display_default():
            continue
        if spec.kind == "optional_bool":
            out[spec.key] = None if value == AUTO else value == "true"
        elif spec.kind == "list":
            out[spec.key] = [line.strip() for line in str(value).splitlines() if line.strip()]
        elif spec.kind == "text":
            text = str(value).strip()
            out[spec.key] = None if text.lower() in {"", "null", "none"} else text
        else:
            out[spec.key] = value
    return out
