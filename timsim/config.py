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
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from timsim import tasks as tasks_lib
from timsim.numerics import Numerics


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


class TaskConfig(_Section):
    name: str = "add"
    n_digits: int = Field(3, ge=1, le=256)
    modulus: int = Field(97, ge=2, description="modmul only")
    partial_credit: bool = False
    eval_prompts: int = Field(256, ge=8, description="held-out prompts for evaluation")

    @field_validator("name")
    @classmethod
    def _known_task(cls, name: str) -> str:
        if name not in tasks_lib.TASKS:
            raise ValueError(f"unknown task {name!r}; accepted: {', '.join(tasks_lib.TASKS)}")
        return name

    def build(self) -> tasks_lib.Task:
        return tasks_lib.make_task(self.name, n_digits=self.n_digits, modulus=self.modulus)


class ModelConfig(_Section):
    d_model: int = Field(64, ge=8)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    d_mlp: int = Field(256, ge=8)
    max_len: int = Field(32, ge=4, description="context length (prompt + response)")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        return self


class PretrainConfig(_Section):
    """Supervised warm start on (prompt, answer) pairs until partial competence."""

    target_accuracy: float = Field(0.3, gt=0.0, le=1.0, description="stop at this greedy held-out accuracy")
    max_steps: int = Field(4000, ge=1)
    eval_every: int = Field(25, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    seed: int = 0
    cache_dir: str = "runs/bases"


class LogitNoiseConfig(_Section):
    """Noise on the sampler's logits (log-odds); see `timsim.perturb.LOGIT_NOISE`."""

    family: str = "none"
    mode: Literal["fresh", "context", "state"] = Field("fresh", description=(
        "fresh: new draws every step and sample; context: a deterministic function of the context "
        "(prompt + response so far), the same at every step, as a real engine's error is; state: a "
        "deterministic function of the sampler's predictive distribution (probabilities rounded to "
        "state_bin), so contexts the model treats alike share one error"))
    version_steps: int = Field(0, ge=0, description=(
        "context/state modes: the persistent error changes every this many updates, as if keyed by the "
        "weights' version (0: never)"))
    state_bin: Traced = Field(0.1, gt=0.0, le=1.0, description="state mode: probability rounding step")
    report_only: bool = Field(False, description=(
        "sample from the clean policy and perturb only the reported log-probs (a logging or "
        "scoring bug: the tokens are pi's, the reported log mu is not)"))
    scale: Traced = Field(0.0, ge=0.0, description="sigma (gaussian, magnitude), t scale, or spike size")
    nu: Traced = Field(3.0, gt=2.0, description="student_t degrees of freedom (> 2: finite variance)")
    rate: Traced = Field(0.01, ge=0.0, le=1.0, description="spikes: probability per vocabulary entry")
    top_k: Traced = Field(float(tasks_lib.VOCAB_SIZE), ge=1.0, le=float(tasks_lib.VOCAB_SIZE),
                          description="top_k: tokens kept (1 .. vocabulary size)")
    top_p: Traced = Field(1.0, gt=0.0, le=1.0, description="top_p: probability mass kept, in (0, 1]")
    temperature: Traced = Field(1.0, gt=0.0, description=(
        "temperature family: the sampler alone divides its logits by this (a one-sided transform)"))
    learner_too: bool = Field(False, description=(
        "the consistent fix for a one-sided transform (temperature, top_k, top_p): the learner applies "
        "the same transform, so the two sides agree again"))

    @model_validator(mode="after")
    def _learner_too_is_deterministic(self):
        from timsim.perturb import DETERMINISTIC

        if self.learner_too and self.family not in DETERMINISTIC:
            raise ValueError(f"learner_too applies a deterministic transform on the learner's side; accepted "
                             f"families: {', '.join(DETERMINISTIC)} (got {self.family!r})")
        return self

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str) -> str:
        from timsim.perturb import LOGIT_NOISE

        if family != "none" and family not in LOGIT_NOISE:
            raise ValueError(f"unknown logit-noise family {family!r}; accepted: none, {', '.join(LOGIT_NOISE)}")
        return family


Site = Literal["weights", "matmul_in", "matmul_out", "activations", "logits"]


class PrecisionConfig(_Section):
    """Rounding of one side's forward (see `timsim.numerics`): fp32 is exact."""

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    sites: list[Site] = Field(default_factory=lambda: list(Site.__args__), min_length=1)
    split_k: int = Field(1, ge=1, le=64, description=(
        "dense-layer contractions cut into this many chunks, partials added in reverse order"))
    softmax_chunks: int = Field(1, ge=1, le=64, description="attention normaliser summed in this many key blocks")
    partials: Literal["fp32", "bf16", "fp16"] = Field("fp32", description=(
        "rounding of each split-K partial and softmax block sum (GPU split-K writes them in bf16)"))
    batch_variant: bool = Field(False, description=(
        "the split count shrinks as the matmul's row count grows past 1024 (batch-size-dependent numerics)"))

    @model_validator(mode="after")
    def _reordering_consistent(self):
        if self.batch_variant and self.split_k == 1:
            raise ValueError("batch_variant=true needs split_k > 1 (it varies the split count with the batch size)")
        if self.partials != "fp32" and self.split_k == 1 and self.softmax_chunks == 1:
            raise ValueError(f"partials={self.partials} rounds split-K partials and softmax block sums: "
                             "set split_k > 1 or softmax_chunks > 1")
        return self

    def numerics(self) -> Numerics:
        sites = tuple(self.sites) if self.dtype != "fp32" else Numerics.sites
        return Numerics(self.dtype, sites, self.split_k, self.partials, self.softmax_chunks, self.batch_variant)


