"""Finding and loading run folders, labelling variants, and the mean ± std summary of bavq-report.

A run folder is what the trainer writes (``config.yaml``, ``metrics.jsonl``, ``final_metrics.json``,
``code_histogram.npy``, ``reconstructions.png``); only ``final_metrics.json`` is required. Runs are
grouped by (variant, K) and aggregated over seeds as mean ± sample standard deviation.
"""

from __future__ import annotations

import glob
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from bavq.config import Config, to_dict

FINAL = "final_metrics.json"
# The summarized metrics: (key in final_metrics.json, column title, number format, scale applied before
# formatting); bavq.report.render turns them into the table's columns.
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


def _defaults() -> dict:
    """The flattened default config of this version."""
    return _flatten(to_dict(Config()))


def _signature(run: Run, defaults: dict | None = None) -> dict:
    """The run's config keys that change what it measures. A key missing from an older run's config
    (a field added later) takes this version's default: new fields are added with the default that
    keeps the old behaviour, so a grid that spans the addition stays one group per variant."""
    flat = {**(defaults or {}), **_flatten(run.config)} if run.config else {}
    sig = {k: v for k, v in flat.items() if not any(k.startswith(n) for n in _NEUTRAL)}
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
    defaults = _defaults()
    for members in groups.values():
        sigs = [_signature(r, defaults) for r in members]
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


def sort_key(run: Run) -> tuple:
    """Table order: K, then VQ-EMA before BA-VQ, BA-VQ by λ, then the label."""
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


def by_variant_k(runs: list[Run]) -> dict[tuple, list[Run]]:
    """Runs grouped by (variant, K), in table order (see :func:`sort_key`)."""
    out: dict[tuple, list[Run]] = {}
    for r in sorted(runs, key=sort_key):
        out.setdefault((r.variant, r.num_codes), []).append(r)
    return out


def summarize(runs: list[Run]) -> list[dict]:
    """One entry per (variant, K), rows ordered by K then VQ-EMA before BA-VQ (by λ): n, seeds, run
    names, and for each metric its mean, sample std (ddof=1; None for one value) and count."""
    return [{"variant": variant, "num_codes": k, "n": len(members), "seeds": [r.seed for r in members],
             "runs": [r.name for r in members],
             "metrics": {key: _stats([r.final.get(key) for r in members]) for key, *_ in METRICS}}
            for (variant, k), members in by_variant_k(runs).items()]


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
