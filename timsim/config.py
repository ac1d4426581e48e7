"""Typed, validated, immutable configuration.

We use pydantic v2 (frozen models, ``extra="forbid"``): it names the failing field by its
dotted path, checks types and ranges declaratively, and gives JSON-able dumps for the
resolved config saved beside results. Every error reaches the user as one `ConfigError`
paragraph, never a traceback.

Fields are *static* (shapes, modes: they select the compiled program) or *traced*
(scales, learning rate, clip epsilons, seeds: array arguments with a leading run axis, so a
sweep over them shares one compiled program). Traced fields are declared with the
`Traced` annotation; `traced_values` collects them by dotted key and `static_view`
blanks them so the program builder cannot bake one in by accident.

The sections of the mismatch and its remedies (`perturbation`, `correction`) live in
`timsim.config_mismatch`, the shared building blocks in `timsim.config_types`; both are
importable from here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from timsim import presets
from timsim import tasks as tasks_lib
from timsim.grpo import ADVANTAGES, AGGREGATIONS, LOSSES
from timsim.kl import KL_ESTIMATORS
from timsim.corrections import CORRECTIONS
from timsim.config_mismatch import (TARGET_METRICS, CorrectionConfig, LogitNoiseConfig, PerturbationConfig,  # noqa: F401
                                    PrecisionConfig, TargetConfig, WeightNoiseConfig)
from timsim.config_types import (FIELD_MARK, HOST, TRACED, ConfigError, HostValue, Traced, _Section,  # noqa: F401
                                 check_name, inside, name_problem, registered)

TaskName = registered(tasks_lib.TASKS)
AdvantageName, AggregationName, LossName = registered(ADVANTAGES), registered(AGGREGATIONS), registered(LOSSES)
KLReferenceName = registered(KL_ESTIMATORS, extra=("none",))
MAX_SEED = 2**24  # seeds ride the float32 run axis with the traced values: integers are exact below 2^24


class TaskConfig(_Section):
    name: TaskName = "add"
    n_digits: int = Field(3, ge=1, le=256)
    modulus: int = Field(97, ge=2, description="modmul only")
    partial_credit: bool = False
    eval_prompts: int = Field(256, ge=8, description="held-out prompts for evaluation")

    def inert_fields(self) -> dict[str, str]:
        return {"modulus": f"only task modmul reads it (got task {self.name!r})"} if self.name != "modmul" else {}

    def build(self) -> tasks_lib.Task:
        return tasks_lib.make_task(self.name, n_digits=self.n_digits, modulus=self.modulus)


class ModelConfig(_Section):
    d_model: int = Field(64, ge=8)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    d_mlp: int = Field(256, ge=8)
    max_len: int = Field(32, ge=4, description="context length (prompt + response)")
    experts: int = Field(0, ge=0, description="mixture-of-experts MLP with this many experts (0: dense MLP)")
    expert_top_k: int = Field(2, ge=1, description="experts per token (top-k routing)")
    balance_coef: float = Field(0.01, ge=0.0, description="weight of the load-balancing loss (0: off)")

    def inert_fields(self) -> dict[str, str]:
        return {} if self.experts else {name: "model.experts is 0 (a dense MLP)"
                                        for name in ("expert_top_k", "balance_coef")}

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if self.experts and self.expert_top_k > self.experts:
            raise ValueError(f"model.expert_top_k ({self.expert_top_k}) must be at most model.experts "
                             f"({self.experts})")
        return self


class PretrainConfig(_Section):
    """Supervised warm start on (prompt, answer) pairs until partial competence."""

    target_accuracy: float = Field(0.3, gt=0.0, le=1.0, description="stop at this held-out accuracy (of `stop_on`)")
    stop_on: Literal["greedy", "sampled"] = Field("greedy", description=(
        "which held-out exact-match accuracy meets target_accuracy: greedy decoding, or sampling at T = 1 "
        "(the reward rate GRPO starts from; use it to start bases of different lengths at the same reward)"))
    max_steps: int = Field(4000, ge=1)
    eval_every: int = Field(25, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    seed: int = 0
    cache_dir: str = "runs/bases"


class SamplerConfig(_Section):
    temperature: Traced = Field(1.0, gt=0.0)
    max_response_len: int | None = Field(None, ge=1, description="default: answer length + 1 (the <eos>)")


class GRPOConfig(_Section):
    prompts_per_step: int = Field(32, ge=1)
    group_size: int = Field(8, ge=2)
    advantage: AdvantageName = Field("zscore", description="group-relative advantage (timsim.grpo.ADVANTAGES)")
    reward_correct: Traced = Field(1.0, description="the reward of an exact answer, as the advantage sees it")
    reward_wrong: Traced = Field(0.0, description=(
        "the reward of a wrong answer (partial credit maps linearly between the two); e.g. -1 for ±1 rewards"))
    loss_agg: AggregationName = Field("token_mean", description="per-token loss to scalar (timsim.grpo.AGGREGATIONS)")
    old_logprobs: Literal["recompute", "bypass"] = "recompute"
    loss: LossName = Field("ppo", description=(
        "ppo: PPO-clip (dual_clip > 1 adds the dual clip); reinforce: -A log pi, one update per batch; "
        "gspo: clipped length-normalised sequence ratio; cispo: clipped, detached IS weight on -A log pi"))
    dual_clip: Traced = Field(0.0, ge=0.0, description="ppo: lower bound c A on the objective of A < 0 tokens (0: off; "
                                                        "else > 1, usually 3)")
    epochs: int = Field(1, ge=1)
    minibatches: int = Field(1, ge=1)
    lr: Traced = Field(3e-4, ge=0.0, description="0: nothing moves, everything is logged (is my mismatch normal?)")
    weight_decay: Traced = Field(0.0, ge=0.0)
    max_grad_norm: Traced = Field(1.0, gt=0.0)
    clip_eps_low: Traced = Field(0.2, ge=0.0, lt=1.0)
    clip_eps_high: Traced = Field(0.2, ge=0.0)
    kl_ref: KLReferenceName = Field("none", description="estimator of the KL penalty to the base model (timsim.kl), or none")
    kl_coef: Traced = Field(0.0, ge=0.0)
    entropy_coef: Traced = 0.0

    def inert_fields(self) -> dict[str, str]:
        reads = LOSSES.entry(self.loss).knobs
        inert = {knob: f"grpo.loss {self.loss!r} reads only {', '.join(reads) or 'no clip knob'}"
                 for knob in LOSSES.union("knobs") if knob not in reads}
        if self.kl_ref == "none":
            inert["kl_coef"] = "grpo.kl_ref is 'none' (set it to k1, k2 or k3 for a KL penalty to the reference)"
        if self.advantage == "zscore":
            inert |= {name: "grpo.advantage 'zscore' is the same under any reward pair (choose none, mean or rloo)"
                      for name in ("reward_correct", "reward_wrong")}
        return inert

    @model_validator(mode="after")
    def _rewards_ordered(self):
        if not self.reward_correct > self.reward_wrong:
            raise ValueError(f"grpo.reward_correct ({self.reward_correct}) must be greater than grpo.reward_wrong "
                             f"({self.reward_wrong}): an exact answer earns more than a wrong one")
        return self


class RunConfig(_Section):
    name: str = "run"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    steps: int = Field(300, ge=1)
    chunk_steps: int = Field(50, ge=1, description="steps per compiled chunk; evaluation at chunk ends")
    probe_every: int = Field(0, ge=0, description="objective-effect probes every this many steps (a multiple of "
                             "chunk_steps; 0: off); also at step 0")
    oracle_every: int = Field(0, ge=0, description="exact-gradient oracle every this many steps (a multiple of "
                              "chunk_steps; 0: off; an enumerable task only, timsim.exact); also at step 0")
    oracle_draws: int = Field(4, ge=1, description="oracle: noise draws averaged when the sampler's noise is fresh")
    oracle_prompts: int = Field(128, ge=1, description="oracle: the most likely prompts enumerated, renormalised "
                                "(its cost is linear in them)")
    batching: Literal["auto", "vmap", "map"] = "auto"
    out_dir: str = "runs"

    def inert_fields(self) -> dict[str, str]:
        off = "run.oracle_every is 0 (the oracle is off)"
        return {} if self.oracle_every else {"oracle_draws": off, "oracle_prompts": off}

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        problem = name_problem(name)
        if problem:
            raise ValueError(problem)
        return name

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"seed(s) {repeated} listed twice: a repeated seed is an identical run that only "
                             "narrows every confidence interval")
        outside = [s for s in seeds if not 0 <= s < MAX_SEED]
        if outside:
            raise ValueError(f"seeds must lie in [0, {MAX_SEED}) (they travel as float32 on the run axis)")
        return seeds


class Config(_Section):
    task: TaskConfig = TaskConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sampler: SamplerConfig = SamplerConfig()
    perturbation: PerturbationConfig = PerturbationConfig()
    grpo: GRPOConfig = GRPOConfig()
    correction: CorrectionConfig = CorrectionConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, raw: Any) -> Any:
        """`correction.preset` fills in a framework's mode, loss and corrections (`timsim.presets`)."""
        return presets.expand(raw) if isinstance(raw, dict) else raw

    @model_validator(mode="after")
    def _consistent(self):
        task = self.task.build()
        response_len = self.response_len
        if response_len < task.answer_len + 1:
            raise ValueError(
                f"sampler.max_response_len ({response_len}) must be at least the answer length + 1 "
                f"({task.answer_len + 1}) for task {task.name!r}")
        if task.prompt_len + response_len > self.model.max_len:
            raise ValueError(
                f"model.max_len ({self.model.max_len}) is shorter than prompt + response "
                f"({task.prompt_len} + {response_len}) for task {task.name!r}; raise model.max_len")
        if 0.0 < self.grpo.dual_clip <= 1.0:
            raise ValueError(f"grpo.dual_clip must be 0 (off) or greater than 1, got {self.grpo.dual_clip}")
        if self.grpo.loss == "reinforce" and self.grpo.epochs * self.grpo.minibatches != 1:
            raise ValueError("grpo.loss=reinforce has no ratio and takes one update per batch: set grpo.epochs=1 "
                             "and grpo.minibatches=1")
        n = self.grpo.prompts_per_step * self.grpo.group_size
        if n % self.grpo.minibatches:
            raise ValueError(f"grpo.minibatches ({self.grpo.minibatches}) must divide "
                             f"prompts_per_step * group_size ({n})")
        if not self.model.experts and (self.correction.routing_replay != "none"
                                       or self.perturbation.router_noise.family != "none"):
            field = ("correction.routing_replay" if self.correction.routing_replay != "none"
                     else "perturbation.router_noise.family")
            raise ValueError(f"{field} needs a mixture-of-experts policy: set model.experts (e.g. 4)")
        bypass_weights = self.correction.bypass_weights
        if bypass_weights == "multiply" and not (self.grpo.old_logprobs == "bypass" and self.correction.weighting):
            raise ValueError(f"{FIELD_MARK}correction.bypass_weights{FIELD_MARK}{bypass_weights!r} has no effect: it "
                             "acts only with grpo.old_logprobs=bypass and a weighting correction in correction.kinds "
                             f"({', '.join(CORRECTIONS.names(weighting=True))}); got grpo.old_logprobs="
                             f"{self.grpo.old_logprobs!r} and correction.kinds={self.correction.kinds}")
        if bypass_weights == "current" and not (self.grpo.old_logprobs == "bypass" and self.correction.kinds):
            raise ValueError(f"{FIELD_MARK}correction.bypass_weights{FIELD_MARK}{bypass_weights!r} has no effect: it "
                             "acts only with grpo.old_logprobs=bypass and a correction in correction.kinds; got grpo.old_logprobs="
                             f"{self.grpo.old_logprobs!r} and correction.kinds={self.correction.kinds}")
        if self.run.oracle_every % self.run.chunk_steps:
            raise ValueError(f"run.oracle_every ({self.run.oracle_every}) must be 0 or a multiple of run.chunk_steps "
                             f"({self.run.chunk_steps}): the oracle runs at chunk boundaries")
        if self.run.probe_every % self.run.chunk_steps:
            raise ValueError(f"run.probe_every ({self.run.probe_every}) must be 0 or a multiple of run.chunk_steps "
                             f"({self.run.chunk_steps}): probes run at chunk boundaries")
        if self.run.steps % self.run.chunk_steps:
            raise ValueError(f"run.steps ({self.run.steps}) must be a multiple of run.chunk_steps "
                             f"({self.run.chunk_steps})")
        return self

    @property
    def ratio_denominator(self) -> str:
        """What the PPO ratio divides by: 'pi_old' (the learner's recomputed log-probs) or 'mu' (the
        sampler's). Bypass with a weighting correction and `correction.bypass_weights=replace` divides
        by pi_old: that arm is recompute plus the weight, whatever `grpo.old_logprobs` says."""
        if self.grpo.old_logprobs == "recompute":
            return "pi_old"
        return "pi_old" if self.correction.weighting and self.correction.bypass_weights == "replace" else "mu"

    @property
    def response_len(self) -> int:
        if self.sampler.max_response_len is not None:
            return self.sampler.max_response_len
        return self.task.build().answer_len + 1


