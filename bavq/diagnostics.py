"""End-of-training quantizer diagnostics per (variant, K), read from the runs' metrics.jsonl.

For BA-VQ these are the quantities that explain a result (DESIGN.md): the inverse temperature β,
the learned prior's entropy H(q) / log K and its heaviest code q_max·K (the "one heavy code"
failure), the rate I(X;K), the per-sample assignment entropy (how soft the E-step still is) and how far the
E-step's column marginal is from the balance target (total variation; runs before it was logged: n/a).
The last logged training row of each run is used, averaged over the seeds of a group.
"""

from __future__ import annotations

import math

import numpy as np

# (metrics.jsonl key, column title, format); "prior_entropy" is divided by log K
DIAGNOSTICS = [
    ("quantizer/beta", "β", "{:.3g}"),
    ("quantizer/prior_entropy", "H(q) / log K", "{:.3f}"),
    ("quantizer/prior_max_k", "q_max·K", "{:.1f}"),
    ("quantizer/rate", "rate I (nats)", "{:.2f}"),
    ("quantizer/assign_entropy", "assignment entropy (nats)", "{:.2f}"),
    ("quantizer/distortion", "hard distortion", "{:.4g}"),
    ("quantizer/distortion_soft", "soft distortion", "{:.4g}"),
    ("quantizer/usage_window", "window usage (%)", "{:.1f}"),
    ("quantizer/balance_tv", "column TV to r", "{:.3f}"),
]


def _last_values(history: list[dict], num_codes: int) -> dict[str, float]:
    values: dict[str, float] = {}
    for row in history:
        for key, *_ in DIAGNOSTICS:
            v = row.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                values[key] = float(v)
    if "quantizer/prior_entropy" in values:
        values["quantizer/prior_entropy"] /= math.log(num_codes)
    if "quantizer/usage_window" in values:
        values["quantizer/usage_window"] *= 100.0
    return values


def diagnostics_rows(runs) -> list[list[str]]:
    """Header + one row per (variant, K) with BA-VQ diagnostics ("n/a" where a run logged none)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        if not any("quantizer/beta" in row for row in run.history):
            continue  # VQ-EMA runs have no β, prior or rate
        groups.setdefault((run.variant, run.num_codes), []).append(_last_values(run.history, run.num_codes))
    rows = [["variant", "K", "n"] + [title for _, title, _ in DIAGNOSTICS]]
    for (variant, k), members in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        cells = []
        for key, _, fmt in DIAGNOSTICS:
            vals = [m[key] for m in members if key in m]
            cells.append(fmt.format(float(np.mean(vals))) if vals else "n/a")
        rows.append([variant, str(k), str(len(members))] + cells)
    return rows
