"""Execute notebooks with a real Jupyter kernel, as a reader would: each `notebooks/*.py`
(a jupytext percent script, the source of truth) becomes the executed, paired
`notebooks/*.ipynb` beside it (git-ignored), with the kernel started in `notebooks/`.

    python scripts/run_notebooks.py [--toy] [notebooks/NAME.py ...]   # default: every notebook

`--toy` sets TIMSIM_NOTEBOOK_TOY=1, which shrinks the runs a notebook makes itself to a
seconds-long model (what CI runs); data read from the repository are the same either way.
Exits non-zero on the first error, naming the notebook and the failing cell.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(source: Path, timeout: int) -> Path:
    notebook = jupytext.read(source)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(source.parent)}})
    client.execute()
    target = source.with_suffix(".ipynb")
    nbformat.write(notebook, target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--toy", action="store_true", help="TIMSIM_NOTEBOOK_TOY=1: toy-size runs (CI)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args()
    if args.toy:
        os.environ["TIMSIM_NOTEBOOK_TOY"] = "1"
    sources = args.notebooks or sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
    for source in sources:
        start = time.perf_counter()
        try:
            target = execute(source.resolve(), args.timeout)
        except CellExecutionError as err:
            print(f"{source}: a cell failed\n{err}", file=sys.stderr)
            return 1
        print(f"{source} -> {target.name} ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
