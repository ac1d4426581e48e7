"""`timsim report DIR`: one self-contained HTML page for a results directory, to read or send
as a single file: the summary table, learning curves with seeds and CIs, the per-step
mismatch, paired differences against a reference cell and, when one numeric value was
swept, the dose-response; then the provenance and the command that regenerates the results.
Figures are inline PNGs, so the page needs no other file."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from timsim import plots
from timsim.store import load
from timsim.summary import SUMMARY_METRICS, by_cell, format_ci, paired_table

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}code,pre{background:#f6f6f6}
pre{padding:8px;overflow-x:auto;font-size:12px}"""


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def summary_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """Per cell: n and each summary metric as 'mean ± 95% CI' over seeds."""
    cells = by_cell(summary)
    out = pd.DataFrame({"cell": cells.cell_id, "n": cells.n})
    for m in SUMMARY_METRICS:
        out[m] = [format_ci(a, b) for a, b in zip(cells[m], cells[f"{m}_ci95"])]
    return out


def _reference(summary: pd.DataFrame, against: str | None) -> str | None:
    cells = list(summary.cell_id.unique())
    if against is not None:
        return against
    return "zero" if "zero" in cells else (cells[0] if len(cells) > 1 else None)


def _swept_numeric(metrics: pd.DataFrame, reference: str) -> str | None:
    """The swept numeric value (`cfg.<key>`) that every cell but the reference sets, if exactly
    one does (the quickstart sets the zero twin's scale and the others' KL target)."""
    others = metrics[metrics.cell_id != reference].groupby("cell_id").first()
    swept = [c for c in others.columns if c.startswith("cfg.") and pd.api.types.is_numeric_dtype(others[c])
             and others[c].notna().all()]
    return swept[0] if len(swept) == 1 else None


def write_report(path: str | Path, out: str | Path | None = None, against: str | None = None) -> Path:
    """Write the report of the results directory `path` to `out` (default `path/report.html`).
    `against`: the reference cell of the paired differences (default `zero` when present)."""
    root = Path(path)
    metrics, summary = load(root)
    if summary.empty:
        raise FileNotFoundError(f"{str(root)!r} has no finished runs yet (summary.parquet is empty or missing).")
    manifest = json.loads((root / "manifest.json").read_text())
    name = manifest.get("sweep", {}).get("name", root.name)
    parts = [f"<h1>timsim results: {html.escape(name)}</h1>",
             f"<p>{summary.cell_id.nunique()} cells, {len(summary)} runs, {int(metrics.step.max())} steps. "
             "Accuracy is held-out greedy accuracy; ± is a 95% Student-t interval over seeds.</p>",
             "<h2>Summary per cell</h2>", summary_frame(summary).to_html(index=False, escape=True)]
    parts += ["<h2>Learning curves</h2>", _png(plots.learning_curves(metrics))]
    if "kl_sampler_learner" in metrics and metrics.kl_sampler_learner.gt(0).any():
        fig = plots.curves(metrics[metrics.step > 0], "kl_sampler_learner", smooth=10, runs=False)
        fig.axes[0].set_yscale("log")
        parts += ["<h2>Mismatch during training</h2>", _png(fig)]
    reference = _reference(summary, against)
    if reference is not None:
        table = paired_table(metrics, summary, [reference], 0.95)
        parts += [f"<h2>Paired by seed against {html.escape(reference)!s}</h2>", _png(plots.paired(table, reference)),
                  table.round(4).to_html(index=False, escape=True)]
        swept = _swept_numeric(metrics, reference)
        if swept is not None:
            levels = metrics.groupby("cell_id")[swept].first()
            dose = table.assign(level=table.cell.map(levels)).dropna(subset=["level"])
            dose = dose[(dose.cell != reference) & (dose.level > 0)]
            if len(dose) > 1:
                fig = plots.dose_response(dose, "level", f"minus_{reference}", f"minus_{reference}_ci", xlabel=swept,
                                          ylabel=f"final accuracy minus {reference!r}")
                parts += ["<h2>Dose-response</h2>", _png(fig)]
    exported = manifest.get("export", {})
    parts += ["<h2>Provenance</h2>", f"<pre>{html.escape(json.dumps(manifest.get('provenance', {}), indent=1))}</pre>"]
    if exported.get("command"):
        parts.append(f"<p>Regenerate with <code>{html.escape(exported['command'])}</code>.</p>")
    target = Path(out) if out is not None else root / "report.html"
    target.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title>"
                      f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    return target
