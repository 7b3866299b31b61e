"""The figures of bavq-report (matplotlib, written as PNG files): usage and perplexity over training
steps, sorted code frequencies, PSNR vs usage, and each run's reconstruction grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bavq.report.collect import Run, by_variant_k, sort_key

# Training curves: the first key that a run logged. The trainer logs the quantizer's sliding-window
# usage and the per-batch usage (the fallback); its only training perplexity is the per-batch one.
USAGE_KEYS = ("quantizer/usage_window", "quantizer/usage")
PERPLEXITY_KEYS = ("quantizer/perplexity",)
PLOTS = {"usage": "usage_over_steps.png", "perplexity": "perplexity_over_steps.png",
         "frequency": "code_frequency.png", "scatter": "psnr_vs_usage.png"}
LEGEND_FONT = 8  # points; legends sit outside the axes, so they never hide data
LEGEND_WRAP = 36  # characters per legend line


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or in CI
    import matplotlib.pyplot as plt

    return plt


def _colors(runs: list[Run]) -> dict[str, tuple]:
    plt = _pyplot()
    # variant order, whatever K: a variant keeps its colour in every panel and plot
    variants = list(dict.fromkeys(r.variant for r in sorted(runs, key=lambda r: sort_key(r)[1:])))
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
    for (variant, k), members in by_variant_k(runs).items():
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


def plot_code_frequency(runs: list[Run], colors: dict, path: Path) -> None:
    """One panel per K: each run's code frequencies over the evaluation split, sorted, log scale.
    A curve that stops before rank K shows the dead codes."""
    plt = _pyplot()
    ks = sorted({r.num_codes for r in runs})
    fig, axes = _k_axes(plt, ks, "code frequency")
    drawn = []
    for r in sorted(runs, key=sort_key):
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
    grids = {r.name: f"grids/{r.name}.png" for r in sorted(runs, key=lambda r: (sort_key(r), str(r.seed)))
             if plot_grid(r, out / "grids" / f"{r.name}.png")}
    return {**PLOTS, "grids": grids}
