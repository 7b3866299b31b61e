"""bavq-report: compare training runs in one folder of tables and plots.

Input: run folders as the trainer writes them (``config.yaml``, ``metrics.jsonl``,
``final_metrics.json``, ``code_histogram.npy``, ``reconstructions.png``); only
``final_metrics.json`` is required. Runs are grouped by (variant, K), where the variant label is the
sweep file's variant name (``sweep.json``, written by bavq-sweep), ``--label`` config keys, or a name
from the quantizer config ("VQ-EMA + data init", "BA-VQ (λ=1) + restart", ...), and aggregated over
seeds as mean ± sample standard deviation. Output: ``index.md`` / ``index.html`` (the table and
every plot), ``table.md``, ``summary.json`` (the aggregated numbers) and the PNG plots.
"""

from __future__ import annotations

import glob
import html
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import yaml

from bavq.diagnostics import diagnostics_rows

FINAL = "final_metrics.json"
# (key in final_metrics.json, column title, number format, scale applied before formatting)
METRICS = (
    ("codebook_usage", "usage (%)", "{:.1f}", 100.0),
    ("perplexity", "perplexity", "{:.1f}", 1.0),
    ("normalized_entropy", "H / log K", "{:.3f}", 1.0),
    ("dead_codes", "dead codes", "{:.1f}", 1.0),
    ("psnr", "PSNR (dB)", "{:.2f}", 1.0),
    ("ssim", "SSIM", "{:.4f}", 1.0),
    ("rfid", "rFID", "{:.2f}", 1.0),
    ("lpips", "LPIPS", "{:.4f}", 1.0),
    ("wall_seconds", "wall (s)", "{:.0f}", 1.0),
)
# Config keys that do not change what a run measures; runs differing only in these are seeds of one
# group. Any other difference inside a (variant, K) group is added to the label, so tuned variants
# are never averaged together silently.
_NEUTRAL = ("train.seed", "train.name", "train.output_dir", "train.resume", "train.save_every",
            "train.keep_last", "train.keep_every", "train.check_codebook_sync", "train.compile", "log.", "data.root",
            "data.num_workers", "eval.batch_size", "eval.num_recon_images", "quantizer.chunk_size",
            "quantizer.chunk_budget_mib", "quantizer.num_codes")
# Training curves: the first key that any run logged (window metrics first, per-batch ones as a fallback).
USAGE_KEYS = ("train/window_usage", "quantizer/usage_window", "quantizer/usage")
PERPLEXITY_KEYS = ("train/window_perplexity", "quantizer/window_perplexity", "quantizer/perplexity")
PLOTS = {"usage": "usage_over_steps.png", "perplexity": "perplexity_over_steps.png",
         "frequency": "code_frequency.png", "scatter": "psnr_vs_usage.png"}


class ReportError(ValueError):
    """No runs, or a run folder whose required file is unreadable; the message is one line."""


@dataclass
class Run:
    """One run folder, loaded."""

    path: Path
    name: str
    config: dict  # the resolved config.yaml as plain dicts ({} when missing)
    final: dict  # final_metrics.json
    history: list[dict]  # metrics.jsonl rows, one per logged step (a resumed step keeps its last row)
    histogram: np.ndarray | None  # (K,) code counts over the evaluation split
    variant: str = ""
    sweep_variant: str = ""  # the sweep file's variant name (RUN/sweep.json, written by bavq-sweep)

    @property
    def num_codes(self) -> int:
        return int(self.final.get("num_codes") or self.config.get("quantizer", {}).get("num_codes", 0))

    @property
    def seed(self):
        return self.config.get("train", {}).get("seed")


def find_run_dirs(paths: list[str]) -> list[Path]:
    """Run folders (holding final_metrics.json) named by ``paths``: run folders, parents searched
    recursively, or glob patterns. Raises ReportError when a path is missing or nothing is found."""
    found: list[Path] = []
    for p in paths:
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not glob.has_magic(p) and not Path(p).exists():
            raise ReportError(f"'{p}' does not exist")
        for m in map(Path, matches):
            if m.is_file() and m.name == FINAL:
                m = m.parent
            if (m / FINAL).is_file():
                found.append(m)
            elif m.is_dir():
                found += sorted(f.parent for f in m.rglob(FINAL))
    unique = list({d.resolve(): d for d in found}.values())
    if not unique:
        raise ReportError(f"no runs found in {' '.join(paths)} (a run folder holds {FINAL})")
    return unique


