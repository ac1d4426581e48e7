"""Sampler, learner and run loop: exact zero mismatch, masking, determinism, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from timsim.config import load_config, static_view
from timsim.model import ATTENTION_BLOCK, init_model, position_blocks, response_forward
from timsim import model as model_lib, rollout
from timsim.rollout import learner_logprobs, sample
import timsim
from timsim import hyper
from timsim.executors import run_cells
from timsim.metrics import METRICS
from timsim.plan import Cell, stack_hyperparams
from timsim.runner import load_trained_params
from timsim.store import Store, load
from timsim.tasks import EOS, PAD, VOCAB_SIZE
from timsim.step import init_state, make_chunk, make_step, place


def test_sampler_shapes_eos_and_padding(tiny_cfg, tiny_base):
    graphdef, params, _ = tiny_base
    task = tiny_cfg.task.build()
    prompts = task.sample(jax.random.key(0), 64)
    out = sample(nnx.merge(graphdef, params), prompts, jax.random.key(1), 1.0, 6)
    tokens, mask = np.asarray(out.responses), np.asarray(out.mask)
    assert tokens.shape == mask.shape == (64, 6)
    for row, m in zip(tokens, mask):
        n_live = int(m.sum())
        assert m[:n_live].all() and not m[n_live:].any(), "mask must be a prefix"
        assert (row[n_live:] == PAD).all()
        assert (row[: n_live - 1] != EOS).all(), "nothing is generated after <eos>"
        if n_live < 6:
            assert row[n_live - 1] == EOS


@pytest.mark.bits
def test_greedy_sampling_ignores_the_key(tiny_cfg, tiny_base):
    graphdef, params, _ = tiny_base
    prompts = tiny_cfg.task.build().sample(jax.random.key(0), 32)
    model = nnx.merge(graphdef, params)
    a = sample(model, prompts, jax.random.key(1), 1.0, 4, greedy=True).responses
    b = sample(model, prompts, jax.random.key(2), 1.0, 4, greedy=True).responses
    assert np.array_equal(a, b)


def test_decode_path_matches_learner_to_float_precision(tiny_cfg, tiny_base):
    """The KV-cache path and the teacher-forced path compute the same function (to ~1e-6):
    this is the floor that the zero-mismatch design reports but does not rely on."""
    graphdef, params, _ = tiny_base
    model = nnx.merge(graphdef, params)
    prompts = tiny_cfg.task.build().sample(jax.random.key(3), 64)
    out = sample(model, prompts, jax.random.key(4), 1.0, 4)
    logp = learner_logprobs(model, prompts, out.responses, out.mask, 1.0)[0]
    np.testing.assert_allclose(out.logp_decode, logp, atol=1e-4)


def test_attention_by_blocks_is_the_plain_attention(tiny_cfg, monkeypatch):
    """A long context's attention runs by blocks of positions: each decode step attends only to
    the KV-cache blocks written so far, and the teacher-forced queries of a block skip later
    keys. An implementation detail: the same function as one whole-cache block and as the
    full-square masked forward (to float rounding), across every block boundary."""
    response_len = 2 * ATTENTION_BLOCK + 10
    cfg = tiny_cfg.model.model_copy(update={"max_len": tiny_cfg.task.build().prompt_len + response_len})
    model = init_model(cfg, VOCAB_SIZE, 0)
    prompts = tiny_cfg.task.build().sample(jax.random.key(11), 16)
    assert len(position_blocks(prompts.shape[1] + response_len)) == 3
    blocks = sample(model, prompts, jax.random.key(12), 1.0, response_len, greedy=True)
    assert blocks.mask[:, -1].sum() > 0, "some rows must live into the last block"
    logp = learner_logprobs(model, prompts, blocks.responses, blocks.mask, 1.0)[0]
    np.testing.assert_allclose(blocks.logp_decode, logp, atol=1e-4)
    monkeypatch.setattr(rollout, "position_blocks", lambda length: ((0, length),))
    whole = sample(model, prompts, jax.random.key(12), 1.0, response_len, greedy=True)
    assert np.array_equal(blocks.responses, whole.responses)
    np.testing.assert_allclose(blocks.logp_decode, whole.logp_decode, atol=1e-5)
    # and the teacher-forced forward that runs a group's prompt once, at this length too
    full, by_blocks = (response_forward(model, jnp.repeat(prompts[:8], 2, axis=0), blocks.responses, group=g)[0]
                       for g in (1, 2))
    np.testing.assert_allclose(by_blocks, full, atol=1e-5)


def test_attention_by_chunks_of_rows_is_the_plain_attention(tiny_cfg, tiny_base, monkeypatch):
    """Long contexts compute attention by chunks of rows (recomputed in the backward): the same
    logits and gradients as all rows at once, a chunk size that leaves a remainder included."""
    graphdef, params, _ = tiny_base
    prompts = jnp.repeat(tiny_cfg.task.build().sample(jax.random.key(13), 5), 2, axis=0)
    responses = jax.random.randint(jax.random.key(14), (10, 6), 0, VOCAB_SIZE)
    weights = jax.random.normal(jax.random.key(15), (10, 6, VOCAB_SIZE))

    def logits_and_grads(group):
        def loss(params):
            logits = response_forward(nnx.merge(graphdef, params), prompts, responses, group=group)[0]
            return (logits * weights).sum(), logits
        return jax.jit(jax.grad(loss, has_aux=True))(params)

    plain = [logits_and_grads(g) for g in (1, 2)]
    heads, keys = tiny_cfg.model.n_heads, prompts.shape[1] + responses.shape[1]
    monkeypatch.setattr(model_lib, "ATTENTION_CHUNK_BYTES", 3 * heads * keys * keys * 4)  # 3 rows a chunk
    for (grads, logits), (plain_grads, plain_logits) in zip([logits_and_grads(g) for g in (1, 2)], plain):
        np.testing.assert_allclose(logits, plain_logits, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, plain_grads)


@pytest.mark.bits
def test_padding_does_not_leak_into_learner_logprobs(tiny_cfg, tiny_base):
    graphdef, params, _ = tiny_base
    model = nnx.merge(graphdef, params)
    prompts = tiny_cfg.task.build().sample(jax.random.key(5), 16)
    out = sample(model, prompts, jax.random.key(6), 1.0, 6)
    garbage = jnp.where(out.mask > 0, out.responses, jax.random.randint(jax.random.key(7), out.responses.shape, 0, 16))
    a = learner_logprobs(model, prompts, out.responses, out.mask, 1.0)[0]
    b = learner_logprobs(model, prompts, garbage, out.mask, 1.0)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.bits
def test_a_group_runs_its_prompt_once(tiny_cfg, tiny_base):
    """GRPO's samples of a prompt share it: with `group`, the teacher-forced forward and the
    sampler's prefill run each prompt once, and compute what running it per response does (to
    float rounding: other shapes)."""
    graphdef, params, _ = tiny_base
    model = nnx.merge(graphdef, params)
    prompts = jnp.repeat(tiny_cfg.task.build().sample(jax.random.key(8), 8), 4, axis=0)
    responses = jax.random.randint(jax.random.key(9), (32, 6), 0, VOCAB_SIZE)
    full, shared = (response_forward(model, prompts, responses, group=g)[0] for g in (1, 4))
    assert shared.shape == full.shape == (32, 6, VOCAB_SIZE)
    np.testing.assert_allclose(shared, full, atol=1e-5)
    per_row, per_group = (sample(model, prompts, jax.random.key(10), 1.0, 6, greedy=True, group=g) for g in (1, 4))
    assert np.array_equal(per_row.responses, per_group.responses)
    np.testing.assert_allclose(per_group.logp_decode, per_row.logp_decode, atol=1e-5)


@pytest.mark.parametrize("extra", [[], ["grpo.old_logprobs=bypass", "perturbation.logit_noise.family=gaussian",
                                        "perturbation.logit_noise.scale=0.5", "correction.kinds=[token_tis]"]])
@pytest.mark.bits
def test_one_forward_for_pi_old_and_the_update_is_the_two_forwards(tiny_overrides, tiny_base, extra):
    """With one minibatch the learner's forward that reports pi_old is the first update's own
    (its vjp carries the gradient): one step computes what a separate pi_old forward does, to
    float rounding, from the same sampled batch."""
    cfg = load_config(None, tiny_overrides + extra)
    graphdef, params, _ = tiny_base
    hp = hyper.of(cfg)
    state = init_state(params, hp)
    outs = [jax.jit(make_step(static_view(cfg), cfg.task.build(), graphdef, share_forward=share))(state, hp, params)
            for share in (True, False)]
    (shared_state, shared), (separate_state, separate) = outs
    assert np.array_equal(shared["reward_mean"], separate["reward_mean"])  # the same sampled batch
    for name in separate:
        np.testing.assert_allclose(shared[name], separate[name], rtol=2e-4, atol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(shared_state.params), jax.tree.leaves(separate_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(shared["update_norm"]) > 0


def train_metrics(cfg, base, n_chunks: int = 1):
    """Train `cfg` from `base` for `n_chunks` chunks through the public API, without held-out
    evaluation: (final state, {metric: array [runs, steps]}) of the step metrics the run computed."""
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"steps": n_chunks * cfg.run.chunk_steps})})
    result = timsim.train(cfg, base=base[:2], evaluate=False, progress=False)
    trained = result.metrics[result.metrics.step > 0]
    runs, steps = len(cfg.run.seeds), n_chunks * cfg.run.chunk_steps
    computed = [name for name in METRICS if trained[name].notna().any() and not name.startswith("eval_")]
    return next(iter(result.state.values())), {name: trained[name].to_numpy().reshape(runs, steps)
                                               for name in computed}


FLOOR_METRICS = ("delta_floor_max",)  # decode path vs learner: ~1e-6 by construction
# one side's absolute log-probs (not their difference delta, exactly 0 at zero mismatch): as
# computed in another program their last bit follows that program's fusion
SIDE_METRICS = ("entropy_sampler", "entropy_learner", "log_ppl_learner", "log_ppl_sampler", "ppl_learner",
                "ppl_sampler")


def assert_same_training(a: dict, b: dict, rounding: tuple[str, ...] = ()) -> None:
    """Two runs of different compiled programs (a correction, a scale-0 noise family, a replay
    that must be the identity) trained identically: every metric bit for bit, except the
    floor metrics and those in `rounding`. The floor compares the KV-cache decode path with the
    learner's forward, whose last bits depend on how XLA fuses each program (DESIGN §8.2,
    §8.7), so across programs it is held to its own size, 1e-5, not to bits. `rounding`: metrics
    of a computation that the two programs fuse differently, held to float32 rounding."""
    for name, values in a.items():
        if name in FLOOR_METRICS:
            np.testing.assert_allclose(values, b[name], rtol=0, atol=1e-5, err_msg=name)
        elif name in rounding:
            np.testing.assert_allclose(values, b[name], rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            assert np.array_equal(values, b[name], equal_nan=True), name


@pytest.mark.parametrize("extra", [
    [], ["grpo.minibatches=4", "grpo.epochs=2"], ["grpo.old_logprobs=bypass"], ["sampler.temperature=0.7"]])
@pytest.mark.bits
def test_zero_mismatch_is_exact_on_many_batches(tiny_overrides, tiny_base, extra):
    """max |delta| == 0.0 exactly at every step (each step is a fresh random batch), from the base
    model through training; in recompute mode the PPO ratio at the first update is exactly 1."""
    cfg = load_config(None, tiny_overrides + extra + ["run.chunk_steps=10", "run.steps=20"])
    graphdef, params, _ = tiny_base
    state, metrics = train_metrics(cfg, tiny_base, 2)
    assert metrics["delta_abs_max"].shape == (2, 20)
    assert np.all(metrics["delta_abs_max"] == 0.0)
    if cfg.grpo.old_logprobs == "recompute":
        assert np.all(metrics["ratio_first_dev_max"] == 0.0)
    else:  # bypass: pi_old is the sampler's report, which matches the loss's forward to float rounding
        assert np.all(metrics["ratio_first_dev_max"] < 1e-5)
    assert np.all(metrics["update_norm"] > 0), "the model was trained in between"
    assert np.all(metrics["delta_floor_max"] < 1e-3)


@pytest.mark.bits
def test_zero_mismatch_exact_on_random_init(tiny_cfg):
    graphdef, params = nnx.split(init_model(tiny_cfg.model, VOCAB_SIZE, 7), nnx.Param)
    _, metrics = train_metrics(tiny_cfg, (graphdef, params))
    assert np.all(metrics["delta_abs_max"] == 0.0)


def _run(tiny_overrides, tmp_path, name, extra=()):
    cfg = load_config(None, tiny_overrides + list(extra) + [f"run.out_dir={tmp_path}", f"run.name={name}"])
    run_cells([Cell(name, cfg)], Store(tmp_path / name))
    return load(tmp_path / name)


def test_same_config_and_seed_is_bit_identical(tiny_overrides, tiny_base, tmp_path):
    m1, s1 = _run(tiny_overrides, tmp_path, "a")
    m2, s2 = _run(tiny_overrides, tmp_path, "a2")
    m2["cell_id"] = "a"
    s2["cell_id"] = "a"
    pd.testing.assert_frame_equal(m1, m2, check_exact=True)
    pd.testing.assert_frame_equal(s1, s2, check_exact=True)
    # different seeds on the run axis saw different batches
    r0, r1 = (m1[(m1.run_idx == i) & (m1.step > 0)].reward_mean.to_numpy() for i in (0, 1))
    assert not np.array_equal(r0, r1)


def test_results_layout(tiny_overrides, tiny_base, tmp_path):
    metrics, summary = _run(tiny_overrides, tmp_path, "layout")
    root = tmp_path / "layout"
    assert (root / "manifest.json").is_file() and (root / "config.resolved.yaml").is_file()
    parts = sorted(p.name for p in (root / "metrics").glob("*.parquet"))
    assert parts == ["part-layout-00000.parquet", "part-layout-00001.parquet", "part-layout-00002.parquet"]
    assert list(metrics.columns[:4]) == ["cell_id", "run_idx", "seed", "step"]
    assert len(metrics) == 2 * 11  # 2 runs x (step 0 + 10 steps)
    evals = metrics.dropna(subset=["eval_greedy_accuracy"]).step.unique().tolist()
    assert evals == [0, 5, 10]
    at_evals = metrics.dropna(subset=["eval_greedy_accuracy"])
    assert (at_evals.eval_sampler_greedy_accuracy == at_evals.eval_greedy_accuracy).all(), "zero mismatch"
    assert (at_evals.eval_sampler_sampled_accuracy == at_evals.eval_sampled_accuracy).all(), "zero mismatch"
    assert len(summary) == 2 and set(summary.seed) == {0, 1}
    # the final checkpoint restores as trained weights of the base's shape
    graphdef, base_params, _ = tiny_base
    cfg = load_config(None, tiny_overrides)
    params, step = load_trained_params(root, base_params, hyper.of(cfg), run=1)
    assert step == 10
    assert jax.tree.structure(params) == jax.tree.structure(base_params)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base_params)))


@pytest.mark.slow
def test_grpo_learns_on_two_seeds(tiny_overrides, tiny_base, tmp_path):
    """A real learning signal: held-out greedy accuracy rises well above the base's for every seed."""
    _, summary = _run(tiny_overrides, tmp_path, "learn", ["run.steps=150", "run.chunk_steps=50"])
    base_acc = summary.base_accuracy.iloc[0]
    assert (summary.base_accuracy == base_acc).all(), "every run starts from the same base weights"
    assert (summary.final_accuracy > base_acc + 0.15).all(), summary


