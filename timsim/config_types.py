"""The building blocks of every config section: the error type, the traced and host-resolved
field annotations, and the frozen, extra-forbidding base model (see `timsim.config`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A bad config value: the message names the field and what is accepted."""


TRACED = "traced"
Traced = Annotated[float, TRACED]
# Resolved on the host before a program runs (e.g. a calibration target): never selects a
# program and never reaches one (not in `traced_values`).
HOST = "host"
HostValue = Annotated[float | None, HOST]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