def _warn(msg: str) -> None:
    print(f"bavq-report: warning: {msg}", file=sys.stderr)


def read_history(path: Path) -> list[dict]:
    """metrics.jsonl rows sorted by step; a step logged twice (a resumed run) keeps its last row,
    and an unreadable line (a run killed mid-write) is skipped."""
    by_step: dict[int, dict] = {}
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = {**by_step.get(row["step"], {}), **row}
    return [by_step[s] for s in sorted(by_step)]


def load_run(path: str | Path) -> Run:
    """Load one run folder; raises ReportError when final_metrics.json is unreadable."""
    path = Path(path)
    try:
        final = json.loads((path / FINAL).read_text())
        assert isinstance(final, dict)
    except (OSError, ValueError, AssertionError):
        raise ReportError(f"{path / FINAL} is not a readable JSON object") from None
    config: dict = {}
    if (path / "config.yaml").is_file():
        try:
            config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        except yaml.YAMLError:
            _warn(f"{path / 'config.yaml'} is not valid YAML; labelling the run from {FINAL}")
    histogram = None
    if (path / "code_histogram.npy").is_file():
        try:
            histogram = np.asarray(np.load(path / "code_histogram.npy"), dtype=np.float64).ravel()
        except (OSError, ValueError):
            _warn(f"{path / 'code_histogram.npy'} is unreadable; no frequency curve for this run")
    name = config.get("train", {}).get("name") or path.name
    run = Run(path, name, config, final, read_history(path / "metrics.jsonl"), histogram)
    try:
        run.sweep_variant = str(json.loads((path / "sweep.json").read_text()).get("variant") or "")
    except (OSError, ValueError, AttributeError):
        pass  # not a sweep cell (or an unreadable marker): labelled from its config
    return run


def variant_label(config: dict, final: dict | None = None) -> str:
    """A readable variant name from the quantizer config, e.g. "VQ-EMA + data init + restart" or
    "BA-VQ (λ=1) + restart"; defaults follow bavq.config when a key is missing."""
    q = config.get("quantizer", {})
    name = q.get("name") or (final or {}).get("quantizer", "?")
    if name == "ba_vq":
        inner = f"λ={float(q.get('entropy_weight', 1.0)):g}"
        if q.get("beta_mode", "adaptive") == "fixed":
            inner += ", fixed β"
        parts = [f"BA-VQ ({inner})"]
    else:
        parts = ["VQ-EMA" if name == "vq_ema" else str(name)]
    if q.get("init") == "data":
        parts.append("data init")
    if float(q.get("dead_code_threshold") or 0) > 0:
        parts.append("restart")
    if q.get("l2_normalize"):
        parts.append("l2-norm")
    return " + ".join(parts)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def _signature(run: Run) -> dict:
    sig = {k: v for k, v in _flatten(run.config).items() if not any(k.startswith(n) for n in _NEUTRAL)}
    sig["world_size"] = json.dumps(run.final.get("world_size"))  # sets the global batch
    return sig


MAX_SUFFIX = 32  # characters of a "[key=value, ...]" label suffix before it becomes a numbered note


def _label_by_keys(run: Run, keys: list[str]) -> str:
    flat = _flatten(run.config)
    return ", ".join(f"{_short(k, keys)}={json.loads(flat.get(k, 'null'))}" for k in keys)