def test_kl_to_reference_and_entropy_bonus_run(tiny_overrides, tiny_base):
    cfg = load_config(None, tiny_overrides + ["grpo.kl_ref=k3", "grpo.kl_coef=0.1", "grpo.entropy_coef=0.01"])
    _, metrics = train_metrics(cfg, tiny_base)
    # at the first update the policy is the reference (to float rounding: the reference's
    # forward-only pass and the forward inside value_and_grad are fused differently)
    assert metrics["kl_ref"][:, 0].max() < 1e-8
    assert np.all(metrics["kl_ref"][:, -1] > 0.0), "after updates it has moved away from it"


@pytest.mark.bits
def test_async_lag_is_staleness_not_mismatch(tiny_overrides, tiny_base):
    """With lag the sampler runs old weights: delta stays exactly 0 (same numerics), while the
    PPO ratio at the first update departs from 1 once the weights have moved (step > lag)."""
    cfg = load_config(None, tiny_overrides + ["perturbation.lag_steps=2", "run.chunk_steps=10", "run.steps=10"])
    _, metrics = train_metrics(cfg, tiny_base)
    assert np.all(metrics["delta_abs_max"] == 0.0)
    # step 0: the lagged weights are the current ones (to float rounding: with lag, pi_old comes
    # from a separate forward, not from the loss's own)
    assert np.all(metrics["ratio_first_dev_max"][:, 0] < 1e-5)
    assert np.all(metrics["ratio_first_dev_max"][:, 3:] > 1e-4), "later: pi_theta / pi_old measures staleness"