class WeightNoiseConfig(_Section):
    """Gaussian noise added to every sampler weight, re-drawn every `hold_steps` updates."""

    family: Literal["none", "gaussian"] = "none"
    scale: Traced = Field(0.0, ge=0.0, description="standard deviation added to each weight")
    hold_steps: int = Field(1, ge=1, description="keep one draw for this many updates (1: re-drawn every step)")


TARGET_METRICS = {  # target field -> the measured metric it sets (timsim.diagnostics)
    "token_kl": "kl_sampler_learner",
    "token_k3": "mismatch_k3",
    "delta_abs_mean": "delta_abs_mean",
    "delta_abs_q99": "delta_abs_q99",
    "seq_kl": "seq_kl",
    "seq_delta_var": "seq_delta_var",
}


class TargetConfig(_Section):
    """A mismatch size that sets `logit_noise.scale` by calibration (`timsim.calibrate`); set
    exactly one of the metrics, or none (the raw scale is used)."""

    token_kl: HostValue = Field(None, gt=0.0, description="mean per-token exact KL(mu || pi) over response tokens")
    token_k3: HostValue = Field(None, gt=0.0, description="mean per-token k3 estimate of KL(mu || pi)")
    delta_abs_mean: HostValue = Field(None, gt=0.0, description="mean |delta| over response tokens")
    delta_abs_q99: HostValue = Field(None, gt=0.0, description="99th percentile of |delta| over response tokens")
    seq_kl: HostValue = Field(None, gt=0.0, description="mean per-response KL: sum over the response of token KLs")
    seq_delta_var: HostValue = Field(None, gt=0.0, description="variance of the sequence log-ratio sum_t delta_t")
    equivalent_length: int | None = Field(None, ge=1, description=(
        "with token_kl: match the per-response KL that a real response of this many tokens carries at "
        "token_kl (calibrates seq_kl = token_kl * equivalent_length on this task's responses)"))
    track: Annotated[Literal["once", "every_chunk"], HOST] = Field("once", description=(
        "once: calibrate at the base model; every_chunk: re-calibrate each run at every chunk boundary "
        "(the KL of a fixed scale shrinks as the policy sharpens)"))

    @model_validator(mode="after")
    def _one_metric(self):
        set_ = [k for k in TARGET_METRICS if getattr(self, k) is not None]
        if len(set_) > 1:
            raise ValueError(f"set one target metric, got {', '.join(set_)}; accepted: {', '.join(TARGET_METRICS)}")
        if self.equivalent_length is not None and set_ != ["token_kl"]:
            raise ValueError("equivalent_length scales a per-token target: use it with token_kl")
        return self

    @property
    def metric(self) -> str | None:
        """The target field that is set, or None."""
        return next((k for k in TARGET_METRICS if getattr(self, k) is not None), None)

    def resolved(self) -> tuple[str, float] | None:
        """(measured metric name, value to reach), or None without a target."""
        if self.metric is None:
            return None
        value = getattr(self, self.metric)
        if self.equivalent_length is not None:
            return "seq_kl", value * self.equivalent_length
        return TARGET_METRICS[self.metric], value


class PerturbationConfig(_Section):
    logit_noise: LogitNoiseConfig = LogitNoiseConfig()
    sampler_precision: PrecisionConfig = PrecisionConfig()
    learner_precision: PrecisionConfig = PrecisionConfig()
    weight_noise: WeightNoiseConfig = WeightNoiseConfig()
    lag_steps: int = Field(0, ge=0, description=(
        "staleness, not mismatch: the sampler runs the weights of this many updates ago (async RL)"))
    target: TargetConfig = TargetConfig()

    @model_validator(mode="after")
    def _target_needs_family(self):
        from timsim.perturb import SCALED

        if self.target.metric is not None and self.logit_noise.family not in SCALED:
            raise ValueError(f"perturbation.target.{self.target.metric} needs a perturbation.logit_noise.family "
                             f"with a scale ({', '.join(SCALED)}), got {self.logit_noise.family!r}")
        return self


