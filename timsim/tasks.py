"""Synthetic tasks with exactly checkable answers.

Every task shares one 16-token vocabulary (`VOCAB`): digits 0-9 are tokens 0-9, then
`<pad>`, `<eos>` and four symbols. A prompt is a fixed-length token row that ends with `=`;
the correct response is the answer's tokens followed by `<eos>`, then `<pad>` to the
sampler's maximum response length.

A task draws its prompts from a vector of uniform *free digits* (``[n, n_free]``) and encodes
them. Held-out prompts are disjoint from training prompts by construction: a prompt is
held out iff the checksum ``sum_i c_i d_i mod 10`` of its free digits is 0 (10% of prompt
space). ``sample(split="train")`` moves a held-out draw into the training set by bumping its
last free digit, ``sample(split="eval")`` sets the last digit so the checksum is 0.

A new task is one subclass (``n_free``, ``encode``, ``solve``) registered in `TASKS`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from timsim.registry import Registry

VOCAB = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
         "<pad>", "<eos>", "=", "+", "*", "?")
PAD, EOS, EQ, PLUS, TIMES, QUERY = 10, 11, 12, 13, 14, 15
VOCAB_SIZE = len(VOCAB)
EVAL_KEY_SEED = 12345  # held-out prompts are the same for every run, cell and seed

TASKS: Registry = Registry("task", "task.name")


def _checksum_coefficients(n_free: int) -> jax.Array:
    """Fixed coefficients of the split checksum; the last one is odd and not 5 (invertible mod 10)."""
    coeff = (jnp.arange(n_free) * 7 + 3) % 10
    coeff = jnp.where(coeff % 2 == 0, coeff + 1, coeff)
    coeff = jnp.where(coeff == 5, 7, coeff)
    return coeff.astype(jnp.int32)


_INVERSE_MOD10 = np.array([0, 1, 0, 7, 0, 0, 0, 3, 0, 9], np.int32)  # numpy: importing starts no backend


def project_to_split(digits: jax.Array, split: str) -> jax.Array:
    """Move free-digit rows `digits` [n, D] into the training or held-out prompt set."""
    coeff = _checksum_coefficients(digits.shape[-1])
    checksum = (digits * coeff).sum(-1) % 10
    last = digits[:, -1]
    if split == "train":
        new_last = jnp.where(checksum == 0, (last + 1) % 10, last)
    elif split == "eval":
        rest = (digits[:, :-1] * coeff[:-1]).sum(-1)
        new_last = (-rest * jnp.asarray(_INVERSE_MOD10)[coeff[-1]]) % 10
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return digits.at[:, -1].set(new_last.astype(digits.dtype))


def is_held_out(digits: jax.Array) -> jax.Array:
    """True where a free-digit row [n, D] belongs to the held-out set."""
    return (digits * _checksum_coefficients(digits.shape[-1])).sum(-1) % 10 == 0


def _digits_of(value: jax.Array, n_digits: int) -> jax.Array:
    """Base-10 digits of `value` [n], most significant first: [n, n_digits]."""
    powers = 10 ** jnp.arange(n_digits - 1, -1, -1)
    return (value[:, None] // powers) % 10


def _value_of(digits: jax.Array) -> jax.Array:
    """Integer value of digit rows [n, k], most significant first."""
    powers = 10 ** jnp.arange(digits.shape[-1] - 1, -1, -1)
    return (digits * powers).sum(-1)


def _then_eq(digits: jax.Array) -> jax.Array:
    """Digit rows [n, k] followed by `=`: [n, k + 1]."""
    return jnp.concatenate([digits, jnp.full((digits.shape[0], 1), EQ, jnp.int32)], 1)


@dataclasses.dataclass(frozen=True)
class Task:
    """Base class: a fixed-shape prompt generator and an exact verifier."""

    n_digits: int = 3
    name: ClassVar[str] = ""

    @property
    def n_free(self) -> int:
        raise NotImplementedError

    @property
    def answer_len(self) -> int:
        raise NotImplementedError

    def encode(self, digits: jax.Array) -> jax.Array:
        """Free digits [n, n_free] -> prompt tokens [n, prompt_len]."""
        raise NotImplementedError

    def solve(self, prompts: jax.Array) -> jax.Array:
        """Prompt tokens [n, prompt_len] -> answer tokens [n, answer_len]."""
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ValueError naming the bad parameter."""
        if not 1 <= self.n_digits <= 256:
            raise ValueError(f"task.n_digits must be in [1, 256], got {self.n_digits}")

    @property
    def prompt_len(self) -> int:
        return int(self.encode(jnp.zeros((1, self.n_free), jnp.int32)).shape[1])

    def sample(self, key: jax.Array, n: int, split: str = "train") -> jax.Array:
        """`n` prompts [n, prompt_len] from the training or held-out set."""
        digits = jax.random.randint(key, (n, self.n_free), 0, 10, dtype=jnp.int32)
        return self.encode(project_to_split(digits, split))

    def target(self, prompts: jax.Array, response_len: int) -> jax.Array:
        """The correct response [n, response_len]: answer, `<eos>`, then `<pad>`."""
        answers = self.solve(prompts)
        n = prompts.shape[0]
        pad = jnp.full((n, response_len - self.answer_len - 1), PAD, jnp.int32)
        eos = jnp.full((n, 1), EOS, jnp.int32)
        return jnp.concatenate([answers.astype(jnp.int32), eos, pad], axis=1)

    def position_correct(self, prompts: jax.Array, responses: jax.Array) -> jax.Array:
        """Per checked position (answer tokens and `<eos>`): correct or not, [n, answer_len+1]."""
        k = self.answer_len + 1
        return responses[:, :k] == self.target(prompts, responses.shape[1])[:, :k]

    def verify(self, prompts: jax.Array, responses: jax.Array) -> jax.Array:
        """Exactly correct responses [n] (bool): the answer followed by `<eos>`."""
        return self.position_correct(prompts, responses).all(-1)

    def reward(self, prompts: jax.Array, responses: jax.Array, partial_credit: bool) -> jax.Array:
        """Binary reward, or with `partial_credit` the fraction of checked positions right."""
        correct = self.position_correct(prompts, responses)
        if partial_credit:  # XLA divides by k as a multiply by 1/k: all right is 1 - 6e-8 at some k
            return jnp.where(correct.all(-1), 1.0, correct.mean(-1)).astype(jnp.float32)
        return correct.all(-1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
@TASKS.register("reverse")
class Reverse(Task):
    """`d1 .. dn =` -> `dn .. d1`."""

    name: ClassVar[str] = "reverse"
    n_free = property(lambda self: self.n_digits)
    answer_len = property(lambda self: self.n_digits)

    def encode(self, digits):
        return _then_eq(digits)

    def solve(self, prompts):
        return prompts[:, : self.n_digits][:, ::-1]


@dataclasses.dataclass(frozen=True)
@TASKS.register("sort")
class Sort(Reverse):
    """`d1 .. dn =` -> the digits in ascending order (Reverse's prompts, another answer)."""

    name: ClassVar[str] = "sort"

    def solve(self, prompts):
        return jnp.sort(prompts[:, : self.n_digits], axis=1)


@dataclasses.dataclass(frozen=True)
@TASKS.register("cumsum")
class CumSum(Reverse):
    """`d1 .. dn =` -> running sums mod 10: (d1) (d1+d2) ... (d1+..+dn), one digit each.
    A long-response task whose every answer token depends on the previous one: an error
    early in the response carries into the rest unless the model recomputes from the prompt."""

    name: ClassVar[str] = "cumsum"

    def solve(self, prompts):
        return jnp.cumsum(prompts[:, : self.n_digits], axis=1) % 10


@dataclasses.dataclass(frozen=True)
@TASKS.register("add")
class Add(Task):
    """`a + b =` with n-digit operands (most significant first) -> a+b, n+1 digits,
    least significant first (as in minGPT's adder: the carry flows left to right)."""

    name: ClassVar[str] = "add"
    n_free = property(lambda self: 2 * self.n_digits)
    answer_len = property(lambda self: self.n_digits + 1)

    def validate(self):
        super().validate()
        if self.n_digits > 8:
            raise ValueError(f"task.n_digits must be in [1, 8] for add (int32 sums), got {self.n_digits}")

    def encode(self, digits):
        n = self.n_digits
        plus = jnp.full((digits.shape[0], 1), PLUS, jnp.int32)
        eq = jnp.full((digits.shape[0], 1), EQ, jnp.int32)
        return jnp.concatenate([digits[:, :n], plus, digits[:, n:], eq], 1)

    def solve(self, prompts):
        n = self.n_digits
        total = _value_of(prompts[:, :n]) + _value_of(prompts[:, n + 1 : 2 * n + 1])
        return _digits_of(total, n + 1)[:, ::-1]


@dataclasses.dataclass(frozen=True)
@TASKS.register("modmul")
class ModMul(Task):
    """`a * b =` with n-digit operands -> (a*b) mod `modulus`, zero-padded to the digits of
    modulus-1 (most significant first)."""

    modulus: int = 97
    name: ClassVar[str] = "modmul"
    n_free = property(lambda self: 2 * self.n_digits)
    answer_len = property(lambda self: len(str(self.modulus - 1)))

    def validate(self):
        super().validate()
        if self.n_digits > 4:
            raise ValueError(f"task.n_digits must be in [1, 4] for modmul, got {self.n_digits}")
        if not 2 <= self.modulus <= 10_000:
            raise ValueError(f"task.modulus must be in [2, 10000], got {self.modulus}")

    def encode(self, digits):
        n = self.n_digits
        times = jnp.full((digits.shape[0], 1), TIMES, jnp.int32)
        eq = jnp.full((digits.shape[0], 1), EQ, jnp.int32)
        return jnp.concatenate([digits[:, :n], times, digits[:, n:], eq], 1)

    def solve(self, prompts):
        n = self.n_digits
        a = _value_of(prompts[:, :n]) % self.modulus
        b = _value_of(prompts[:, n + 1 : 2 * n + 1]) % self.modulus
        return _digits_of((a * b) % self.modulus, self.answer_len)


@dataclasses.dataclass(frozen=True)
@TASKS.register("count")
class Count(Task):
    """`d1 .. dn ? q =` -> how many of d1..dn equal q, zero-padded to the digits of n."""

    name: ClassVar[str] = "count"
    n_free = property(lambda self: self.n_digits + 1)
    answer_len = property(lambda self: len(str(self.n_digits)))

    def encode(self, digits):
        n = self.n_digits
        query = jnp.full((digits.shape[0], 1), QUERY, jnp.int32)
        eq = jnp.full((digits.shape[0], 1), EQ, jnp.int32)
        return jnp.concatenate([digits[:, :n], query, digits[:, n:], eq], 1)

    def solve(self, prompts):
        n = self.n_digits
        count = (prompts[:, :n] == prompts[:, n + 1 : n + 2]).sum(-1)
        return _digits_of(count, self.answer_len)


@dataclasses.dataclass(frozen=True)
@TASKS.register("recurrence")
class Recurrence(Task):
    """`s1 s2 s3 s4 =` -> x_1 .. x_n with x_t = (x_{t-4} + x_{t-3}) mod 10, the seed digits
    being x_{-3} .. x_0. A short fixed prompt and a response as long as `n_digits`: every
    answer token is the same one-step rule on two tokens at fixed distances, so lengthening the
    response adds tokens of constant difficulty and changes nothing else (the length-controlled
    task; reverse/sort/cumsum lengthen the prompt with the response)."""

    SEED: ClassVar[int] = 4
    name: ClassVar[str] = "recurrence"
    n_free = property(lambda self: self.SEED)
    answer_len = property(lambda self: self.n_digits)

    def encode(self, digits):
        return _then_eq(digits)

    def solve(self, prompts):
        def next_digit(window, _):
            new = (window[:, 0] + window[:, 1]) % 10
            return jnp.concatenate([window[:, 1:], new[:, None]], 1), new

        _, digits_TN = jax.lax.scan(next_digit, prompts[:, : self.SEED], None, length=self.n_digits)
        return digits_TN.T


def make_task(name: str, **params) -> Task:
    """Build and validate a registered task (unknown names raise ValueError). Parameters a task
    does not have are ignored, so one `TaskConfig` serves every task (`modulus` is modmul's)."""
    cls = TASKS[name]
    accepted = {f.name for f in dataclasses.fields(cls)}
    task = cls(**{k: v for k, v in params.items() if k in accepted})
    task.validate()
    return task


def eval_prompts(task: Task, n: int) -> jax.Array:
    """The fixed held-out prompts every run, cell and seed is evaluated on."""
    return task.sample(jax.random.key(EVAL_KEY_SEED), n, split="eval")


def detokenize(tokens) -> str:
    """Human-readable string of a token row (for logs and docs)."""
    return " ".join(VOCAB[int(t)] for t in tokens)
