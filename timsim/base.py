"""The base policy: supervised warm start on (prompt, answer) pairs, saved and reused.

Real LLM RL starts from a pretrained model; so does timsim. `get_base` returns the base
weights for a config, pretraining them first if no checkpoint exists under the config's
base key (a hash of task, model, pretraining settings and seed only, DESIGN §8.3). Every
run of a study therefore starts from the same weights. Creation is guarded by a file lock
so that parallel runs do not race.

The key leaves out the code and the library versions, so a base outlives an upgrade: its
weights stay valid, but a fresh pretraining by the new code could differ in the last bits,
and RL amplifies last bits into another trajectory. Each base therefore records what
pretrained it, runs record that beside their own provenance, and loading a base that other
code pretrained says so (`provenance_note`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx

from timsim.config import Config
from timsim.model import init_model, response_forward, token_logprobs
from timsim.rollout import sample
from timsim.store import provenance
from timsim.tasks import VOCAB_SIZE, Task, eval_prompts


class CheckpointError(RuntimeError):
    """A base checkpoint is missing, corrupt, or of another shape."""


def base_key(cfg: Config) -> str:
    """Name of the base checkpoint: task name and a hash of what determines the weights."""
    ident = {"task": cfg.task.model_dump(exclude={"partial_credit", "eval_prompts"}),
             # MoE fields only when used: dense bases keep the keys they had before MoE existed
             "model": cfg.model.model_dump(exclude=set() if cfg.model.experts else
                                           {"experts", "expert_top_k", "balance_coef"}),
             # stop_on only when not the default: greedy-stopped bases keep the keys they had before it
             "pretrain": cfg.pretrain.model_dump(exclude={"cache_dir"} | ({"stop_on"} if cfg.pretrain.stop_on == "greedy"
                                                                         else set()))}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg.task.name}-{digest}"


def base_path(cfg: Config) -> Path:
    return Path(cfg.pretrain.cache_dir) / base_key(cfg)


def _abstract_params(cfg: Config):
    model = nnx.eval_shape(lambda: init_model(cfg.model, VOCAB_SIZE, 0))
    return nnx.split(model, nnx.Param)


def make_pretrain_chunk(cfg: Config, task: Task, graphdef, length: int) -> Callable:
    """`length` supervised AdamW steps (cross-entropy on answer + <eos>) as one jitted scan."""
    p = cfg.pretrain
    tx = optax.adamw(p.lr)
    response_len = cfg.response_len

    def loss_fn(params, prompts):
        targets = task.target(prompts, response_len)
        logits, _, balance = response_forward(nnx.merge(graphdef, params), prompts, targets)
        logp, _ = token_logprobs(logits, targets, 1.0)
        checked = (jnp.arange(response_len) <= task.answer_len)[None, :]
        loss = -(logp * checked).sum() / (checked.sum() * prompts.shape[0])
        return loss + cfg.model.balance_coef * balance if cfg.model.experts else loss

    def step(carry, i):
        params, opt_state, key = carry
        prompts = task.sample(jax.random.fold_in(key, i), p.batch_size, "train")
        loss, grads = jax.value_and_grad(loss_fn)(params, prompts)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), loss

    @jax.jit
    def chunk(params, opt_state, key, start):
        (params, opt_state, _), losses = jax.lax.scan(step, (params, opt_state, key), start + jnp.arange(length))
        return params, opt_state, losses.mean()

    return chunk, tx


def make_accuracy(cfg: Config, task: Task, graphdef) -> Callable:
    """`accuracy(params) -> (greedy, sampled)` held-out exact-match accuracy (sampled at T = 1)."""
    prompts = eval_prompts(task, cfg.task.eval_prompts)

    @jax.jit
    def accuracy(params):
        model = nnx.merge(graphdef, params)
        key = jax.random.key(0)
        greedy = sample(model, prompts, key, 1.0, cfg.response_len, greedy=True)
        sampled = sample(model, prompts, key, 1.0, cfg.response_len)
        return task.verify(prompts, greedy.responses).mean(), task.verify(prompts, sampled.responses).mean()

    return accuracy


def pretrain(cfg: Config, progress: Callable[[dict], None] = lambda info: None) -> tuple[nnx.State, dict]:
    """Supervised warm start until the held-out accuracy named by `pretrain.stop_on` (greedy or
    sampled) reaches `pretrain.target_accuracy` (checked every `pretrain.eval_every` steps) or
    `pretrain.max_steps`."""
    p = cfg.pretrain
    task = cfg.task.build()
    graphdef, params = nnx.split(init_model(cfg.model, VOCAB_SIZE, p.seed), nnx.Param)
    chunk, tx = make_pretrain_chunk(cfg, task, graphdef, p.eval_every)
    accuracy = make_accuracy(cfg, task, graphdef)
    # committed, like the programs' own outputs, so each program compiles once (`train.place`)
    params, opt_state = jax.device_put((params, tx.init(params)), jax.devices()[0])
    key = jax.random.key(p.seed)
    steps, loss, start = 0, float("nan"), time.perf_counter()
    greedy, sampled = (float(a) for a in accuracy(params))
    reached = lambda: (greedy if p.stop_on == "greedy" else sampled) >= p.target_accuracy  # noqa: E731
    while not reached() and steps < p.max_steps:
        params, opt_state, loss = chunk(params, opt_state, key, steps)
        steps += p.eval_every
        greedy, sampled = (float(a) for a in accuracy(params))
        progress({"steps": steps, "loss": float(loss), "greedy_accuracy": greedy, "sampled_accuracy": sampled})
    info = {"base_key": base_key(cfg), "steps": steps, "final_loss": float(loss),
            "greedy_accuracy": greedy, "sampled_accuracy": sampled,
            "reached_target": reached(), "seconds": round(time.perf_counter() - start, 1),
            "pretrained_by": provenance(),
            "config": {"task": cfg.task.model_dump(), "model": cfg.model.model_dump(),
                       "pretrain": cfg.pretrain.model_dump()}}
    return params, info


WEIGHT_PROVENANCE = ("timsim", "git_commit", "jax", "jaxlib", "backend")  # what changes a pretraining's bits


def provenance_note(info: dict, path: Path) -> str | None:
    """One line when the base at `path` was pretrained by other code or libraries than this
    process runs (None when they match): its results are then not bit-identical to those on a
    base pretrained here."""
    then, now = info.get("pretrained_by"), provenance()
    if then is None:
        what = "a timsim release that recorded no provenance"
    else:
        changed = [f"{field} {then.get(field)} (now {now[field]})" for field in WEIGHT_PROVENANCE
                   if then.get(field) is not None and now[field] is not None and then.get(field) != now[field]]
        if not changed:
            return None
        what = ", ".join(changed)
    return (f"note: base {path.name} was pretrained by {what}. Its weights are reused as they are, so results may "
            f"not be bit-identical to those on a base pretrained by this code; delete {path} to pretrain it afresh.")


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def save_base(path: Path, params: nnx.State, info: dict) -> None:
    """Write the checkpoint to a temporary sibling, then rename: a base is complete or absent."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp / "params").absolute(), nnx.to_pure_dict(params))
    checkpointer.wait_until_finished()
    (tmp / "base.json").write_text(json.dumps(info, indent=2))
    tmp.rename(path)


