"""Config sections of the sampler-learner mismatch and its remedies: `perturbation` (logit
noise, numerics, weight noise, staleness, calibration targets) and `correction`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from timsim import tasks as tasks_lib
from timsim.config_types import HOST, HostValue, Traced, _Section, registered
from timsim.corrections import CORRECTIONS
from timsim.kl import KL_ESTIMATORS
from timsim.noise import LOGIT_NOISE
from timsim.numerics import Numerics
from timsim.sources import ROUTER_NOISE, WEIGHT_NOISE, active_sources

KLEstimatorName = registered(KL_ESTIMATORS)


class LogitNoiseConfig(_Section):
    """Noise on the sampler's logits (log-odds); see `timsim.noise.LOGIT_NOISE`."""

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
    profile: str | None = Field(None, description=(
        "profile family: a fitted engine profile (JSON written by `timsim profile PAIRS --out FILE`)"))

    def inert_fields(self) -> dict[str, str]:
        if self.family == "none":
            return {name: "perturbation.logit_noise.family is 'none' (no logit noise)"
                    for name in type(self).model_fields if name != "family"}
        family = LOGIT_NOISE.entry(self.family)
        inert = {knob: f"family {self.family!r} reads only {', '.join(family.knobs)}"
                 for knob in LOGIT_NOISE.union("knobs") if knob not in family.knobs}
        if family.deterministic:
            inert |= {name: f"family {self.family!r} is a deterministic transform and draws no noise"
                      for name in ("mode", "version_steps", "state_bin")}
        else:
            inert["learner_too"] = (f"learner_too applies a deterministic transform on the learner's side too "
                                    f"({', '.join(LOGIT_NOISE.names(deterministic=True))}), and family "
                                    f"{self.family!r} is not one")
        if not family.needs_profile:
            inert["profile"] = (f"only family {', '.join(LOGIT_NOISE.names(needs_profile=True))} reads an engine "
                                f"profile (got family {self.family!r})")
        if self.mode == "fresh":
            inert |= {"version_steps": "mode 'fresh' draws new noise every step (version_steps re-keys the "
                                       "persistent modes context and state)"}
        if self.mode != "state":
            inert |= {"state_bin": f"mode {self.mode!r} is not keyed by the rounded state (only mode 'state' is)"}
        return inert

    @model_validator(mode="after")
    def _profile_file_with_profile_family(self):
        if self.family in LOGIT_NOISE.names(needs_profile=True) and self.profile is None:
            raise ValueError("the profile family needs perturbation.logit_noise.profile (a file written by "
                             "`timsim profile PAIRS --out FILE`)")
        return self

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str) -> str:
        if family != "none" and family not in LOGIT_NOISE:
            raise ValueError(f"unknown logit-noise family {family!r}; accepted: none, {', '.join(LOGIT_NOISE)}")
        return family


Site = Literal["weights", "matmul_in", "matmul_out", "activations", "logits", "router"]


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

    def inert_fields(self) -> dict[str, str]:
        return {"sites": "dtype fp32 rounds nothing"} if self.dtype == "fp32" else {}

    def numerics(self) -> Numerics:
        sites = tuple(self.sites) if self.dtype != "fp32" else Numerics.sites
        return Numerics(self.dtype, sites, self.split_k, self.partials, self.softmax_chunks, self.batch_variant)


def _unread_knobs(registry, family: str, section: str, always: tuple[str, ...] = ()) -> dict[str, str]:
    """The knobs of `section` that `family` does not read ({knob: why}), for `inert_fields`."""
    if family == "none":
        return {knob: f"{section}.family is 'none'" for knob in (*registry.union("knobs"), *always)}
    reads = registry.entry(family).knobs
    return {knob: f"{section}.family {family!r} reads only {', '.join(reads)}"
            for knob in registry.union("knobs") if knob not in reads}


class WeightNoiseConfig(_Section):
    """Noise on every sampler weight (`timsim.sources.WEIGHT_NOISE`), re-drawn every `hold_steps` updates."""

    family: registered(WEIGHT_NOISE, ("none",)) = Field("none", description=(
        "none or a weight-noise family (timsim.sources.WEIGHT_NOISE)"))
    scale: Traced = Field(0.0, ge=0.0, description="standard deviation added to each weight")
    hold_steps: int = Field(1, ge=1, description="keep one draw for this many updates (1: re-drawn every step)")

    def inert_fields(self) -> dict[str, str]:
        return _unread_knobs(WEIGHT_NOISE, self.family, "perturbation.weight_noise", always=("hold_steps",))


