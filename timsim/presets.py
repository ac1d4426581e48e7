"""Framework presets: the correction defaults of verl and TRL as timsim configs, with their meaning.

A preset is a named set of config values. `structure` fixes what the framework's method *is*
(the mode, the loss, the corrections and how rejected tokens count); a config that also sets
one of those keys to another value is an error. `knobs` are the framework's default thresholds;
a config may override them, as the frameworks' own preset functions take them as arguments.
`correction.preset` selects one; the config validator expands it before validation
(`expand`), so the manifest records both the name and every value it set.

Where timsim's defaults mean something else than the framework's, the preset says so:
- mode: verl's "decoupled" is timsim's recompute (pi_old is the learner's forward); verl's and
  TRL's "bypass" ratio pi_theta / mu is timsim's bypass. TRL always recomputes pi_old.
- rejection bands: verl's k1 rejection is a two-sided band on the ratio (token: `token_mask`,
  sequence sum: `seq_mask`, sequence mean: `geometric`), not timsim's one-sided nats threshold
  (`kl_rejection` with k1); verl's k3 rejection is `kl_rejection` with k3 and the mean.
- the denominator: TRL's masks and verl's IcePop zero a rejected token's weight and keep it in
  the loss's denominator (`correction.rejected=zero`); verl's rejection sampling removes it
  (`drop`, timsim's default).
- TRL's masks are one-sided (reject r > cap): the lower bound is set below the ±20 clamp.
- per-minibatch weights: in bypass verl recomputes its weights and masks from the current
  policy at every minibatch (`correction.bypass_weights=current`); timsim's other bypass
  settings compute them once per step from pi_old.
- clamping: timsim clamps each token's log-ratio to ±20 before a sequence sums them, verl
  clamps the sum; the two differ only for a token with |delta| > 20.
"""

from __future__ import annotations

import copy
from typing import Any

from timsim.config_types import FIELD_MARK
from timsim.registry import Registry

PRESETS: Registry[dict[str, Any]] = Registry("correction preset", "correction.preset", knobs={}, doc="", source="")

_VERL = "verl RolloutCorrectionConfig"
_TIS2 = {"correction.tis_cap": 2.0}
_GEO = {"correction.geo_low": 0.999, "correction.geo_high": 1.001}
_K3 = {"correction.kl_threshold": 0.01}
_K3_STRUCTURE = {"correction.kl_estimator": "k3", "correction.kl_aggregate": "mean"}
# TRL masks only above the cap; a lower bound below exp(-20) (the log-ratio clamp) never rejects.
_NO_LOWER = 1e-9
_TRL_CAP = 3.0


def _add(name: str, doc: str, source: str, structure: dict[str, Any], knobs: dict[str, Any] | None = None) -> None:
    PRESETS.add(name, structure, knobs=knobs or {}, doc=doc, source=source)


def _verl(name: str, doc: str, mode: str, kinds: list[str], knobs: dict[str, Any] | None = None,
          loss: str = "ppo", extra: dict[str, Any] | None = None, source: str | None = None) -> None:
    structure = {"grpo.old_logprobs": mode, "grpo.loss": loss, "correction.kinds": kinds, **(extra or {})}
    if mode == "bypass" and kinds:  # verl's bypass: weights and masks of pi_theta / mu at every minibatch
        structure["correction.bypass_weights"] = "current"
    _add(f"verl/{name}", doc, source or f"{_VERL}.{name}()", structure, knobs)


_verl("decoupled_token_is", "recompute + token TIS, cap 2", "recompute", ["token_tis"], _TIS2)
_verl("decoupled_seq_is", "recompute + sequence TIS, cap 2", "recompute", ["seq_tis"], _TIS2)
_verl("decoupled_seq_is_rs", "recompute + sequence TIS (cap 2) + sequence ratio band [0.5, 2] (seq_sum_k1)",
      "recompute", ["seq_tis", "seq_mask"], {**_TIS2, "correction.seq_low": 0.5, "correction.seq_high": 2.0})
_verl("decoupled_geo_rs", "recompute + geometric-mean ratio band [0.999, 1.001] (seq_mean_k1)", "recompute",
      ["geometric"], _GEO)
_verl("decoupled_geo_rs_seq_tis", "decoupled_geo_rs + sequence TIS, cap 2", "recompute", ["geometric", "seq_tis"],
      {**_GEO, **_TIS2})
_verl("decoupled_geo_rs_token_tis", "decoupled_geo_rs + token TIS, cap 2", "recompute", ["geometric", "token_tis"],
      {**_GEO, **_TIS2})
_verl("decoupled_k3_rs", "recompute + reject a response whose mean k3 exceeds 0.01 (seq_mean_k3)", "recompute",
      ["kl_rejection"], _K3, extra=_K3_STRUCTURE)
_verl("decoupled_k3_rs_seq_tis", "decoupled_k3_rs + sequence TIS, cap 2", "recompute", ["kl_rejection", "seq_tis"],
      {**_K3, **_TIS2}, extra=_K3_STRUCTURE)
