"""Tests for timsim/tasks.py: encoding, exact verification, rewards, and the held-out split.

Reference answers are computed in pure Python from the *decoded* prompt text, independently
of the task's own `solve`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timsim import tasks as T

# n_digits values per task (within each task's accepted range; count 12 gives a 2-digit answer).
N_DIGITS = {
    "reverse": (1, 3, 5),
    "sort": (1, 3, 5),
    "add": (1, 3, 5, 8),
    "modmul": (1, 3, 4),
    "count": (1, 3, 5, 12),
    "cumsum": (1, 3, 5),
    "recurrence": (1, 3, 5, 40),
}
CASES = [(name, n) for name, ns in N_DIGITS.items() for n in ns]
CASE_IDS = [f"{name}-{n}" for name, n in CASES]


# Speed: JAX compiles every eager primitive, and every jitted function, once per shape. So
# sampling stays eager (`jax.random.randint` is jitted on its own and shared by all tasks with
# the same number of free digits), sampled prompts are cached, and all of a task's other methods
# run in one jitted function per (task, response length) on rows padded to a fixed count.
# `test_eager_and_jit_agree` checks that the jitted path matches eager calls.

ROWS = 2048  # every batch handed to `_evaluate` is padded to this many rows
BATCH = 64   # prompts per sample


@functools.cache
def _task(name: str, n: int, modulus: int = 97) -> T.Task:
    return T.make_task(name, n_digits=n, modulus=modulus)


@functools.cache
def _sample_cached(task: T.Task, seed: int, n: int, split: str) -> np.ndarray:
    out = np.array(task.sample(_key(seed), n, split))
    out.setflags(write=False)
    return out


def _sample(task: T.Task, seed: int, n: int = BATCH, split: str = "train") -> np.ndarray:
    return _sample_cached(task, seed, n, split).copy()


@functools.cache
def _evaluate_fn(task: T.Task, length: int):
    def run(prompts, responses):
        return {
            "solve": task.solve(prompts),
            "target": task.target(prompts, length),
            "verify": task.verify(prompts, responses),
            "binary": task.reward(prompts, responses, partial_credit=False),
            "partial": task.reward(prompts, responses, partial_credit=True),
            "position": task.position_correct(prompts, responses),
        }
    return jax.jit(run)


def _pad_rows(x: np.ndarray) -> np.ndarray:
    assert 0 < len(x) <= ROWS
    return np.concatenate([x, np.repeat(x[:1], ROWS - len(x), 0)]).astype(np.int32)


def _evaluate(task: T.Task, prompts, responses=None, length: int | None = None) -> dict[str, np.ndarray]:
    """solve / target / verify / rewards / position_correct of `prompts` (and `responses`)."""
    prompts = np.asarray(prompts)
    if responses is None:
        responses = np.full((len(prompts), length), T.PAD, np.int32)
    responses = np.asarray(responses)
    assert responses.shape[0] == prompts.shape[0]
    out = _evaluate_fn(task, responses.shape[1])(_pad_rows(prompts), _pad_rows(responses))
    return {k: np.array(v)[: len(prompts)] for k, v in out.items()}


def _target(task: T.Task, prompts, length: int) -> np.ndarray:
    return _evaluate(task, prompts, length=length)["target"]


@jax.jit
def _split_check(rows):
    """is_held_out of rows and of their projections to each split."""
    to_train = T.project_to_split(rows, "train")
    to_eval = T.project_to_split(rows, "eval")
    return {"held": T.is_held_out(rows), "to_train": to_train, "to_eval": to_eval,
            "train_held": T.is_held_out(to_train), "eval_held": T.is_held_out(to_eval)}


@jax.jit
def _is_held_out(rows):
    return T.is_held_out(rows)


def _held(digits) -> np.ndarray:
    return np.asarray(_is_held_out(jnp.asarray(digits, jnp.int32)))


def _key(seed: int = 0) -> jax.Array:
    return jax.random.PRNGKey(seed)


def _free_digits(prompts) -> np.ndarray:
    """Recover the free digits of prompts: every task's free digits are exactly its digit tokens, in order."""
    p = np.asarray(prompts)
    mask = p < 10
    n_free = int(mask[0].sum())
    assert (mask.sum(1) == n_free).all()
    return p[mask].reshape(p.shape[0], n_free)


# ----------------------------------------------------------------------------- pure-Python reference