# A model and task that train in seconds: the tests' shared base, and the notebooks at toy size
# (TIMSIM_NOTEBOOK_TOY=1). Overrides of any config; they say nothing about mismatch at scale.
SMOKE = [
    "task.name=sort", "task.n_digits=4", "task.eval_prompts=128",
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_mlp=64", "model.max_len=12",
    "pretrain.target_accuracy=0.25", "pretrain.eval_every=25", "pretrain.batch_size=64", "pretrain.lr=3e-3",
    "grpo.prompts_per_step=16", "grpo.group_size=8", "grpo.lr=1e-3",
    "run.steps=10", "run.chunk_steps=5", "run.seeds=[0,1]",
]


# ----------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if msg.startswith(FIELD_MARK):  # a section's error about one of its fields (config_types)
            field, msg = msg[1:].split(FIELD_MARK, 1)
            loc = f"{loc}.{field}" if e["loc"] else field
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `timsim --help` lists the sections)"
        got = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"`{loc}`: {msg}{shown}")
    return f"Invalid config {source}: " + "; ".join(parts) + "."


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `tree[a][b][c] = value` for `dotted = "a.b.c"`, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Invalid override `{dotted}`: `{p}` is a value, not a section.")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["grpo.lr=1e-3", "run.seeds=[0,1]"]` -> {dotted key: YAML-parsed value}."""
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"Invalid override {item!r}: write overrides as dotted.key=value, e.g. grpo.lr=1e-3.")
        try:
            parsed[key] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            problem = str(getattr(err, "problem", None) or err).strip()
            raise ConfigError(f"Invalid override {item!r}: the value {raw!r} is not valid YAML ({problem}); close "
                              f"brackets and quotes, e.g. run.seeds=[0,1] or run.name=my-run.") from None
    return parsed