_verl("decoupled_k3_rs_token_tis", "decoupled_k3_rs + token TIS, cap 2", "recompute", ["kl_rejection", "token_tis"],
      {**_K3, **_TIS2}, extra=_K3_STRUCTURE)
_verl("token_is_rs", "recompute + token TIS (cap 2) + token ratio band [0.5, 2] (token_k1)", "recompute",
      ["token_tis", "token_mask"], {**_TIS2, "correction.mis_low": 0.5, "correction.mis_high": 2.0},
      source=f"{_VERL}(rollout_is='token', rollout_rs='token_k1', rollout_rs_threshold='0.5_2.0'): a documented "
             "combination without a factory")
_verl("bypass_ppo_clip", "bypass: PPO-clip on pi_theta / mu, no weights", "bypass", [])
_verl("bypass_ppo_clip_geo_rs", "bypass + geometric-mean ratio band [0.999, 1.001]", "bypass", ["geometric"], _GEO)
_verl("bypass_ppo_clip_k3_rs", "bypass + mean-k3 rejection at 0.01", "bypass", ["kl_rejection"], _K3,
      extra=_K3_STRUCTURE)
_verl("bypass_pg_is", "bypass REINFORCE with a sequence weight min(pi / mu, 2)", "bypass", ["seq_tis"], _TIS2,
      loss="reinforce")
_verl("bypass_pg_geo_rs", "bypass REINFORCE + geometric-mean ratio band [0.999, 1.001]", "bypass", ["geometric"],
      _GEO, loss="reinforce")
_verl("bypass_pg_geo_rs_seq_tis", "bypass_pg_geo_rs + sequence weight, cap 2", "bypass", ["geometric", "seq_tis"],
      {**_GEO, **_TIS2}, loss="reinforce")
_verl("bypass_pg_geo_rs_token_tis", "bypass_pg_geo_rs + token weight, cap 2", "bypass", ["geometric", "token_tis"],
      {**_GEO, **_TIS2}, loss="reinforce")
_add("verl/icepop", "recompute + token IS kept inside [0.5, 5]; a rejected token keeps its place in the denominator "
     "with weight 0", "verl's IcePop (token IS with a two-sided mask)",
     {"grpo.old_logprobs": "recompute", "grpo.loss": "ppo", "correction.kinds": ["token_mis"],
      "correction.rejected": "zero"}, {"correction.mis_low": 0.5, "correction.mis_high": 5.0})

for _mode, _kind, _knobs in (
        ("token_truncate", "token_tis", {"correction.tis_cap": _TRL_CAP}),
        ("token_mask", "token_mis", {"correction.mis_low": _NO_LOWER, "correction.mis_high": _TRL_CAP}),
        ("sequence_truncate", "seq_tis", {"correction.tis_cap": _TRL_CAP}),
        ("sequence_mask", "seq_mis", {"correction.seq_low": _NO_LOWER, "correction.seq_high": _TRL_CAP})):
    _masks = _mode.endswith("mask")
    _add(f"trl/{_mode}",
         f"recompute + {'the ratio, zeroed above' if _masks else 'the ratio truncated at'} cap {_TRL_CAP:g} "
         f"per {_mode.split('_')[0]}" + ("; a zeroed token stays in the denominator" if _masks else ""),
         f"TRL GRPOConfig(vllm_importance_sampling_correction=True, vllm_importance_sampling_mode={_mode!r}, "
         f"vllm_importance_sampling_cap={_TRL_CAP:g})",
         {"grpo.old_logprobs": "recompute", "grpo.loss": "ppo", "correction.kinds": [_kind],
          **({"correction.rejected": "zero"} if _masks else {})}, _knobs)


_MISSING = object()


def _get(raw: dict, dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(raw: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return  # the config's validation reports the malformed section
    node[leaf] = value


def expand(raw: dict) -> dict:
    """`raw` (a config as a dict) with `correction.preset`'s values filled in. A structural value
    the config already sets differently is a ValueError that names both; knobs keep the config's."""
    correction = raw.get("correction")
    name = correction.get("preset") if isinstance(correction, dict) else None
    if name is None:
        return raw
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"{FIELD_MARK}correction.preset{FIELD_MARK}unknown preset {name!r}; accepted: "
                         f"{', '.join(PRESETS)}")
    entry = PRESETS.entry(name)
    out = copy.deepcopy(raw)
    for dotted, value in entry.value.items():
        have = _get(out, dotted)
        if have is not _MISSING and have != value:
            raise ValueError(f"{FIELD_MARK}{dotted}{FIELD_MARK}correction.preset={name!r} sets {dotted}={value!r}, but "
                             f"the config sets {have!r}: remove {dotted} (the preset fixes it), or choose another "
                             "preset")
        _set(out, dotted, value)
    for dotted, value in entry.knobs.items():
        if _get(out, dotted) is _MISSING:
            _set(out, dotted, value)
    return out


def describe() -> list[dict[str, str]]:
    """One row per preset: name, what it does, the framework call it reproduces, its values."""
    def show(values: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in values.items())

    return [{"preset": e.name, "what": e.doc, "framework": e.source,
             "sets": show(e.value), "thresholds (overridable)": show(e.knobs)} for e in PRESETS.entries()]