def restore_target(tree):
    """Shapes, dtypes and *this machine's* placement for an orbax restore: without a sharding
    orbax reuses the one saved in the checkpoint, which names the devices of the machine that
    wrote it (a CPU checkpoint then fails to restore on a GPU). Arrays keep their sharding."""
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or here),
                        tree)


def load_base(cfg: Config, path: Path | None = None) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """Restore base weights for `cfg` from `path` (default: its base key under the cache dir)."""
    path = Path(path) if path is not None else base_path(cfg)
    info_file = path / "base.json"
    if not info_file.is_file() or not (path / "params").is_dir():
        raise CheckpointError(f"No base checkpoint at {str(path)!r} (expected base.json and params/). "
                              f"Run `timsim pretrain CONFIG` to create it.")
    try:
        info = json.loads(info_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"Base checkpoint {str(path)!r} is corrupt: base.json is not JSON ({err}). "
                              f"Delete the directory and run `timsim pretrain CONFIG` again.") from None
    graphdef, abstract = _abstract_params(cfg)
    target = restore_target(nnx.to_pure_dict(abstract))
    try:
        restored = ocp.StandardCheckpointer().restore((path / "params").absolute(), target)
    except Exception as err:  # orbax raises many types; all mean "not this model"
        stored = info.get("config", {}).get("model")
        raise CheckpointError(
            f"Base checkpoint {str(path)!r} cannot be restored for model {cfg.model.model_dump()} "
            f"(the checkpoint was saved for model {stored}): {str(err).splitlines()[0][:300]}") from None
    nnx.replace_by_pure_dict(abstract, restored)
    return graphdef, abstract, info


def get_base(cfg: Config, progress: Callable[[dict], None] = lambda info: None,
             announce: Callable[[str], None] = print) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """The base weights for `cfg`: restored if they exist, pretrained and saved otherwise."""
    path = base_path(cfg)
    with _locked(path):
        if not path.exists():
            announce(f"Pretraining the base policy {path.name} (first use; reused afterwards) ...")
            params, info = pretrain(cfg, progress)
            save_base(path, params, info)
            if not info["reached_target"]:
                stop_on = cfg.pretrain.stop_on
                announce(f"warning: pretraining stopped at pretrain.max_steps={cfg.pretrain.max_steps} with {stop_on} "
                         f"accuracy {info[stop_on + '_accuracy']:.2f} < pretrain.target_accuracy "
                         f"{cfg.pretrain.target_accuracy}")
        graphdef, params, info = load_base(cfg, path)
    note = provenance_note(info, path)
    if note:
        announce(note)
    return graphdef, params, info
