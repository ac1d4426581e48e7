"""End-of-run reporting: the terminal summary table and the curves plot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from timsim.config import Config
from timsim.plots import plot_curves
from timsim.runner import Cell, run_cells
from timsim.store import Store, load

SUMMARY_COLUMNS = {"base_accuracy": "base acc", "final_accuracy": "final acc", "peak_accuracy": "peak acc",
                   "peak_step": "peak step", "final_reward": "final reward", "mean_mismatch_k3": "mean k3"}


def print_summary(summary: pd.DataFrame, console: Console) -> None:
    """One line per run, grouped by cell."""
    if summary.empty:
        console.print("no finished runs yet")
        return
    table = Table(title="runs (held-out accuracy is greedy, on prompts disjoint from training)")
    table.add_column("cell", overflow="fold")
    table.add_column("seed", justify="right")
    for header in SUMMARY_COLUMNS.values():
        table.add_column(header, justify="right")
    for _, row in summary.iterrows():
        table.add_row(str(row.cell_id), str(row.seed), *(
            f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in SUMMARY_COLUMNS))
    console.print(table)


def train(cfg: Config, console: Console, overwrite: bool = False) -> Path:
    """`timsim train`: one cell (the config's seeds) into out_dir/name, then table and plot."""
    root = Path(cfg.run.out_dir) / cfg.run.name
    if (root / "manifest.json").exists():
        if not overwrite:
            raise FileExistsError(f"Results directory {str(root)!r} already exists; choose another run.name "
                                  f"or pass --overwrite to replace it.")
        shutil.rmtree(root)
    store = Store(root)
    summary = run_cells([Cell(cfg.run.name, cfg)], store, console)
    metrics, _ = load(root)
    png = plot_curves(metrics, root / "curves.png")
    print_summary(summary, console)
    console.print(f"results: {root}/ (metrics/*.parquet, summary.parquet, manifest.json); plot: {png}")
    return root