class RouterNoiseConfig(_Section):
    """Noise on the sampler's mixture-of-experts router logits (`timsim.sources.ROUTER_NOISE`;
    needs model.experts): flips expert choices while the rest of the network stays identical."""

    family: registered(ROUTER_NOISE, ("none",)) = Field("none", description=(
        "none or a router-noise family (timsim.sources.ROUTER_NOISE)"))
    scale: Traced = Field(0.0, ge=0.0, description="standard deviation added to each router logit")

    def inert_fields(self) -> dict[str, str]:
        return _unread_knobs(ROUTER_NOISE, self.family, "perturbation.router_noise")


TARGET_METRICS = {  # target field -> the measured metric it sets (timsim.diagnostics)
    "token_kl": "kl_sampler_learner",
    "token_k3": "mismatch_k3",
    "delta_abs_mean": "delta_abs_mean",
    "delta_abs_q99": "delta_abs_q99",
    "seq_kl": "seq_kl",
    "seq_delta_var": "seq_delta_var",
}


class TargetConfig(_Section):
    """A mismatch size that sets the source's scale by calibration (`timsim.calibration`: the
    logit noise's, or the router noise's when it is the only scaled source); set
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

    def inert_fields(self) -> dict[str, str]:
        return {"track": "no target metric is set (track says when a target is re-calibrated)"} \
            if self.metric is None else {}

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
    router_noise: RouterNoiseConfig = RouterNoiseConfig()
    lag_steps: int = Field(0, ge=0, description=(
        "staleness, not mismatch: the sampler runs the weights of this many updates ago (async RL)"))
    frozen_sampler: bool = Field(False, description=(
        "staleness, not mismatch: the sampler keeps the base model's weights for the whole run, so mu never "
        "follows the learner (recompute's pi_old is the learner at the base weights too)"))
    target: TargetConfig = TargetConfig()

    @property
    def active_sources(self) -> tuple[str, ...]:
        """The sampler sources this section turns on (`timsim.sources.SOURCES`)."""
        return active_sources(self)

    @property
    def scale_key(self) -> str:
        """The traced scale that calibration, tracking and the finder turn: the logit noise's,
        or the router noise's when that is the only scaled source."""
        if self.logit_noise.family == "none" and self.router_noise.family != "none":
            return "perturbation.router_noise.scale"
        return "perturbation.logit_noise.scale"

    @property
    def scaled_source(self) -> str | None:
        """A description of the source `scale_key` turns, or None if it has no scale."""
        if self.scale_key == "perturbation.router_noise.scale":
            return "router noise"
        return (f"{self.logit_noise.family} logit noise" if self.logit_noise.family in LOGIT_NOISE.names(scaled=True)
                else None)

    @property
    def stale(self) -> bool:
        """The sampler runs other weights than the learner's current ones (lag or frozen)."""
        return self.lag_steps > 0 or self.frozen_sampler

    @model_validator(mode="after")
    def _one_staleness(self):
        if self.frozen_sampler and self.lag_steps:
            raise ValueError(f"perturbation.frozen_sampler and perturbation.lag_steps ({self.lag_steps}) are two "
                             "kinds of staleness; choose one (a frozen sampler never updates, a lagged one trails)")
        return self

    @model_validator(mode="after")
    def _target_needs_family(self):
        if self.target.metric is not None and self.scaled_source is None:
            raise ValueError(f"perturbation.target.{self.target.metric} needs a perturbation.logit_noise.family "
                             f"with a scale ({', '.join(LOGIT_NOISE.names(scaled=True))}) or perturbation.router_noise.family: gaussian, "
                             f"got logit-noise family {self.logit_noise.family!r}")
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
    kl_estimator: KLEstimatorName = Field("k3", description="kl_rejection: the per-token estimator (timsim.kl)")
    kl_aggregate: Literal["sum", "mean", "max"] = "mean"
    kl_threshold: Traced = Field(0.01, gt=0.0, description="kl_rejection: reject a response above this")
    veto_threshold: Traced = Field(1e-4, gt=0.0, le=1.0, description="veto: reject a response with r_corr below this")
    offpolicy_threshold: Traced = Field(0.5, ge=0.0, description="offpolicy_mask: mean log(mu / pi) above this")
    cis_lambda: Traced = Field(2.3, gt=0.0, description="cis: cap 1 + lambda * max(1 - p, kappa)")
    cis_kappa: Traced = Field(5e-3, gt=0.0, le=1.0)
    prefix_cap: Traced = Field(1e4, ge=1.0, description="prefix_is / minpro: cap C on the weight (large: untruncated)")
    routing_replay: Literal["none", "r2", "r3"] = Field("none", description=(
        "mixture of experts: r2 replays the experts the learner chose for pi_old in every update; r3 replays the "
        "experts the sampler chose, in the learner's old log-probs and every update"))
    score_centering: bool = Field(False, description="subtract the sampler's expected score from every token's")
    batch_normalize: bool = Field(False, description="divide the kept weights by their batch mean")
    batch_normalize_over: Literal["tokens", "responses"] = Field("tokens", description=(
        "batch_normalize: the mean over kept tokens, or over responses with one weight each (the mean of its kept "
        "tokens; verl's normalisation of sequence-level weights)"))
    rejected: Literal["drop", "zero"] = Field("drop", description=(
        "tokens a correction rejects: drop leaves them out of the loss and its denominator; zero keeps them in the "
        "denominator with weight 0 (TRL's masks, verl's IcePop), so rejection also shrinks the kept tokens' share"))
    preset: str | None = Field(None, description=(
        "a framework's correction default (timsim.presets, e.g. verl/decoupled_token_is, trl/sequence_mask): sets "
        "the mode, loss and corrections with that framework's meaning; thresholds may be overridden"))
    bypass_weights: Literal["replace", "multiply", "current"] = Field("replace", description=(
        "grpo.old_logprobs=bypass with a weighting correction: replace puts the learner's pi_old in the PPO ratio, "
        "so the weight replaces r_corr (verl's decoupled mode: recompute plus the weight); multiply keeps "
        "pi_theta / mu and multiplies the weight onto it, counting the mismatch twice; current (verl's bypass, any "
        "correction) keeps pi_theta / mu and recomputes weights and masks from the current policy pi_theta "
        "(detached) at every minibatch"))

    def inert_fields(self) -> dict[str, str]:
        used = {knob for kind in self.kinds for knob in CORRECTIONS.entry(kind).knobs}
        listed = f"correction.kinds is {self.kinds}" if self.kinds else "correction.kinds is empty"
        inert = {}
        for knob in (k for k in CORRECTIONS.union("knobs") if k not in used):
            readers = [e.name for e in CORRECTIONS.entries() if knob in e.knobs]
            inert[knob] = f"{listed}; only {' and '.join(readers)} {'reads' if len(readers) == 1 else 'read'} it"
        if not self.kinds:
            inert["batch_normalize"] = "correction.kinds is empty (there are no weights to normalise)"
        if not self.batch_normalize:
            inert["batch_normalize_over"] = "correction.batch_normalize is off"
        if not any(CORRECTIONS.entry(kind).rejects for kind in self.kinds):
            rejecting = ", ".join(CORRECTIONS.names(rejects=True))
            inert["rejected"] = (f"{listed}{', and none of them rejects' if self.kinds else ''}: only these corrections "
                                 f"reject tokens: {rejecting}")
        return inert

    @property
    def weighting(self) -> bool:
        """Whether a listed correction produces weights (not only masks)."""
        return any(CORRECTIONS.entry(kind).weighting for kind in self.kinds)

    @property
    def active(self) -> bool:
        """Whether any weight, mask or score correction is configured."""
        return bool(self.kinds) or self.score_centering

    def without_corrections(self) -> "CorrectionConfig":
        """This section with every weight, mask and score correction off (thresholds kept)."""
        return self.model_copy(update={"kinds": [], "score_centering": False, "batch_normalize": False,
                                       "batch_normalize_over": "tokens", "rejected": "drop", "preset": None})

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = [k for k in kinds if k not in CORRECTIONS]
        if unknown:
            raise ValueError(f"unknown correction(s) {unknown}; accepted: {', '.join(CORRECTIONS)}")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"a correction is listed twice: {kinds}")
        return kinds
