"""`timsim bench`: time the GRPO step at the standard shape, side by side with PyTorch.

Standard shape (DESIGN §8.8): 32 prompts x 8 samples x 16 response tokens, vocabulary 16,
d_model 64, 2 layers, 4 heads, MLP 256 — the reverse task with 15 digits (15 answer tokens +
<eos>). Weights are freshly initialised: step cost does not depend on them (shapes are fixed).

The comparison with the hand-written PyTorch step (`timsim/bench_torch.py`) alternates the two
in one invocation, A B A B: each round times a chunk of timsim steps, then as many PyTorch
steps in a waiting subprocess, so both see the same machine at nearly the same moment and the
per-round ratio cancels the drift of a shared machine. The ratio's median and range over the
rounds are the result; absolute times are quoted only beside it.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from rich.console import Console
from rich.table import Table

from timsim.base import base_path
from timsim.config import ConfigError, load_config, static_view
from timsim.model import init_model
from timsim.plan import Cell, stack_hyperparams
from timsim.rollout import sample
from timsim.step import init_states, make_chunk, place
from timsim.sweep_spec import load_plan
from timsim.tasks import VOCAB_SIZE, make_task

STANDARD = ["task.name=reverse", "task.n_digits=15", "model.max_len=32", "grpo.prompts_per_step=32",
            "grpo.group_size=8", "run.chunk_steps=10", "run.steps=10"]
REFERENCE = Path(__file__).with_name("bench_torch.py")


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


class ChunkTimer:
    """One compiled chunk program at a given shape, ready to be timed again and again."""

    def __init__(self, overrides: list[str], runs: int = 1, batching: str = "map"):
        cfg = load_config(None, [*overrides, f"run.seeds={list(range(runs))}", f"run.batching={batching}"])
        self.cfg, self.runs = cfg, runs
        graphdef, params = nnx.split(init_model(cfg.model, VOCAB_SIZE, 0), nnx.Param)
        hp, _ = stack_hyperparams([Cell("bench", cfg)])
        self.hp, self.params = place(hp, over_runs=True), place(params, over_runs=False)
        self.state = place(init_states(params, hp, cfg.perturbation.lag_steps), over_runs=True)
        self.chunk = make_chunk(static_view(cfg), cfg.task.build(), graphdef)
        _, self.first_call_s = self.time_chunk()

    @property
    def steps(self) -> int:
        return self.cfg.run.chunk_steps

    def time_chunk(self) -> tuple[dict, float]:
        """(metrics, seconds) of one chunk: `steps` steps of every run."""
        (self.state, metrics), seconds = _timed(self.chunk, self.state, self.hp, self.params)
        return metrics, seconds


def time_chunk(overrides: list[str], runs: int, batching: str, repeats: int = 2) -> dict:
    """Compile time and steady-state seconds per run-step of one chunk program."""
    timer = ChunkTimer(overrides, runs, batching)
    times, metrics = [], None
    for _ in range(repeats):
        metrics, seconds = timer.time_chunk()
        times.append(seconds)
    cfg = timer.cfg
    return {"compile_s": timer.first_call_s - min(times), "step_s": min(times) / (timer.steps * runs),
            "tokens": float(np.mean(metrics["response_len"])) * cfg.grpo.prompts_per_step * cfg.grpo.group_size}


def time_sampler(overrides: list[str], repeats: int = 3) -> float:
    cfg = load_config(None, overrides)
    model = init_model(cfg.model, VOCAB_SIZE, 0)
    graphdef, params = nnx.split(model, nnx.Param)
    prompts = cfg.task.build().sample(jax.random.key(0), cfg.grpo.prompts_per_step * cfg.grpo.group_size)
    fn = jax.jit(lambda p, k: sample(nnx.merge(graphdef, p), prompts, k, 1.0, cfg.response_len))
    _timed(fn, params, jax.random.key(0))
    return min(_timed(fn, params, jax.random.key(i))[1] for i in range(repeats))


class ReferenceUnavailable(RuntimeError):
    """The PyTorch reference could not be started or stopped answering."""


class TorchReference:
    """The PyTorch step in a subprocess that waits between rounds (it uses no CPU then)."""

    def __init__(self, python: str, threads: int):
        # -P: the script's folder (timsim/, whose profile.py shadows the standard library's) is
        # not put on the path
        command = [python, "-P", str(REFERENCE), "--threads", str(threads)]
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)
        except OSError as err:
            raise ReferenceUnavailable(
                f"--reference-python {python!r} cannot be started ({err.strerror or err}). Give an interpreter "
                "that has torch (pip install -e '.[bench]'), or leave the option out to time timsim alone."
            ) from None
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=60)
            raise ReferenceUnavailable(
                f"the PyTorch reference ({self.process.args[0]}) stopped before answering, exit code "
                f"{self.process.returncode}: {self.process.stderr.read().strip()[-1500:]}")
        return json.loads(line)

    def steps(self, n: int) -> list[float]:
        self.process.stdin.write(f"steps {n}\n")
        self.process.stdin.flush()
        return self._reply()["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def reference_python(requested: str | None) -> str | None:
    """The interpreter that runs the PyTorch reference: the one given, else this one if it has
    torch (the `bench` extra), else None."""
    if requested:
        return requested
    import importlib.util

    return sys.executable if importlib.util.find_spec("torch") else None


def paired_rounds(timer: ChunkTimer, reference: TorchReference, rounds: int, on_round=None) -> dict:
    """A B A B: per round, timsim's mean step over one chunk and PyTorch's mean over as many steps."""
    timsim_s, torch_s = [], []
    for i in range(rounds):
        _, seconds = timer.time_chunk()
        timsim_s.append(seconds / timer.steps)
        torch_s.append(statistics.fmean(reference.steps(timer.steps)))
        if on_round:
            on_round(i, timsim_s[-1], torch_s[-1])
    ratios = [a / b for a, b in zip(timsim_s, torch_s)]
    return {"rounds": rounds, "steps_per_round": timer.steps, "timsim_step_s": timsim_s, "torch_step_s": torch_s,
            "ratio": ratios, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios)}


def _spread(values: list[float], scale: float = 1.0, fmt: str = "{:.0f}") -> str:
    return (f"{fmt.format(statistics.median(values) * scale)} "
            f"[{fmt.format(min(values) * scale)}–{fmt.format(max(values) * scale)}]")


def length_overrides(response_len: int) -> list[str]:
    """The short-prompt task (`recurrence`: a 5-token prompt, `task.n_digits` + 1 response
    tokens) at a response length, so that cost grows with the response alone; chunks of ~160
    response positions per run (at least 2 steps)."""
    prompt_len = make_task("recurrence", n_digits=1).prompt_len
    steps = max(2, 160 // response_len)
    return [*STANDARD, "task.name=recurrence", f"task.n_digits={response_len - 1}",
            f"model.max_len={prompt_len + response_len}", f"run.chunk_steps={steps}", f"run.steps={steps}"]


def length_scaling(short: int, long: int, rounds: int, on_round=None) -> dict:
    """The step at two response lengths of the short-prompt task, alternated A B A B in one
    process: the per-round ratio long / short cancels the machine's drift."""
    timers = {n: ChunkTimer(length_overrides(n)) for n in (short, long)}
    step_s: dict[int, list[float]] = {short: [], long: []}
    for i in range(rounds):
        for n, timer in timers.items():
            step_s[n].append(timer.time_chunk()[1] / timer.steps)
        if on_round:
            on_round(i, step_s[short][-1], step_s[long][-1])
    ratios = [b / a for a, b in zip(step_s[short], step_s[long])]
    return {"task": "recurrence", "response_lens": [short, long], "rounds": rounds,
            "short_step_s": step_s[short], "long_step_s": step_s[long], "ratio": ratios,
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "compile_s": {str(n): timer.first_call_s for n, timer in timers.items()}}