def test_collapse_detection_hand_made_curves():
    """Smoothed reward (window 2): a run that peaks then falls below half its peak has collapsed
    at that step; one that climbs back has recovered; a NaN loss is a collapse; a steady run is not."""
    import pandas as pd

    from timsim.summary import collapse

    def run(rewards, losses=None):
        n = len(rewards)
        return pd.DataFrame({"step": range(1, n + 1), "reward_mean": rewards,
                             "loss": losses if losses is not None else [0.0] * n, "grad_norm": [1.0] * n})

    fell = collapse(run([0.2, 0.8, 0.8, 0.2, 0.0, 0.0]), fraction=0.5, window=2)
    assert fell["peak_reward"] == 0.8 and fell["peak_reward_step"] == 3
    assert fell["collapsed"] == 1.0 and fell["collapse_step"] == 5 and fell["recovered"] == 0.0  # (0.2+0)/2 < 0.4
    back = collapse(run([0.2, 0.8, 0.8, 0.0, 0.0, 0.8, 0.8]), fraction=0.5, window=2)
    assert back["collapse_step"] == 5 and back["recovered"] == 1.0
    nan = collapse(run([0.2, 0.3, 0.4], losses=[0.0, float("nan"), 0.0]), fraction=0.5, window=2)
    assert nan["collapsed"] == 1.0 and nan["collapse_step"] == 2 and nan["nonfinite_steps"] == 1
    steady = collapse(run([0.2, 0.3, 0.4, 0.5]), fraction=0.5, window=2)
    assert steady["collapsed"] == 0.0 and np.isnan(steady["collapse_step"])
