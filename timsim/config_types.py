"""The building blocks of every config section: the error type, the traced and host-resolved
field annotations, the name rule for anything that becomes a path, and the frozen,
extra-forbidding base model (see `timsim.config`).

Strictness that every section shares lives here, once:
- no float field takes NaN or ±inf (`allow_inf_nan=False`): a non-finite learning rate or
  noise scale is a typo, never a setting;
- no number takes a boolean (pydantic's lax mode would read `true` as 1);
- a knob that has no effect under the section's chosen family, kind or mode is an error,
  not a silent no-op (each section lists its own in `inert_fields`).
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator


class ConfigError(ValueError):
    """A bad config value: the message names the field and what is accepted."""



def registered(registry, extra: tuple[str, ...] = ()):
    """A `str` field whose value must be a name in `registry` (a `timsim.registry.Registry`) or
    one of `extra` (e.g. "none"); the error lists every accepted name."""

    def check(name: str) -> str:
        if name in extra or name in registry:
            return name
        raise ValueError(f"unknown {registry.kind} {name!r}; accepted: {', '.join((*extra, *registry))}")

    return Annotated[str, AfterValidator(check)]

TRACED = "traced"
Traced = Annotated[float, TRACED]
# Resolved on the host before a program runs (e.g. a calibration target): never selects a
# program and never reaches one (not in `traced_values`).
HOST = "host"
HostValue = Annotated[float | None, HOST]

_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._=,+ -]{0,118}[A-Za-z0-9._=,+-])?")
NAME_RULE = ("1-120 characters from letters, digits, inner spaces and . _ = , + -, starting with a letter or "
             "digit (it becomes a directory or file name under the results root)")


def name_problem(name: Any) -> str | None:
    """Why `name` is not safe as one path component under the results root (None if it is):
    no separators, no `..`, not empty, no leading dot or dash."""
    return None if isinstance(name, str) and _NAME.fullmatch(name) else f"a name must be {NAME_RULE}"


def check_name(name: Any, field: str) -> str:
    """`name`, or a ConfigError naming `field` when it is not a safe name."""
    problem = name_problem(name)
    if problem:
        raise ConfigError(f"Invalid {field} {name!r}: {problem}.")
    return name


def inside(root: str | Path, *names: str) -> Path:
    """`root / names...`, after checking that the result stays inside `root` (a last guard
    behind `check_name`: symlinks and odd names cannot write outside the results root)."""
    root_path = Path(root)
    path = root_path.joinpath(*names)
    if not path.resolve().is_relative_to(root_path.resolve()):
        raise ConfigError(f"Path {str(path)!r} would lie outside the results root {str(root_path)!r}; "
                          f"names must be {NAME_RULE}.")
    return path


# A model-level error about one field starts FIELD_MARK name FIELD_MARK: the error formatter
# joins the name to the section's location, so the message names the full dotted field.
FIELD_MARK = "\x1f"


def _admits_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    if typing.get_origin(annotation) is typing.Literal:
        return any(isinstance(a, bool) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, Annotated):
        return any(_admits_bool(a) for a in typing.get_args(annotation))
    return False


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if _holds_bool(value) and not _admits_bool(annotation) and not (
                isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ValueError("a boolean (true/false) is not accepted here; give a number or name")
        return value

    def inert_fields(self) -> dict[str, str]:
        """Fields that have no effect under this section's other choices: {field: why}.
        Setting one of them to anything but its default is an error (see `_no_inert_knobs`)."""
        return {}

    @model_validator(mode="after")
    def _no_inert_knobs(self):
        for name, why in self.inert_fields().items():
            if name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].get_default(
                    call_default_factory=True):
                raise ValueError(f"{FIELD_MARK}{name}{FIELD_MARK}{getattr(self, name)!r} has no effect: {why}; "
                                 "remove it, or choose a setting that uses it")
        return self
