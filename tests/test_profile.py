"""Engine profiles: validation, fitting a known conditional distribution, the profile family."""

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from timsim.config import ConfigError, load_config
from timsim.profile import EXAMPLE_SCALES, LEVELS, PROB_EDGES, example_pairs, fit, read_pairs


def test_fit_recovers_the_quantiles_of_a_known_conditional_distribution():
    """delta | p-bin ~ Laplace(0, b_bin): quantile q is b ln(2q) below the median, -b ln(2(1-q)) above."""
    profile = fit(example_pairs(n_tokens=200_000, seed=1))
    for b, row in enumerate(profile["by_prob"][:3]):  # the top bins are truncated at delta >= log p
        scale = EXAMPLE_SCALES[b]
        for q, got in zip(LEVELS, row["quantiles"]):
            if not 0.01 <= q <= 0.99:
                continue  # the extreme levels need more tokens than a test should draw
            expected = scale * np.log(2 * q) if q < 0.5 else -scale * np.log(2 * (1 - q))
            assert abs(got - expected) < 0.1 * scale * max(1.0, abs(np.log(2 * min(q, 1 - q)))), (b, q, got, expected)


@pytest.mark.parametrize("frame, words", [
    (pd.DataFrame({"logp_sampler": [-1.0]}), "lacks column(s) ['logp_trainer']"),
    (pd.DataFrame({"logp_sampler": [-1.0, np.nan], "logp_trainer": [-1.0, -1.0]}), "`logp_sampler` has 1 non-finite"),
    (pd.DataFrame({"logp_sampler": [-1.0, 0.5], "logp_trainer": [-1.0, -1.0]}), "log-prob(s) > 0"),
    (pd.DataFrame({"logp_sampler": [-1.0], "logp_trainer": [-1.0], "position": [-3]}), "`position` must hold"),
])
def test_bad_profile_files_name_the_column(tmp_path, frame, words):
    path = tmp_path / "pairs.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(ConfigError) as err:
        read_pairs(path)
    assert words in str(err.value)


def test_too_few_tokens_per_bin_is_refused():
    with pytest.raises(ConfigError, match="Too few tokens per probability bin"):
        fit(example_pairs(n_tokens=100))


def test_profile_family_reproduces_the_fitted_quantiles_at_the_sampled_tokens(tmp_path):
    """The family's delta (log pi - log mu at a token) follows the fitted distribution of the
    token's probability bin, up to the position's normalisation shift."""
    import jax

    from timsim.noise import make_logits_fn

    profile = fit(example_pairs(n_tokens=50_000))
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    noise = make_logits_fn("profile", str(path))
    logits = jax.random.normal(jax.random.key(0), (4000, 16)) * 3.0
    noisy = jax.vmap(lambda k, x: noise(k, x, SimpleNamespace(scale=1.0)))(jax.random.split(jax.random.key(1), 4000), logits)
    logp, logp_mu = jax.nn.log_softmax(logits), jax.nn.log_softmax(noisy)
    delta, prob = np.asarray(logp - logp_mu).ravel(), np.exp(np.asarray(logp)).ravel()
    index = np.clip(np.searchsorted(PROB_EDGES, prob, side="right") - 1, 0, len(PROB_EDGES) - 2)
    for b in range(3):  # the bins every position has plenty of (16 entries of a random softmax)
        target = np.asarray(profile["by_prob"][b]["quantiles"])
        got = np.quantile(delta[index == b], [0.05, 0.95])
        spread = target[LEVELS.index(0.95)] - target[LEVELS.index(0.05)]
        np.testing.assert_allclose(got[1] - got[0], spread, rtol=0.25)


def test_profile_family_needs_its_file():
    with pytest.raises(ConfigError, match="perturbation.logit_noise.profile"):
        load_config(None, ["perturbation.logit_noise.family=profile"])
    with pytest.raises(ConfigError, match="does not exist"):
        from timsim.sampler import sampler_spec

        sampler_spec(load_config(None, ["perturbation.logit_noise.family=profile",
                                        "perturbation.logit_noise.profile=/nonexistent.json"]))