def _reference_answer(task: T.Task, row) -> list[int]:
    toks = [T.VOCAB[int(t)] for t in row]
    assert toks[-1] == "=", toks
    body = toks[:-1]
    n = task.n_digits
    if task.name == "reverse":
        assert len(body) == n and all(t.isdigit() for t in body)
        return [int(t) for t in reversed(body)]
    if task.name == "sort":
        assert len(body) == n and all(t.isdigit() for t in body)
        return sorted(int(t) for t in body)
    if task.name == "add":
        i = body.index("+")
        a, b = "".join(body[:i]), "".join(body[i + 1:])
        assert len(a) == len(b) == n and a.isdigit() and b.isdigit()
        s = str(int(a) + int(b)).zfill(n + 1)
        assert len(s) == n + 1
        return [int(c) for c in reversed(s)]  # least significant digit first
    if task.name == "modmul":
        i = body.index("*")
        a, b = "".join(body[:i]), "".join(body[i + 1:])
        assert len(a) == len(b) == n and a.isdigit() and b.isdigit()
        m = task.modulus
        width = len(str(m - 1))
        return [int(c) for c in str((int(a) * int(b)) % m).zfill(width)]
    if task.name == "count":
        i = body.index("?")
        digits, q = body[:i], body[i + 1:]
        assert len(digits) == n and len(q) == 1
        width = len(str(n))
        return [int(c) for c in str(digits.count(q[0])).zfill(width)]
    if task.name == "cumsum":
        assert len(body) == n and all(t.isdigit() for t in body)
        return [sum(int(t) for t in body[: i + 1]) % 10 for i in range(n)]
    if task.name == "recurrence":
        assert len(body) == 4 and all(t.isdigit() for t in body)
        x = [int(t) for t in body]
        for _ in range(n):
            x.append((x[-4] + x[-3]) % 10)
        return x[4:]
    raise AssertionError(f"no reference for {task.name}")


def _expected_prompt_len(name: str, n: int) -> int:
    return {"reverse": n + 1, "sort": n + 1, "cumsum": n + 1, "add": 2 * n + 2, "modmul": 2 * n + 2, "count": n + 3,
            "recurrence": 5}[name]


def _edge_digits(task: T.Task) -> np.ndarray:
    """Deterministic corner-case free-digit rows: all zeros, all nines, a run of equal digits, 0..9 cycling."""
    k = task.n_free
    rows = [np.zeros(k), np.full(k, 9), np.full(k, 7), np.arange(k) % 10, (9 - np.arange(k)) % 10]
    rows += [np.full(k, d) for d in range(10)]  # e.g. count with every digit equal to the query
    rng = np.random.default_rng(k)
    rows += list(rng.integers(0, 10, size=(BATCH - len(rows), k)))  # BATCH rows: shares compiled shapes
    return np.stack(rows).astype(np.int32)


# ----------------------------------------------------------------------------- registry / construction


def test_registry_contains_the_six_tasks():
    assert set(T.TASKS) == {"reverse", "sort", "add", "modmul", "count", "cumsum", "recurrence"}
    for name, cls in T.TASKS.items():
        assert cls.name == name
        assert issubclass(cls, T.Task)


def test_vocabulary_constants():
    assert T.VOCAB_SIZE == len(T.VOCAB) == 16
    assert [T.VOCAB[i] for i in range(10)] == [str(d) for d in range(10)]
    assert (T.VOCAB[T.PAD], T.VOCAB[T.EOS], T.VOCAB[T.EQ], T.VOCAB[T.PLUS], T.VOCAB[T.TIMES], T.VOCAB[T.QUERY]) == (
        "<pad>", "<eos>", "=", "+", "*", "?")
    assert T.detokenize([1, 2, T.PLUS, 3, T.EQ]) == "1 2 + 3 ="


@pytest.mark.parametrize("name,n", CASES, ids=CASE_IDS)
def test_shapes_and_prompt_structure(name, n):
    task = _task(name, n)
    assert task.name == name and task.n_digits == n
    assert task.prompt_len == _expected_prompt_len(name, n)
    for split, seed in (("train", 0), ("eval", 1)):
        prompts = _sample(task, seed, split=split)
        assert prompts.shape == (BATCH, task.prompt_len)
        assert prompts.dtype == np.int32
        assert (prompts[:, -1] == T.EQ).all()
        assert ((prompts >= 0) & (prompts < T.VOCAB_SIZE)).all()
        assert not np.isin(prompts, [T.PAD, T.EOS]).any()
        assert _free_digits(prompts).shape == (BATCH, task.n_free)
        answers = _evaluate(task, prompts, length=task.answer_len + 1)["solve"]
        assert answers.shape == (BATCH, task.answer_len)
        assert ((answers >= 0) & (answers <= 9)).all()