class CorrectionConfig(_Section):
    """Remedies applied by the learner (`timsim.corrections`); thresholds are traced, so a
    sweep batches them. With zero mismatch every correction is the identity."""

    kinds: list[str] = Field(default_factory=list, description="corrections to compose, in order")
    tis_cap: Traced = Field(2.0, ge=1.0, description="token_tis / seq_tis: cap C on the IS weight")
    mis_low: Traced = Field(0.5, gt=0.0, le=1.0, description="token_mis: keep r_corr >= this")
    mis_high: Traced = Field(5.0, ge=1.0, description="token_mis: keep r_corr <= this")
    seq_low: Traced = Field(0.5, gt=0.0, le=1.0, description="seq_mask / seq_mis: keep prod r_corr >= this")
    seq_high: Traced = Field(2.0, ge=1.0, description="seq_mask / seq_mis: keep prod r_corr <= this")
    geo_low: Traced = Field(0.999, gt=0.0, le=1.0, description="geometric: keep exp(mean delta) >= this")
    geo_high: Traced = Field(1.001, ge=1.0, description="geometric: keep exp(mean delta) <= this")
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_aggregate: Literal["sum", "mean", "max"] = "mean"
    kl_threshold: Traced = Field(0.01, gt=0.0, description="kl_rejection: reject a response above this")
    veto_threshold: Traced = Field(1e-4, gt=0.0, le=1.0, description="veto: reject a response with r_corr below this")
    offpolicy_threshold: Traced = Field(0.5, ge=0.0, description="offpolicy_mask: mean log(mu / pi) above this")
    cis_lambda: Traced = Field(2.3, gt=0.0, description="cis: cap 1 + lambda * max(1 - p, kappa)")
    cis_kappa: Traced = Field(5e-3, gt=0.0, le=1.0)
    batch_normalize: bool = Field(False, description="divide the kept weights by their batch mean")

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        from timsim.corrections import CORRECTIONS

        unknown = [k for k in kinds if k not in CORRECTIONS]
        if unknown:
            raise ValueError(f"unknown correction(s) {unknown}; accepted: {', '.join(CORRECTIONS)}")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"a correction is listed twice: {kinds}")
        return kinds


class SamplerConfig(_Section):
    temperature: Traced = Field(1.0, gt=0.0)
    max_response_len: int | None = Field(None, ge=1, description="default: answer length + 1 (the <eos>)")


class GRPOConfig(_Section):
    prompts_per_step: int = Field(32, ge=1)
    group_size: int = Field(8, ge=2)
    advantage: Literal["zscore", "mean", "rloo"] = "zscore"
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    old_logprobs: Literal["recompute", "bypass"] = "recompute"
    loss: Literal["ppo", "reinforce", "gspo", "cispo"] = Field("ppo", description=(
        "ppo: PPO-clip (dual_clip > 1 adds the dual clip); reinforce: -A log pi, one update per batch; "
        "gspo: clipped length-normalised sequence ratio; cispo: clipped, detached IS weight on -A log pi"))
    dual_clip: Traced = Field(0.0, ge=0.0, description="ppo: lower bound c A on the objective of A < 0 tokens (0: off; "
                                                        "else > 1, usually 3)")
    epochs: int = Field(1, ge=1)
    minibatches: int = Field(1, ge=1)
    lr: Traced = Field(3e-4, gt=0.0)
    weight_decay: Traced = Field(0.0, ge=0.0)
    max_grad_norm: Traced = Field(1.0, gt=0.0)
    clip_eps_low: Traced = Field(0.2, ge=0.0, lt=1.0)
    clip_eps_high: Traced = Field(0.2, ge=0.0)
    kl_ref: Literal["none", "k1", "k2", "k3"] = "none"
    kl_coef: Traced = Field(0.0, ge=0.0)
    entropy_coef: Traced = 0.0


class RunConfig(_Section):
    name: str = "run"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    steps: int = Field(300, ge=1)
    chunk_steps: int = Field(50, ge=1, description="steps per compiled chunk; evaluation at chunk ends")
    batching: Literal["auto", "vmap", "map"] = "auto"
    out_dir: str = "runs"


class Config(_Section):
    task: TaskConfig = TaskConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sampler: SamplerConfig = SamplerConfig()
    perturbation: PerturbationConfig = PerturbationConfig()
    grpo: GRPOConfig = GRPOConfig()
    correction: CorrectionConfig = CorrectionConfig()
    run: RunConfig = RunConfig()

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
        if self.run.steps % self.run.chunk_steps:
            raise ValueError(f"run.steps ({self.run.steps}) must be a multiple of run.chunk_steps "
                             f"({self.run.chunk_steps})")
        return self

    @property
    def response_len(self) -> int:
        if self.sampler.max_response_len is not None:
            return self.sampler.max_response_len
        return self.task.build().answer_len + 1


# ----------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
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
        if not sep or not key:
            raise ConfigError(f"Invalid override {item!r}: write overrides as dotted.key=value, e.g. grpo.lr=1e-3.")
        parsed[key.strip()] = yaml.safe_load(raw)
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
