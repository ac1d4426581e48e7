"""Every notebook runs from top to bottom with a real Jupyter kernel at toy size
(TIMSIM_NOTEBOOK_TOY=1), through the same script as `make notebooks`."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def test_the_notebooks_are_there():
    assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_at_toy_size(notebook):
    pytest.importorskip("nbclient", reason="the notebooks extra (pip install -e '.[notebooks]')")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebooks.py"), "--toy", str(notebook)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert notebook.with_suffix(".ipynb").exists()