def bench_lengths(short: int, long: int, rounds: int, console: Console, quiet: bool = False) -> dict:
    """`timsim bench --lengths SHORT LONG`: the paired long / short step ratio, printed."""
    say = (lambda *a: None) if quiet else console.print  # noqa: E731
    say(f"the recurrence task (5-token prompt) at {short} and {long} response tokens, 32 prompts x 8 samples, "
        f"alternated: {rounds} rounds")
    results = length_scaling(short, long, rounds, on_round=lambda i, a, b: say(
        f"  round {i + 1}/{rounds}: {short} tokens {a * 1e3:.0f} ms, {long} tokens {b * 1e3:.0f} ms, ratio {b / a:.1f}"))
    table = Table(title="GRPO step by response length (one run): median \\[min–max] over rounds")
    for col in ["response tokens", "step (ms)", "first chunk with compile (s)"]:
        table.add_column(col, justify="right")
    table.add_row(str(short), _spread(results["short_step_s"], 1e3), f"{results['compile_s'][str(short)]:.1f}")
    table.add_row(str(long), _spread(results["long_step_s"], 1e3), f"{results['compile_s'][str(long)]:.1f}")
    table.add_row(f"{long} / {short}", _spread(results["ratio"], fmt="{:.1f}") + "x", "")
    say(table)
    return results