def test_eager_and_jit_agree():
    task = _task("add", 3)
    k = task.answer_len + 1
    prompts = _sample(task, 0)
    np.testing.assert_array_equal(prompts, np.asarray(jax.jit(task.sample, static_argnums=(1, 2))(_key(0), BATCH, "train")))
    resp = np.array(task.target(prompts, k))
    resp[::2, 0] = (resp[::2, 0] + 1) % 10
    out = _evaluate(task, prompts, resp)
    np.testing.assert_array_equal(out["solve"], np.asarray(task.solve(prompts)))
    np.testing.assert_array_equal(out["target"], np.asarray(task.target(prompts, k)))
    np.testing.assert_array_equal(out["verify"], np.asarray(task.verify(prompts, resp)))
    np.testing.assert_array_equal(out["binary"], np.asarray(task.reward(prompts, resp, partial_credit=False)))
    np.testing.assert_array_equal(out["partial"], np.asarray(task.reward(prompts, resp, partial_credit=True)))
    assert out["verify"][1::2].all() and not out["verify"][::2].any()


def test_make_task_passes_modulus_only_to_modmul():
    # The config builds every task with the same params; other tasks ignore `modulus`.
    assert T.make_task("add", n_digits=3, modulus=13) == T.Add(n_digits=3)
    m = T.make_task("modmul", n_digits=2, modulus=13)
    assert m.modulus == 13 and m.answer_len == 2
    assert T.make_task("modmul", n_digits=2, modulus=1000).answer_len == 3
    assert T.make_task("modmul", n_digits=2, modulus=1001).answer_len == 4