def _short(key: str, keys: list[str]) -> str:
    """The last part of a config key (``decay`` for ``quantizer.decay``) unless that is ambiguous."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def assign_variants(runs: list[Run], label_keys: list[str] | None = None) -> list[str]:
    """Set each run's variant label and return notes explaining numbered labels.

    The label is, in order: the ``label_keys`` values (``bavq-report --label``), the sweep file's variant
    name (RUN/sweep.json), or a name from the quantizer config ("BA-VQ (λ=1) + restart"). Inside a
    (label, K) group, configs that differ in more than seeds get the differing keys appended in short
    form ("[decay=0.999]"); when that suffix would be long, a number ("[#1]") that a note expands —
    legends and tables stay legible."""
    groups: dict[tuple, list[Run]] = {}
    known = set().union(*(_flatten(r.config) for r in runs))
    for key in label_keys or ():
        if key not in known:
            raise ReportError(f"--label: no run has the config key '{key}' (e.g. quantizer.entropy_weight)")
    for run in runs:
        if label_keys:
            run.variant = _label_by_keys(run, label_keys)
        else:
            run.variant = run.sweep_variant or variant_label(run.config, run.final)
        groups.setdefault((run.variant, run.num_codes), []).append(run)
    notes: dict[str, str] = {}  # full suffix -> number
    for members in groups.values():
        sigs = [_signature(r) for r in members]
        keys = sorted({k for s in sigs for k in s if len({t.get(k) for t in sigs}) > 1})
        if not keys:
            continue
        for run, sig in zip(members, sigs):
            suffix = ", ".join(f"{_short(k, keys)}={json.loads(sig.get(k, 'null'))}" for k in keys)
            if len(suffix) > MAX_SUFFIX:
                full = ", ".join(f"{k}={json.loads(sig.get(k, 'null'))}" for k in keys)
                suffix = "#" + notes.setdefault(full, str(len(notes) + 1))
            run.variant += f" [{suffix}]"
    return [f"[#{n}] = {full}" for full, n in notes.items()]


def _sort_key(run: Run) -> tuple:
    q = run.config.get("quantizer", {})
    name = q.get("name") or run.final.get("quantizer")
    return (run.num_codes, name != "vq_ema", float(q.get("entropy_weight", 1.0)) if name == "ba_vq" else 0.0,
            run.variant)


def _stats(values: list) -> dict:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    arr = np.asarray(vals)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(vals) > 1 else None, "n": len(vals)}


def summarize(runs: list[Run]) -> list[dict]:
    """One entry per (variant, K), rows ordered by K then VQ-EMA before BA-VQ (by λ): n, seeds, run
    names, and for each metric its mean, sample std (ddof=1; None for one value) and count."""
    groups: dict[tuple, list[Run]] = {}
    for run in sorted(runs, key=_sort_key):
        groups.setdefault((run.variant, run.num_codes), []).append(run)
    return [{"variant": variant, "num_codes": k, "n": len(members), "seeds": [r.seed for r in members],
             "runs": [r.name for r in members],
             "metrics": {key: _stats([r.final.get(key) for r in members]) for key, *_ in METRICS}}
            for (variant, k), members in groups.items()]


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
    for r in sorted(runs, key=lambda r: (_sort_key(r), str(r.seed))):
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


# ----------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or in CI
    import matplotlib.pyplot as plt

    return plt


def _colors(runs: list[Run]) -> dict[str, tuple]:
    plt = _pyplot()
    # variant order, whatever K: a variant keeps its colour in every panel and plot
    variants = list(dict.fromkeys(r.variant for r in sorted(runs, key=lambda r: _sort_key(r)[1:])))
    cmap = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
    return {v: cmap(i % cmap.N) for i, v in enumerate(variants)}


def _series(run: Run, key: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    pts = [(row["step"], row[key]) for row in run.history
           if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
    steps, values = zip(*pts) if pts else ((), ())
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float) * scale


def _k_axes(plt, ks: list[int], ylabel: str):
    fig, axes = plt.subplots(1, len(ks), figsize=(4.6 * len(ks), 3.8), squeeze=False)
    for ax, k in zip(axes[0], ks):
        ax.set_title(f"K = {k}")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    return fig, dict(zip(ks, axes[0]))


def _finish(fig, axes: dict, path: Path, legend: list, empty_note: str, has_data: bool) -> None:
    """One legend below all panels (per-panel legends crowd out the curves), then save."""
    for ax in axes.values():
        if not has_data:
            ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ncol = _legend_columns(legend, fig.get_figwidth())
    lines = max((h.get_label().count("\n") + 1 for h in legend), default=1)
    legend_inches = 0.2 * lines * math.ceil(len(legend) / ncol) + 0.15 if legend else 0.0
    fig.set_figheight(fig.get_figheight() + legend_inches)  # room below the panels for the legend
    if legend:
        fig.legend(handles=legend, loc="lower center", ncol=ncol, fontsize=LEGEND_FONT, frameon=False)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long variant labels must not be cut off
    _pyplot().close(fig)


LEGEND_FONT = 8  # points; legends sit outside the axes, so they never hide data
LEGEND_WRAP = 36  # characters per legend line


def _legend_columns(legend: list, fig_width: float) -> int:
    """As many columns as fit the figure's width (a legend wider than the figure would widen the saved
    image and shrink everything when shown at page width)."""
    if not legend:
        return 1
    chars = max(len(line) for h in legend for line in h.get_label().splitlines())
    column = 0.45 + chars * LEGEND_FONT * 0.0075  # inches: handle + text at ~0.55 em per character
    return max(1, min(len(legend), int(fig_width // column)))


def _legend(colors: dict, runs: list[Run], marker: str | None = None) -> list:
    import textwrap

    from matplotlib.lines import Line2D

    present = {r.variant for r in runs}
    return [Line2D([], [], color=c, marker=marker, linestyle="" if marker else "-", linewidth=2,
                   label="\n".join(textwrap.wrap(v, LEGEND_WRAP)) or v)
            for v, c in colors.items() if v in present]


def plot_over_steps(runs: list[Run], colors: dict, train_keys: tuple[str, ...], val_key: str, final_key: str,
                    ylabel: str, scale: float, path: Path) -> None:
    """One panel per K: thin line per run for the first of ``train_keys`` that the run logged (named on
    the axis), thick line for the variant mean over runs (at steps all its runs logged), dots for the
    held-out ``val_key`` and for the final evaluation's ``final_key`` at the last step."""
    plt = _pyplot()
    ks = sorted({r.num_codes for r in runs})
    key_of = {id(r): next((k for k in train_keys if any(k in row for row in r.history)), train_keys[0])
              for r in runs}
    used = [k for k in train_keys if k in key_of.values()]
    fig, axes = _k_axes(plt, ks, f"{ylabel}\n(lines: {', '.join(used)})")
    has_data = has_val = False
    for (variant, k), members in _by_variant_k(runs).items():
        ax, color = axes[k], colors[variant]
        curves = [_series(r, key_of[id(r)], scale) for r in members]
        for steps, values in curves:
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
        common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves))) if curves else []
        if common:
            mean = [np.mean([v[s == step][0] for s, v in curves]) for step in common]
            ax.plot(common, mean, color=color, linewidth=2)
        for r in members:
            steps, values = _series(r, val_key, scale)
            last, value = r.final.get("steps"), r.final.get(final_key)
            if isinstance(last, (int, float)) and isinstance(value, (int, float)) and last not in steps:
                steps, values = np.append(steps, last), np.append(values, value * scale)
            ax.plot(steps, values, "o", color=color, markersize=3)
            has_val = has_val or len(steps) > 0
        has_data = has_data or any(len(s) for s, _ in curves)
    for ax in axes.values():
        ax.set_xlabel("step")
    legend = _legend(colors, runs)
    if has_val:
        from matplotlib.lines import Line2D

        legend.append(Line2D([], [], color="gray", marker="o", markersize=3, linestyle="",
                             label="held-out split (eval steps and final)"))
    _finish(fig, axes, path, legend, f"none of {', '.join(train_keys)} in metrics.jsonl", has_data)


