"""The one-way architecture: each module imports only modules of its own or a lower layer, with
no circle, and no timsim import hidden inside a function (the CLI alone imports lazily, to
start fast). Importing timsim changes no global JAX or XLA setting."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import timsim

PACKAGE = Path(timsim.__file__).parent

# Bottom to top: data flows tasks -> model/numerics -> sampler -> learner -> runs -> store-backed
# runs -> executors -> experiments -> API -> CLI. A new module must be placed here on purpose.
LAYERS = [
    {"registry", "config_types", "keys", "faults", "numerics", "determinism", "kl", "metrics", "theory"},
    {"tasks", "grpo", "corrections", "noise", "sources", "diagnostics", "summary", "plots", "store", "presets"},
    {"config_mismatch", "config", "hyper", "catalogue"},
    {"model", "rollout"},
    {"sampler"},
    {"collect"},
    {"step", "probes", "calibration", "base", "exact"},
    {"plan", "loop"},
    {"runner"},
    {"executors"},
    {"sweep_spec", "finder", "study", "profile", "bench", "bench_torch", "predictions", "report_html"},
    {"api", "report"},
    {"cli", "__init__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
LAZY_ALLOWED = {"cli"}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(timsim module imported, whether the import sits inside a function) for one file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "timsim":
                parts = child.module.split(".")
                names = [parts[1]] if len(parts) > 1 else [a.name for a in child.names]
                found.extend((n, nested) for n in names)
            elif isinstance(child, ast.Import):
                found.extend((a.name.split(".")[1], nested) for a in child.names
                             if a.name.startswith("timsim."))
            visit(child, nested)

    visit(tree, False)
    return found


def _graph() -> dict[str, set[str]]:
    return {p.stem: {m for m, _ in _imports(p)} for p in PACKAGE.glob("*.py")}


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules - set(LAYER) == set(), "place the new module(s) in LAYERS"
    assert set(LAYER) - modules == set(), "LAYERS names module(s) that no longer exist"


def test_no_module_imports_a_higher_layer():
    upward = [f"{p.stem} (layer {LAYER[p.stem]}) imports {m} (layer {LAYER[m]})"
              for p in PACKAGE.glob("*.py") for m, _ in _imports(p) if LAYER[m] > LAYER[p.stem]]
    assert upward == []


def test_no_timsim_import_inside_a_function():
    hidden = [f"{p.stem} imports {m} inside a function" for p in PACKAGE.glob("*.py")
              if p.stem not in LAZY_ALLOWED for m, nested in _imports(p) if nested]
    assert hidden == []


def test_the_import_graph_has_no_circle():
    graph, state, circles = _graph(), {}, []

    def walk(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert circles == []


def test_the_checker_sees_upward_and_hidden_imports(tmp_path):
    """The AST walk finds both kinds of import it must forbid (so the checks above can fail)."""
    probe = tmp_path / "probe.py"
    probe.write_text("from timsim.api import train\n\ndef f():\n    from timsim import loop\n    import timsim.cli\n")
    assert _imports(probe) == [("api", False), ("loop", True), ("cli", True)]


def test_timsim_never_touches_the_matplotlib_backend(tmp_path):
    """Plots are drawn without pyplot, so a notebook's backend (inline plots) survives timsim."""
    code = (f"import sys, pandas as pd, timsim\n"
            f"from timsim.plots import plot_curves\n"
            f"frame = pd.DataFrame({{'cell_id': 'c', 'run_idx': 0, 'step': [0, 1], 'eval_greedy_accuracy': [0.1, 0.2],"
            f" 'reward_mean': [0.3, 0.4]}})\n"
            f"plot_curves(frame, {str(tmp_path / 'c.png')!r})\n"
            f"print('matplotlib.pyplot' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False" and (tmp_path / "c.png").stat().st_size > 5_000


def test_importing_timsim_changes_no_global_setting_and_setup_does(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    code = ("import os, jax, timsim\n"
            "from jax._src import xla_bridge\n"
            "before = (os.environ.get('XLA_FLAGS'), jax.config.jax_default_matmul_precision,\n"
            "          jax.config.jax_compilation_cache_dir, xla_bridge.backends_are_initialized())\n"
            "timsim.setup()\n"
            "print(before, timsim.determinism.in_force(), jax.config.jax_compilation_cache_dir)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env | {"XDG_CACHE_HOME": str(tmp_path)},
                         capture_output=True, text=True, check=True)
    # no backend started either: on a GPU, setup() must still be able to set the determinism flag;
    # compiled programs persist in the user's cache unless a cache directory was chosen
    assert out.stdout.strip() == f"(None, None, None, False) True {tmp_path / 'timsim' / 'xla'}"
    chosen = subprocess.run([sys.executable, "-c", code], env=env | {"JAX_COMPILATION_CACHE_DIR": str(tmp_path)},
                            capture_output=True, text=True, check=True)
    assert chosen.stdout.strip().endswith(f"True {tmp_path}")


def test_a_new_noise_or_weight_noise_family_is_one_function_and_one_registration():
    """Registered from outside the package, in a fresh process (the registry is global): the
    config accepts it, calibration may tune it, and a knob it does not read is refused."""
    code = '''
import jax, timsim
from timsim.noise import LOGIT_NOISE

@LOGIT_NOISE.register(knobs=("scale",), scaled=True)
def laplace(key, logits, knobs):
    return logits + knobs.scale * jax.random.laplace(key, logits.shape)

cfg = timsim.load_config(None, ["perturbation.logit_noise.family=laplace", "perturbation.target.token_kl=0.01"])
assert cfg.perturbation.scaled_source == "laplace logit noise"
try:
    timsim.load_config(None, ["perturbation.logit_noise.family=laplace", "perturbation.logit_noise.nu=4"])
except timsim.ConfigError as err:
    assert "perturbation.logit_noise.nu" in str(err), err

from timsim.sampler import sampler_spec
from timsim.sources import WEIGHT_NOISE

@WEIGHT_NOISE.register(knobs=("scale",))
def shrink(key, params, knobs):
    return jax.tree.map(lambda x: x * (1 - knobs.scale), params)

cfg = timsim.load_config(None, ["perturbation.weight_noise.family=shrink", "perturbation.weight_noise.scale=0.1"])
assert cfg.perturbation.active_sources == ("weight_noise",) and sampler_spec(cfg).weight_noise_fn is shrink
print("ok")
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_docs_catalogue_is_read_from_the_registries():
    from timsim.catalogue import block

    assert block() in (PACKAGE.parent / "docs" / "catalogue.md").read_text(), \
        "docs/catalogue.md is out of date: run `python -m timsim.catalogue docs/catalogue.md`"