def test_task_is_immutable():
    task = T.make_task("add", n_digits=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.n_digits = 4


def test_make_task_unknown_name_lists_accepted():
    with pytest.raises(ValueError) as err:
        T.make_task("nope")
    msg = str(err.value)
    assert "nope" in msg
    for name in T.TASKS:
        assert name in msg


@pytest.mark.parametrize("name,params,field", [
    ("reverse", {"n_digits": 0}, "task.n_digits"),
    ("sort", {"n_digits": 257}, "task.n_digits"),
    ("count", {"n_digits": -1}, "task.n_digits"),
    ("add", {"n_digits": 9}, "task.n_digits"),
    ("add", {"n_digits": 0}, "task.n_digits"),
    ("modmul", {"n_digits": 5}, "task.n_digits"),
    ("modmul", {"n_digits": 2, "modulus": 1}, "task.modulus"),
    ("modmul", {"n_digits": 2, "modulus": 10_001}, "task.modulus"),
])
def test_make_task_bad_params_name_the_field(name, params, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        T.make_task(name, **params)


def test_make_task_accepts_range_limits():
    for name, n in (("reverse", 256), ("sort", 1), ("add", 8), ("modmul", 4), ("count", 256)):
        assert T.make_task(name, n_digits=n).n_digits == n
    assert T.make_task("modmul", n_digits=1, modulus=2).modulus == 2
    assert T.make_task("modmul", n_digits=1, modulus=10_000).modulus == 10_000


# ----------------------------------------------------------------------------- solve vs reference


def _check_against_reference(task: T.Task, prompts: np.ndarray) -> None:
    answers = _evaluate(task, prompts, length=task.answer_len + 1)["solve"]
    assert answers.shape == (len(prompts), task.answer_len)
    for row, ans in zip(prompts, answers):
        assert ans.tolist() == _reference_answer(task, row), T.detokenize(row)


@pytest.mark.parametrize("name,n", CASES, ids=CASE_IDS)
def test_solve_matches_python_reference(name, n):
    task = _task(name, n)
    edge = np.asarray(task.encode(jnp.asarray(_edge_digits(task))))
    _check_against_reference(task, np.concatenate([_sample(task, 0), _sample(task, 1, split="eval"), edge]))


@pytest.mark.parametrize("modulus", [2, 7, 1000, 9973, 10_000])
def test_modmul_solve_matches_reference_for_moduli(modulus):
    task = _task("modmul", 4, modulus)
    assert task.answer_len == len(str(modulus - 1))
    edge = np.asarray(task.encode(jnp.asarray(_edge_digits(task))))
    _check_against_reference(task, np.concatenate([_sample(task, 0), edge]))


def test_add_known_examples():
    task = _task("add", 3)
    # 123 + 989 = 1112 -> reversed "2111"; 999 + 999 = 1998 -> "8991"; 0 + 0 -> "0000"
    digits = np.array([[1, 2, 3, 9, 8, 9], [9, 9, 9, 9, 9, 9], [0, 0, 0, 0, 0, 0]], np.int32)
    prompts = np.asarray(task.encode(jnp.asarray(digits)))
    assert T.detokenize(prompts[0]) == "1 2 3 + 9 8 9 ="
    solved = _evaluate(task, prompts, length=task.answer_len + 1)["solve"]
    assert solved.tolist() == [[2, 1, 1, 1], [8, 9, 9, 1], [0, 0, 0, 0]]


def test_add_max_operands_do_not_overflow():
    task = _task("add", 8)
    prompts = np.asarray(task.encode(jnp.full((1, 16), 9, jnp.int32)))
    # 99999999 + 99999999 = 199999998, reversed
    assert _evaluate(task, prompts, length=10)["solve"].tolist() == [[8, 9, 9, 9, 9, 9, 9, 9, 1]]


def test_count_known_examples():
    task = _task("count", 12)
    digits = np.array([[3] * 12 + [3], [3] * 12 + [4], [1, 2] * 6 + [2]], np.int32)
    prompts = np.asarray(task.encode(jnp.asarray(digits)))
    assert T.detokenize(prompts[1]).endswith("? 4 =")
    assert _evaluate(task, prompts, length=3)["solve"].tolist() == [[1, 2], [0, 0], [0, 6]]


# ----------------------------------------------------------------------------- target / verify / reward


def _lengths(task: T.Task) -> tuple[int, int]:
    """Response lengths exercised: exactly answer + <eos>, and with three <pad> after it."""
    k = task.answer_len + 1
    return k, k + 3


@pytest.mark.parametrize("name,n", CASES, ids=CASE_IDS)
def test_target_is_verified(name, n):
    task = _task(name, n)
    k = task.answer_len + 1
    prompts = np.concatenate([_sample(task, 0), _sample(task, 1, split="eval")])
    for length in _lengths(task):
        resp = _target(task, prompts, length)
        assert resp.shape == (2 * BATCH, length) and resp.dtype == np.int32
        out = _evaluate(task, prompts, resp)
        assert (resp[:, : task.answer_len] == out["solve"]).all()
        assert (resp[:, task.answer_len] == T.EOS).all()
        assert (resp[:, k:] == T.PAD).all()
        assert out["verify"].dtype == np.bool_ and out["verify"].all()
        assert out["position"].shape == (2 * BATCH, k) and out["position"].all()
        np.testing.assert_array_equal(out["binary"], 1.0)
        np.testing.assert_array_equal(out["partial"], 1.0)


def _all_single_corruptions(prompts: np.ndarray, target: np.ndarray, k: int):
    """Every response that differs from `target` in exactly one of the first k positions."""
    ps, rs = [], []
    for i in range(target.shape[0]):
        for pos in range(k):
            for tok in range(T.VOCAB_SIZE):
                if tok == target[i, pos]:
                    continue
                r = target[i].copy()
                r[pos] = tok
                ps.append(prompts[i])
                rs.append(r)
    return np.stack(ps), np.stack(rs)


@pytest.mark.parametrize("name,n", CASES, ids=CASE_IDS)
def test_every_single_token_corruption_is_rejected(name, n):
    task = _task(name, n)
    k = task.answer_len + 1
    n_prompts = min(8, ROWS // (k * (T.VOCAB_SIZE - 1)))  # long answers: fewer prompts
    prompts = _sample(task, 0)[:n_prompts]
    for length in _lengths(task):
        target = _target(task, prompts, length)
        ps, rs = _all_single_corruptions(prompts, target, k)
        assert len(rs) == n_prompts * k * (T.VOCAB_SIZE - 1)
        out = _evaluate(task, ps, rs)
        assert not out["verify"].any()
        np.testing.assert_array_equal(out["binary"], 0.0)
        assert out["partial"].dtype == np.float32
        np.testing.assert_allclose(out["partial"], (k - 1) / k, rtol=1e-6, atol=0)
        assert (out["position"].sum(1) == k - 1).all()


@pytest.mark.parametrize("name,n", [("add", 3), ("count", 12), ("modmul", 3)])
def test_tokens_after_eos_are_not_checked(name, n):
    task = _task(name, n)
    k, length = _lengths(task)
    prompts = _sample(task, 0)
    resp = _target(task, prompts, length)
    resp[:, k:] = np.random.default_rng(0).integers(0, T.VOCAB_SIZE, size=(BATCH, length - k))
    out = _evaluate(task, prompts, resp)
    assert out["verify"].all()
    np.testing.assert_array_equal(out["partial"], 1.0)


@pytest.mark.parametrize("name,n", [("reverse", 3), ("add", 3), ("modmul", 3), ("count", 12)])
def test_missing_or_shifted_eos_is_rejected(name, n):
    task = _task(name, n)
    a = task.answer_len
    _, length = _lengths(task)  # a + 4
    prompts = _sample(task, 0)
    target = _target(task, prompts, length)
    pad = lambda w: np.full((BATCH, w), T.PAD)  # noqa: E731
    no_eos = np.concatenate([target[:, :a], pad(4)], 1)
    early_eos = np.concatenate([target[:, : a - 1], np.full((BATCH, 1), T.EOS), pad(4)], 1)
    late_eos = np.concatenate([target[:, :a], np.zeros((BATCH, 1)), np.full((BATCH, 1), T.EOS), pad(2)], 1)
    eos_only = np.concatenate([np.full((BATCH, 1), T.EOS), pad(length - 1)], 1)
    for bad in (no_eos, early_eos, late_eos, eos_only):
        assert bad.shape == (BATCH, length)
        assert not _evaluate(task, prompts, bad.astype(np.int32))["verify"].any()


@pytest.mark.parametrize("name,n", [("reverse", 3), ("add", 5), ("modmul", 4), ("count", 12)])
def test_reward_binary_equals_verify_and_partial_is_fraction(name, n):
    task = _task(name, n)
    k, length = _lengths(task)
    prompts = _sample(task, 0)
    target = _target(task, prompts, length)
    rng = np.random.default_rng(1)
    # Mix: exact answers, answers with a random number of wrong checked positions, random junk.
    resp = target.copy()
    n_wrong = rng.integers(0, k + 1, size=BATCH)
    for i in range(BATCH):
        for pos in rng.choice(k, size=n_wrong[i], replace=False):
            resp[i, pos] = (resp[i, pos] + rng.integers(1, T.VOCAB_SIZE)) % T.VOCAB_SIZE
    resp[-8:] = rng.integers(0, T.VOCAB_SIZE, size=(8, length))

    out = _evaluate(task, prompts, resp)
    ref_correct = resp[:, :k] == target[:, :k]
    assert out["binary"].dtype == np.float32 and out["partial"].dtype == np.float32
    assert set(np.unique(out["binary"]).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(out["binary"], out["verify"].astype(np.float32))
    np.testing.assert_array_equal(out["verify"], ref_correct.all(1))
    np.testing.assert_array_equal(out["position"], ref_correct)
    np.testing.assert_allclose(out["partial"], ref_correct.mean(1), rtol=1e-6)
    m = BATCH - 8
    assert out["verify"][:m][n_wrong[:m] == 0].all() and not out["verify"][:m][n_wrong[:m] > 0].any()
    assert 0 < out["verify"].sum() < BATCH  # the mix exercises both outcomes


# ----------------------------------------------------------------------------- held-out split


def test_add_train_and_eval_prompts_are_disjoint():
    task = _task("add", 2)
    train = _sample(task, 11, 2000, "train")
    held = _sample(task, 12, 2000, "eval")
    train_set = {tuple(r) for r in train.tolist()}
    held_set = {tuple(r) for r in held.tolist()}
    assert not train_set & held_set
    # The draws cover a good part of both sets (10^4 prompts, 10% held out).
    assert len(held_set) > 700 and len(train_set) > 1500
    flags = _held(_free_digits(np.concatenate([train, held])))
    assert not flags[:2000].any() and flags[2000:].all()
    # Same key, other split: still disjoint.
    same_key = {tuple(r) for r in _sample(task, 11, 2000, "eval").tolist()}
    assert not train_set & same_key


@pytest.mark.parametrize("name,n", CASES, ids=CASE_IDS)
def test_is_held_out_on_sampled_free_digits(name, n):
    task = _task(name, n)
    train = _sample(task, 0, split="train")
    held = _sample(task, 1, split="eval")
    flags = _held(_free_digits(np.concatenate([train, held])))
    assert not flags[:BATCH].any(), "a training prompt is in the held-out set"
    assert flags[BATCH:].all(), "an eval prompt is not in the held-out set"
    if name == "reverse":  # free digits are the prompt's first n tokens
        flags = _held(np.concatenate([train, held])[:, :n])
        assert not flags[:BATCH].any() and flags[BATCH:].all()
    train_set = {tuple(r) for r in train.tolist()}
    assert not train_set & {tuple(r) for r in held.tolist()}


def test_free_digits_roundtrip_through_encode():
    for name, n in CASES:
        task = _task(name, n)
        digits = _edge_digits(task)
        np.testing.assert_array_equal(_free_digits(task.encode(jnp.asarray(digits))), digits)


def _all_rows(n_free: int) -> np.ndarray:
    return np.array(list(itertools.product(range(10), repeat=n_free)), np.int32)


@pytest.mark.parametrize("n_free", [1, 2, 3, 4])
def test_split_partitions_prompt_space_exhaustively(n_free):
    r = _all_rows(n_free)
    out = {k: np.asarray(v) for k, v in _split_check(r).items()}
    held, to_train, to_eval = out["held"], out["to_train"], out["to_eval"]
    assert held.sum() * 10 == len(held)  # exactly 10% of the space is held out
    assert not out["train_held"].any()
    assert out["eval_held"].all()
    # Only the last free digit is ever changed; rows already in the target split are untouched.
    np.testing.assert_array_equal(to_train[:, :-1], r[:, :-1])
    np.testing.assert_array_equal(to_eval[:, :-1], r[:, :-1])
    np.testing.assert_array_equal(to_train[~held], r[~held])
    np.testing.assert_array_equal(to_eval[held], r[held])
    # The eval projection reaches every held-out row; the train projection every training row.
    assert {tuple(x) for x in to_eval.tolist()} == {tuple(x) for x in r[held].tolist()}
    assert {tuple(x) for x in to_train.tolist()} == {tuple(x) for x in r[~held].tolist()}


def test_split_projection_for_long_rows():
    # Free-digit counts of larger tasks (e.g. count n=256 has 257 free digits).
    rng = np.random.default_rng(0)
    for n_free in (9, 33, 257):
        out = _split_check(rng.integers(0, 10, size=(256, n_free)).astype(np.int32))
        assert not np.asarray(out["train_held"]).any()
        assert np.asarray(out["eval_held"]).all()
        assert 0 < np.asarray(out["held"]).sum() < 256


def test_project_to_split_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        T.project_to_split(jnp.zeros((2, 3), jnp.int32), "test")
    with pytest.raises(ValueError, match="split"):
        _task("add", 3).sample(_key(0), BATCH, "validation")


def test_sampler_is_deterministic_given_key():
    task = _task("add", 3)
    for split in ("train", "eval"):
        a = np.asarray(task.sample(_key(21), BATCH, split))
        b = np.asarray(task.sample(_key(21), BATCH, split))
        c = np.asarray(task.sample(_key(22), BATCH, split))
        np.testing.assert_array_equal(a, b)
        assert (a != c).any(axis=1).mean() > 0.9  # almost every row differs
        assert len({tuple(r) for r in a.tolist()}) > 50  # rows within one draw differ too


def test_eval_fraction_of_uniform_draws_is_about_ten_percent():
    rows = np.random.default_rng(0).integers(0, 10, size=(20000, 6)).astype(np.int32)
    assert 0.09 < _held(rows).mean() < 0.11


@pytest.mark.parametrize("name", ["reverse", "sort", "cumsum"])
@pytest.mark.parametrize("n", [64, 255])
def test_long_responses_verify_the_answer_and_reject_every_single_token_corruption(name, n):
    """Long tasks (64-256 response tokens): the right answer passes, and every response that
    differs from it in one checked position (any of the 15 other tokens) fails."""
    task = _task(name, n)
    prompts = _sample(task, 0, n=1)
    target = np.asarray(task.target(jnp.asarray(prompts), n + 1))
    assert target.shape == (1, n + 1)
    np.testing.assert_array_equal(target[0, :n], _reference_answer(task, prompts[0]))
    ps, rs = _all_single_corruptions(prompts, target, n + 1)
    assert len(rs) == (n + 1) * (T.VOCAB_SIZE - 1)
    verify = jax.jit(task.verify)
    assert bool(verify(jnp.asarray(prompts), jnp.asarray(target))[0])
    assert not np.asarray(verify(jnp.asarray(ps), jnp.asarray(rs))).any()