def _by_variant_k(runs: list[Run]) -> dict[tuple, list[Run]]:
    out: dict[tuple, list[Run]] = {}
    for r in sorted(runs, key=_sort_key):
        out.setdefault((r.variant, r.num_codes), []).append(r)
    return out


def plot_code_frequency(runs: list[Run], colors: dict, path: Path) -> None:
    """One panel per K: each run's code frequencies over the evaluation split, sorted, log scale.
    A curve that stops before rank K shows the dead codes."""
    plt = _pyplot()
    ks = sorted({r.num_codes for r in runs})
    fig, axes = _k_axes(plt, ks, "code frequency")
    drawn = []
    for r in sorted(runs, key=_sort_key):
        if r.histogram is None or r.histogram.sum() <= 0:
            continue
        freq = np.sort(r.histogram)[::-1] / r.histogram.sum()
        freq = freq[freq > 0]
        axes[r.num_codes].plot(np.arange(1, len(freq) + 1), freq, color=colors[r.variant], alpha=0.8)
        drawn.append(r)
    for k, ax in axes.items():
        ax.set_yscale("log")
        ax.set_xlabel("code rank")
        ax.set_xlim(0, k)
        ax.axhline(1.0 / k, color="gray", linestyle=":", linewidth=1)  # the uniform code marginal
    _finish(fig, axes, path, _legend(colors, drawn), "no code_histogram.npy", bool(drawn))


