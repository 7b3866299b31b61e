"""bavq-report: compare training runs in one folder of tables and plots.

Input: run folders as the trainer writes them (``config.yaml``, ``metrics.jsonl``,
``final_metrics.json``, ``code_histogram.npy``, ``reconstructions.png``); only
``final_metrics.json`` is required. Runs are grouped by (variant, K), where the variant label is the
sweep file's variant name (``sweep.json``, written by bavq-sweep), ``--label`` config keys, or a name
from the quantizer config ("VQ-EMA + data init", "BA-VQ (λ=1) + restart", ...), and aggregated over
seeds as mean ± sample standard deviation. Output: ``index.md`` / ``index.html`` (the table and
every plot), ``table.md``, ``diagnostics.md``, ``summary.json`` (the aggregated numbers) and the PNG plots.

Modules: :mod:`bavq.report.collect` (run folders, labels, summary), :mod:`bavq.report.plot` (figures),
:mod:`bavq.report.render` (tables and the index page); ``notebooks/analyze.ipynb`` uses them directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

from bavq.diagnostics import diagnostics_rows
from bavq.report.collect import ReportError, load_runs_and_notes, summarize
from bavq.report.plot import write_plots
from bavq.report.render import markdown_table, table_rows, write_index


def write_report(paths: list[str], out: str | Path, title: str = "bavq report",
                 label_keys: list[str] | None = None) -> dict:
    """Find and load the runs under ``paths``, write the report into ``out`` and return the summary
    (also written as summary.json). Raises ReportError when no run is found."""
    runs, label_notes = load_runs_and_notes(paths, label_keys)
    out = Path(out)
    summary = summarize(runs)
    grids = {name: quote(rel) for name, rel in write_plots(runs, out)["grids"].items()}
    (out / "table.md").write_text(markdown_table(table_rows(summary)) + "\n")
    diagnostics = diagnostics_rows(runs)
    (out / "diagnostics.md").write_text(markdown_table(diagnostics) + "\n" if len(diagnostics) > 1 else "")
    write_index(out, title, runs, summary, grids, label_notes)
    result = {"groups": summary, "label_notes": label_notes,
              "runs": [{"name": r.name, "path": str(r.path), "variant": r.variant, "num_codes": r.num_codes,
                        "seed": r.seed, "final": r.final} for r in runs]}
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    """``bavq-report RUN_DIR [RUN_DIR ...] --out FOLDER``; exit 2 with one line on a user mistake."""
    from bavq.cli import OneLineParser, fail

    parser = OneLineParser(prog="bavq-report", description="Compare runs: a table (mean ± std over seeds per "
                           "variant and K), plots, index.md and index.html.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run folders (holding final_metrics.json), parent folders or glob patterns")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--title", default="bavq report", help="title of index.md / index.html")
    parser.add_argument("--label", metavar="KEY[,KEY...]", help="label variants by these config keys, e.g. "
                        "quantizer.name,quantizer.entropy_weight (default: the sweep variant's name where "
                        "bavq-sweep ran the run, else a name from the quantizer config)")
    args = parser.parse_args(argv)
    label_keys = [k.strip() for k in args.label.split(",") if k.strip()] if args.label else None
    try:
        result = write_report(args.runs, args.out, args.title, label_keys)
    except ReportError as exc:
        return fail("bavq-report", str(exc))
    print(f"bavq-report: {len(result['runs'])} runs in {len(result['groups'])} groups -> "
          f"{Path(args.out) / 'index.md'} (and index.html)")
    return 0