def bench(user_overrides: list[str], runs: int, console: Console, rounds: int = 7, reference: str | None = None,
          threads: int = 2, batchings: bool = True, quiet: bool = False) -> dict:
    """Time timsim's standard step (compile, step, sampler, tokens/s), alternate it with the
    PyTorch reference when torch is there, and compare run-axis batchings. `quiet`: print
    nothing (for `--json`)."""
    say = (lambda *a: None) if quiet else console.print  # noqa: E731
    overrides = STANDARD + list(user_overrides)
    cfg = load_config(None, overrides)
    n_tokens = cfg.grpo.prompts_per_step * cfg.grpo.group_size * cfg.response_len
    results: dict = {"backend": jax.default_backend(), "devices": jax.device_count(), "jax": jax.__version__,
                     "shape": {"prompts": cfg.grpo.prompts_per_step, "group": cfg.grpo.group_size,
                               "response_len": cfg.response_len, "d_model": cfg.model.d_model,
                               "n_layers": cfg.model.n_layers}}
    say(f"backend {jax.default_backend()}, {jax.device_count()} device(s), jax {jax.__version__}; shape "
        f"{cfg.grpo.prompts_per_step} prompts x {cfg.grpo.group_size} samples x {cfg.response_len} "
        f"response tokens, d_model {cfg.model.d_model}, {cfg.model.n_layers} layers")

    if reference and user_overrides:
        raise ReferenceUnavailable("the PyTorch reference runs the standard shape only: drop the key=value overrides "
                                   f"({' '.join(user_overrides)}) or --reference-python")
    python = reference_python(reference)
    if python and user_overrides:
        say("[yellow]PyTorch reference skipped: it runs the standard shape only, and overrides were given[/yellow]")
        python = None
    # the reference starts (and fails) first, and has warmed up before timsim compiles
    ref = TorchReference(python, threads) if python else None
    try:
        start = time.perf_counter()
        timer = ChunkTimer(overrides)
        results["build_and_first_chunk_s"] = time.perf_counter() - start
        steady = [timer.time_chunk()[1] for _ in range(2)]
        results["compile_s"] = timer.first_call_s - min(steady)
        if ref is None:
            if not user_overrides:
                say("[yellow]PyTorch reference skipped: torch is not installed (pip install -e '.[bench]', or "
                    "--reference-python PATH)[/yellow]")
            results["timsim_step_s"] = [timer.time_chunk()[1] / timer.steps for _ in range(rounds)]
        else:
            results["torch"] = ref.info
            say(f"alternating with the PyTorch reference (torch {ref.info['torch']}, {ref.info['threads']} "
                f"threads): {rounds} rounds of {timer.steps} steps each")
            paired = paired_rounds(timer, ref, rounds, on_round=lambda i, a, b: say(
                f"  round {i + 1}/{rounds}: timsim {a * 1e3:.0f} ms, PyTorch {b * 1e3:.0f} ms, ratio {a / b:.2f}"))
            results["paired"] = paired
            results["timsim_step_s"] = paired["timsim_step_s"]
    finally:
        if ref is not None:
            ref.close()

    sampler_s = time_sampler(overrides)
    results["sampler_s"] = sampler_s
    step_s = statistics.median(results["timsim_step_s"])
    results["step_s"] = step_s
    table = Table(title="GRPO step at the standard shape (one run): median \\[min–max] over rounds")
    for col in ["", "step (ms)", "compile (s)", "response token slots/s"]:
        table.add_column(col, justify="right")
    table.add_row("timsim", _spread(results["timsim_step_s"], 1e3), f"{results['compile_s']:.1f}",
                  f"{n_tokens / step_s:,.0f}")
    if "paired" in results:
        torch_s = results["paired"]["torch_step_s"]
        table.add_row("PyTorch reference", _spread(torch_s, 1e3), "–", f"{n_tokens / statistics.median(torch_s):,.0f}")
        table.add_row("timsim / PyTorch", _spread(results["paired"]["ratio"], fmt="{:.2f}"), "", "")
    say(table)
    say(f"timsim's sampler alone (prefill + {cfg.response_len} decode steps): {sampler_s * 1e3:.0f} ms")

    if batchings and runs > 1:
        batch_table = Table(title=f"{runs} runs on the run axis: ms per run-step")
        for col in ["batching", "ms per run-step", "compile (s)"]:
            batch_table.add_column(col, justify="right")
        for batching in ["map", "vmap"]:
            res = time_chunk(overrides, runs, batching)
            results[batching] = res
            batch_table.add_row(batching, f"{res['step_s'] * 1e3:.0f}", f"{res['compile_s']:.1f}")
        say(batch_table)
    results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    say(f"peak resident memory of this process: {results['peak_rss_gib']:.2f} GiB")
    return results


class StudyFailed(RuntimeError):
    """The timed study exited non-zero."""


def time_study(sweep_file: str) -> dict:
    """Wall time of `timsim sweep FILE` end to end, as a user waits for it: a fresh process, a
    temporary results directory and an empty compilation cache (every program compiles). The
    base model is pretrained only when `pretrain.cache_dir` does not hold it yet (`base_pretrained`
    says which)."""
    try:
        base_pretrained = not all(base_path(cell.cfg).exists() for cell in load_plan(sweep_file).cells)
    except ConfigError:
        base_pretrained = None  # the sweep itself reports what is wrong with the file
    with tempfile.TemporaryDirectory(prefix="timsim-study-") as tmp:
        env = os.environ | {"JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "xla")}
        command = [sys.executable, "-m", "timsim.cli", "sweep", sweep_file, "--out-dir", str(Path(tmp) / "runs")]
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall_s = time.perf_counter() - start
    if done.returncode:
        raise StudyFailed(f"timsim sweep {sweep_file} exited {done.returncode}: "
                          f"{(done.stdout + done.stderr).strip()[-1500:]}")
    return {"study": sweep_file, "wall_s": wall_s, "base_pretrained": base_pretrained}

