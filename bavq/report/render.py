"""The pages of bavq-report: the comparison and per-run tables (Markdown and HTML) and the index page
(index.md / index.html) that shows them with every plot."""

from __future__ import annotations

import html
from pathlib import Path

from bavq.diagnostics import diagnostics_rows
from bavq.report.collect import METRICS, Run, sort_key
from bavq.report.plot import PLOTS


def _cell(stat: dict, fmt: str, scale: float, group_n: int) -> str:
    if stat["mean"] is None:
        return "n/a"
    text = fmt.format(stat["mean"] * scale)
    if stat["std"] is not None:
        text += " ± " + fmt.format(stat["std"] * scale)
    if stat["n"] < group_n:
        text += f" (n={stat['n']})"
    return text


def table_rows(summary: list[dict]) -> list[list[str]]:
    """The comparison table as rows of strings, header first (shared by Markdown and HTML)."""
    rows = [["variant", "K", "n"] + [title for _, title, _, _ in METRICS]]
    for g in summary:
        rows.append([g["variant"], str(g["num_codes"]), str(g["n"])]
                    + [_cell(g["metrics"][key], fmt, scale, g["n"]) for key, _, fmt, scale in METRICS])
    return rows


def run_rows(runs: list[Run]) -> list[list[str]]:
    """One row per run (header first): the raw numbers behind the table."""
    rows = [["run", "variant", "K", "seed", "usage (%)", "perplexity", "PSNR (dB)", "steps", "world size"]]
    for r in sorted(runs, key=lambda r: (sort_key(r), str(r.seed))):
        f = r.final

        def num(key, fmt, scale=1.0):
            v = f.get(key)
            return fmt.format(v * scale) if isinstance(v, (int, float)) else "n/a"

        rows.append([r.name, r.variant, str(r.num_codes), str(r.seed), num("codebook_usage", "{:.1f}", 100.0),
                     num("perplexity", "{:.1f}"), num("psnr", "{:.2f}"), str(f.get("steps", "n/a")),
                     str(f.get("world_size", "n/a"))])
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(rows[0]), line(["---"] * len(rows[0]))] + [line(r) for r in rows[1:]])


def html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>\n" for r in rows[1:])
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _notes(runs: list[Run], label_notes: list[str] = ()) -> list[str]:
    reasons = {key: sorted({str(r.final.get(f"{key}_reason")) for r in runs
                            if r.final.get(key) is None and r.final.get(f"{key}_reason")}) for key in ("rfid", "lpips")}
    notes = ["Mean ± sample standard deviation (ddof = 1) over the runs of each row; n = runs (seeds). "
             "A value with (n=m) was missing or null in some runs and averages the m that have it.",
             "usage = codes used at least once over the evaluation split ÷ K; perplexity = exp(entropy) of "
             "that split's code histogram; H / log K = normalized entropy; wall = training wall-clock seconds."]
    for key, title in (("rfid", "rFID"), ("lpips", "LPIPS")):
        if reasons[key]:
            notes.append(f"{title} n/a: " + "; ".join(reasons[key]))
    if label_notes:
        notes.append("Variants that differ in more settings than fit a label: " + "; ".join(label_notes))
    return notes


def _sections(grids: dict[str, str]) -> list[tuple[str, str, str]]:
    """(heading, image path, caption) for every image of the index, in order."""
    out = [("Codebook usage during training", PLOTS["usage"],
            "Lines: training usage, of the key named on the axis (the trainer's sliding token window; thin: runs, "
            "thick: mean over seeds); dots: usage on the held-out split at evaluation steps and at the end."),
           ("Perplexity during training", PLOTS["perplexity"],
            "Lines: training perplexity, of the key named on the axis (thin: runs, thick: mean over seeds); "
            "dots: perplexity on the held-out split at evaluation steps and at the end."),
           ("Sorted code frequencies", PLOTS["frequency"],
            "Each run's code frequencies over the evaluation split, most used first (log scale); the dotted "
            "line is 1/K (uniform use); a curve ending before rank K shows dead codes."),
           ("PSNR vs usage", PLOTS["scatter"], "One marker per run: colour = variant, shape = K.")]
    out += [(f"Reconstructions: {name}", rel, "Top row: originals; bottom row: reconstructions.")
            for name, rel in grids.items()]
    return out


def write_index(out: Path, title: str, runs: list[Run], summary: list[dict], grids: dict[str, str],
                label_notes: list[str] = ()) -> None:
    """index.md and index.html with the same table, notes and images (relative paths)."""
    table, per_run, notes, sections = table_rows(summary), run_rows(runs), _notes(runs, label_notes), _sections(grids)
    md = [f"# {title}", "", f"{len(runs)} runs in {len(summary)} groups.", "", markdown_table(table), ""]
    md += [f"- {n}" for n in notes] + [""]
    for heading, rel, caption in sections:
        md += [f"## {heading}", "", f"![{heading}]({rel})", "", caption, ""]
    diagnostics = diagnostics_rows(runs)
    if len(diagnostics) > 1:
        md += ["## BA-VQ diagnostics (last logged training step, mean over seeds)", "", markdown_table(diagnostics), ""]
    md += ["## Runs", "", markdown_table(per_run), ""]
    (out / "index.md").write_text("\n".join(md))
    esc = html.escape
    page = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{esc(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}img{max-width:100%}</style></head>",
            f"<body><h1>{esc(title)}</h1><p>{len(runs)} runs in {len(summary)} groups.</p>", html_table(table),
            "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"]
    for heading, rel, caption in sections:
        page.append(f"<h2>{esc(heading)}</h2><img src='{esc(rel)}' alt='{esc(heading)}'><p>{esc(caption)}</p>")
    if len(diagnostics) > 1:
        page += ["<h2>BA-VQ diagnostics (last logged training step, mean over seeds)</h2>", html_table(diagnostics)]
    page += ["<h2>Runs</h2>", html_table(per_run), "</body></html>"]
    (out / "index.html").write_text("\n".join(page))