def config_from_dict(raw: dict, source: str = "") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    except ValueError as err:  # a task's own validate()
        raise ConfigError(f"Invalid config {source}: {err}.") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply dotted overrides."""
    raw: dict = {}
    source = "(defaults)"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} does not exist.")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}.")
        source = repr(str(path))
        raw = {k: ({} if v is None else v) for k, v in raw.items()}  # an empty `grpo:` section means defaults
    for key, value in parse_overrides(overrides or []).items():
        set_dotted(raw, key, value)
    return config_from_dict(raw, source)


# ----------------------------------------------------------------------------- static / traced


def traced_keys(model: type[BaseModel] = Config, prefix: str = "", kind: str = TRACED) -> list[str]:
    """Dotted keys of every traced field, e.g. ``["sampler.temperature", "grpo.lr", ...]``
    (`kind=HOST`: of every host-resolved field instead)."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += traced_keys(ann, f"{prefix}{name}.", kind)
        elif kind in field.metadata:
            keys.append(f"{prefix}{name}")
    return keys


def _not_static() -> list[str]:
    return traced_keys() + traced_keys(kind=HOST)


def get_dotted(cfg: BaseModel, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def traced_values(cfg: Config) -> dict[str, float]:
    """The traced hyperparameters of one config, by dotted key."""
    return {k: float(get_dotted(cfg, k)) for k in traced_keys()}


def _construct(model: type[BaseModel], data: dict) -> BaseModel:
    """Build `model` from a dump without validation (so traced fields may hold None)."""
    fields = {}
    for name, value in data.items():
        ann = model.model_fields[name].annotation
        nested = isinstance(ann, type) and issubclass(ann, BaseModel)
        fields[name] = _construct(ann, value) if nested else value
    return model.model_construct(**fields)


def static_view(cfg: Config) -> Config:
    """`cfg` with every traced and host field set to None: what may select a compiled program."""
    dump = cfg.model_dump()
    for key in _not_static():
        set_dotted(dump, key, None)
    dump["run"]["seeds"] = []
    return _construct(Config, dump)


def static_hash(cfg: Config) -> str:
    """Hash of everything that selects the compiled program (not run names or paths)."""
    dump = cfg.model_dump()
    for key in _not_static():
        set_dotted(dump, key, None)
    dump["run"]["seeds"] = []
    dump["run"].pop("name"), dump["run"].pop("out_dir")
    dump["pretrain"].pop("cache_dir")
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:12]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