def plot_psnr_vs_usage(runs: list[Run], colors: dict, path: Path) -> None:
    """One marker per run: colour = variant, marker shape = K."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = dict(zip(sorted({r.num_codes for r in runs}), "osD^v<>ph*"))
    for r in runs:
        u, p = r.final.get("codebook_usage"), r.final.get("psnr")
        if isinstance(u, (int, float)) and isinstance(p, (int, float)):
            ax.scatter(100 * u, p, color=colors[r.variant], marker=markers.get(r.num_codes, "o"), s=40,
                       edgecolors="black", linewidths=0.4)
    handles = _legend(colors, runs, marker="o")
    handles += [Line2D([], [], color="gray", marker=m, linestyle="", label=f"K = {k}") for k, m in markers.items()]
    # outside the axes, on the right: "best" still covers markers once there are many variants
    ax.legend(handles=handles, fontsize=LEGEND_FONT, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0, frameon=False)
    ax.set_xlabel("codebook usage on the evaluation split (%)")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_grid(run: Run, path: Path) -> bool:
    """The run's reconstructions.png with a title; False when the run has none."""
    src = run.path / "reconstructions.png"
    if not src.is_file():
        return False
    plt = _pyplot()
    img = plt.imread(str(src))
    h, w = img.shape[:2]
    width = max(6.0, min(14.0, w / 50))
    fig = plt.figure(figsize=(width, width * h / w + 0.45))  # 0.45 in above the image for the title
    ax = fig.add_axes([0, 0, 1, 1 - 0.45 / fig.get_figheight()])
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
    ax.axis("off")
    psnr = run.final.get("psnr")
    psnr_text = f", PSNR {psnr:.2f} dB" if isinstance(psnr, (int, float)) else ""
    fig.suptitle(f"{run.name}: {run.variant}, K = {run.num_codes}, seed {run.seed}{psnr_text}\n"
                 "top: originals, bottom: reconstructions", fontsize=9, y=1 - 0.03 / fig.get_figheight(), va="top")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------- pages
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


def _unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:  # two folders with the same train.name: keep both, distinguishably
            r.name = f"{r.name}_{seen[r.name]}"


def load_runs_and_notes(paths: list[str], label_keys: list[str] | None = None) -> tuple[list[Run], list[str]]:
    """Find and load the runs under ``paths`` (run folders, parents, globs), with unique names and
    variant labels (by ``label_keys`` when given); also the notes that explain shortened labels.
    Raises ReportError when none is found."""
    runs = [load_run(d) for d in find_run_dirs(paths)]
    _unique_names(runs)
    return runs, assign_variants(runs, label_keys)


def load_runs(paths: list[str], label_keys: list[str] | None = None) -> list[Run]:
    """The runs of :func:`load_runs_and_notes` (what ``notebooks/analyze.ipynb`` starts from)."""
    return load_runs_and_notes(paths, label_keys)[0]


def write_plots(runs: list[Run], out: str | Path) -> dict:
    """Every plot of the report into ``out``: {"usage" | "perplexity" | "frequency" | "scatter": path
    relative to ``out``, "grids": {run name: path relative to ``out``}} (runs without a
    reconstructions.png have no grid). Also what ``notebooks/analyze.ipynb`` shows."""
    out = Path(out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    colors = _colors(runs)
    plot_over_steps(runs, colors, USAGE_KEYS, "val/codebook_usage", "codebook_usage", "codebook usage (%)", 100.0,
                    out / PLOTS["usage"])
    plot_over_steps(runs, colors, PERPLEXITY_KEYS, "val/perplexity", "perplexity", "perplexity", 1.0,
                    out / PLOTS["perplexity"])
    plot_code_frequency(runs, colors, out / PLOTS["frequency"])
    plot_psnr_vs_usage(runs, colors, out / PLOTS["scatter"])
    grids = {r.name: f"grids/{r.name}.png" for r in sorted(runs, key=lambda r: (_sort_key(r), str(r.seed)))
             if plot_grid(r, out / "grids" / f"{r.name}.png")}
    return {**PLOTS, "grids": grids}


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


if __name__ == "__main__":
    sys.exit(main())
