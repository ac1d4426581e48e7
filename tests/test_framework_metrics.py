"""Framework dashboard names (timsim.metrics.FRAMEWORKS) against the frameworks' own formulas,
written out here in numpy from verl's `compute_offpolicy_metrics` and TRL GRPOTrainer's
`sampling/*` logging, on one hand-made batch with padding and unequal response lengths."""

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from timsim.cli import main
from timsim.config import ConfigError
from timsim.diagnostics import advantage_skew_metrics, mismatch_metrics
from timsim.metrics import FRAMEWORKS, METRICS, framework_view


def _batch():
    rng = np.random.default_rng(0)
    n, t, v = 6, 5, 7
    logp_learner = np.log(rng.dirichlet(np.ones(v), size=(n, t)))
    logp_sampler = np.log(rng.dirichlet(np.ones(v), size=(n, t)))
    tokens = rng.integers(0, v, size=(n, t))
    lengths = np.array([5, 3, 1, 4, 5, 2])
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    return logp_learner.astype(np.float32), logp_sampler.astype(np.float32), tokens, mask


def _verl(old, rollout, mask):
    """verl's off-policy metrics (old = trainer log-probs, rollout = engine log-probs)."""
    tok_mean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
    seq_mean = lambda x: (x * mask).sum(-1) / mask.sum(-1)  # noqa: E731
    log_ratio = old - rollout
    log_ppl_diff = seq_mean(rollout) - seq_mean(old)
    return {
        "rollout_corr/kl": tok_mean(rollout - old),
        "rollout_corr/k3_kl": tok_mean(np.exp(log_ratio) - log_ratio - 1),
        "rollout_corr/training_ppl": np.exp(-seq_mean(old)).mean(),
        "rollout_corr/training_log_ppl": (-seq_mean(old)).mean(),
        "rollout_corr/rollout_ppl": np.exp(-seq_mean(rollout)).mean(),
        "rollout_corr/rollout_log_ppl": (-seq_mean(rollout)).mean(),
        "rollout_corr/log_ppl_diff": log_ppl_diff.mean(),
        "rollout_corr/log_ppl_abs_diff": np.abs(log_ppl_diff).mean(),
        "rollout_corr/ppl_ratio": np.exp(log_ppl_diff).mean(),
        "rollout_corr/chi2_token": tok_mean(np.exp(np.clip(log_ratio, -20, 20)) ** 2) - 1,
        "rollout_corr/chi2_seq": np.exp(2 * np.clip((log_ratio * mask).sum(-1), -20, 20)).mean() - 1,
    }


def _trl(old, sampler, mask):
    """TRL's sampling metrics before its truncation (no cap reached)."""
    on = mask > 0
    delta, ratio = np.abs(old - sampler)[on], np.exp(old - sampler)[on]
    return {"sampling/sampling_logp_difference/mean": delta.mean(), "sampling/sampling_logp_difference/max": delta.max(),
            "sampling/importance_sampling_ratio/min": ratio.min(), "sampling/importance_sampling_ratio/mean": ratio.mean(),
            "sampling/importance_sampling_ratio/max": ratio.max()}


@pytest.mark.parametrize("framework, reference", [("verl", _verl), ("trl", _trl)])
def test_every_alias_is_the_frameworks_own_formula(framework, reference):
    learner, sampler, tokens, mask = _batch()
    take = lambda a: np.take_along_axis(a, tokens[..., None], -1)[..., 0]  # noqa: E731
    metrics = mismatch_metrics(jnp.asarray(learner), jnp.asarray(sampler), jnp.asarray(tokens), jnp.asarray(mask))
    delta = jnp.asarray((take(learner) - take(sampler)) * mask)
    metrics |= advantage_skew_metrics(delta, jnp.ones(len(mask)), jnp.asarray(mask), 0.2, 0.2)
    row = pd.DataFrame([{"cell_id": "c", "run_idx": 0, "seed": 0, "step": 1,
                         **{k: float(v) for k, v in metrics.items()}}])
    view = framework_view(row, framework)
    expected = reference(take(learner).astype(np.float64), take(sampler).astype(np.float64), mask)
    assert set(expected) == set(FRAMEWORKS[framework])
    for name, value in expected.items():
        np.testing.assert_allclose(view[name].iloc[0], value, rtol=2e-5, err_msg=name)
    assert list(view.columns[:4]) == ["cell_id", "run_idx", "seed", "step"]


def test_aliases_name_registered_metrics_and_unknown_frameworks_are_refused(capsys):
    assert all(alias.source in METRICS for aliases in FRAMEWORKS.values() for alias in aliases.values())
    with pytest.raises(ConfigError, match="accepted: trl, verl"):
        framework_view(pd.DataFrame({"step": [0]}), "openrlhf")
    assert main(["metrics", "--as", "verl"]) == 0
    out = capsys.readouterr().out
    assert "rollout_corr/log_ppl_diff" in out and "-`log_ppl_diff`" in out
    assert main(["metrics", "--as", "openrlhf"]) == 2 and "accepted: trl, verl" in capsys.readouterr().out
