"""Traced hyperparameters as a typed pytree generated from the config schema.

Every field the schema marks `Traced` (scales, learning rate, clip epsilons, thresholds) becomes
an array leaf of `Hyper`, nested like the config: ``hp.grpo.lr``,
``hp.perturbation.logit_noise.scale``, ``hp.correction.tis_cap``, plus ``hp.seed``. Runs that
differ only in these values share one compiled program: they ride a leading run axis
(`stack`). The classes are generated, so a traced field added to the schema is a leaf here
with no other edit; a section without traced fields has no class.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from pydantic import BaseModel

from timsim.config import Config, get_dotted
from timsim.config_types import TRACED


def _generate(model: type[BaseModel], name: str) -> type | None:
    """A frozen pytree dataclass with one field per traced field or traced subsection of `model`."""
    fields: dict[str, Any] = {}
    for field_name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            sub = _generate(ann, f"{name}{field_name.title().replace('_', '')}")
            if sub is not None:
                fields[field_name] = sub
        elif TRACED in field.metadata:
            fields[field_name] = jax.Array
    if not fields:
        return None
    cls = type(f"{name}Hyper", (), {"__annotations__": fields, "__module__": __name__,
                                    "__doc__": f"Traced values of `{model.__name__}` (a pytree)."})
    return struct.dataclass(cls)


_Sections = _generate(Config, "")
Hyper = struct.dataclass(type("Hyper", (_Sections,), {
    "__annotations__": {"seed": jax.Array}, "__module__": __name__,
    "__doc__": "Every traced value of one run (or, stacked, of a run axis), and its seed."}))


def of(cfg: Config, seed: int | float = 0) -> Hyper:
    """The traced values of `cfg` (float32 scalars) with `seed`."""

    def nest(cls, node):
        kwargs = {}
        for f in dataclasses.fields(cls):
            value = getattr(node, f.name)
            kwargs[f.name] = nest(f.type, value) if isinstance(value, BaseModel) else jnp.float32(value)
        return cls(**kwargs)

    return Hyper(**{f.name: nest(f.type, getattr(cfg, f.name)) for f in dataclasses.fields(_Sections)},
                 seed=jnp.float32(seed))


def stack(hypers: list[Hyper]) -> Hyper:
    """Stack runs along a leading run axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *hypers)


def get(hp: Hyper, dotted: str) -> jax.Array:
    """The leaf at a dotted config key, e.g. ``get(hp, "perturbation.logit_noise.scale")``."""
    return get_dotted(hp, dotted)


def replace(hp: Any, dotted: str, value) -> Any:
    """`hp` with the leaf at a dotted config key replaced by `value`."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return hp.replace(**{head: value})
    return hp.replace(**{head: replace(getattr(hp, head), rest, value)})
