"""Named catalogues: noise families, corrections, losses, advantages, aggregations, metrics, tasks.

A catalogue is a `Registry`. Implementations register themselves where they are written,
with a decorator and the facts the rest of timsim needs about them (the knobs a noise family
reads, whether calibration may tune its scale, ...); the config validates names against the
registry, and `timsim metrics`, the README tables and the tests' coverage checks read it. So a
new noise family, correction, loss or metric is one function plus one registration.

This module imports nothing of timsim: every catalogue can sit at the bottom of the layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered implementation and what timsim needs to know about it."""

    name: str
    value: T
    info: dict[str, Any]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.info[key]
        except KeyError:
            raise AttributeError(f"{self.name!r} has no registered {key!r}") from None


class Registry(Mapping[str, T]):
    """An ordered catalogue of named implementations of one kind (a read-only mapping name -> value).

    `kind` names the catalogue in errors ("logit-noise family"), `field` the config field that
    selects from it ("perturbation.logit_noise.family"), so an unknown name is one sentence
    that names the field and lists the accepted values."""

    def __init__(self, kind: str, field: str, **defaults: Any):
        self.kind, self.field, self.defaults = kind, field, defaults
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str | None = None, **info: Any) -> Callable[[T], T]:
        """Decorator: register `value` under `name` (default: its `__name__`) with `info`."""

        def add(value: T) -> T:
            self.add(name or value.__name__, value, **info)
            return value

        return add

    def add(self, name: str, value: T, **info: Any) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        unknown = set(info) - set(self.defaults)
        if unknown:
            raise TypeError(f"{self.kind} {name!r}: unknown registration fact(s) {sorted(unknown)}; "
                            f"accepted: {sorted(self.defaults)}")
        self._entries[name] = Entry(name, value, {**self.defaults, **info})

    def check(self, name: str) -> str:
        """`name` if registered, else a ValueError listing the accepted names (the config's
        validation error adds the field)."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; accepted: {', '.join(self._entries)}")
        return name

    def entry(self, name: str) -> Entry[T]:
        return self._entries[self.check(name)]

    def __getitem__(self, name: str) -> T:
        return self.entry(name).value

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self, **where: Any) -> tuple[str, ...]:
        """Registered names, in registration order; `where` keeps those whose facts match."""
        return tuple(n for n, e in self._entries.items() if all(e.info[k] == v for k, v in where.items()))

    def union(self, fact: str) -> list[str]:
        """Every value of a tuple-valued fact over all entries, sorted (e.g. every knob read)."""
        return sorted({item for entry in self._entries.values() for item in entry.info[fact]})

    def entries(self) -> tuple[Entry[T], ...]:
        return tuple(self._entries.values())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
