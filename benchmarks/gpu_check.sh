#!/usr/bin/env bash
# The prepared check for a machine with one NVIDIA GPU: no downloads, synthetic images, < 8 minutes.
# Runs benchmarks/gpu_check.py from the source tree (PYTHONPATH=.) and writes gpu_check.json and
# gpu_check.txt into $OUT (if set) or benchmarks/results/. On CPU: `bash benchmarks/gpu_check.sh --dry-run`.
#   PYTHON=...      interpreter to use (default: python3)
#   BAVQ_WHEELS=... folder of wheels installed with `pip install --no-index` when a module bavq needs
#                   (omegaconf, PyYAML) is missing; the GPU machine has no network.
#   GPU_CHECK_TIMEOUT=...  seconds before the run is interrupted (default 470; results so far are kept)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

missing=$("$PY" - <<'PYEOF'
import importlib.util
needed = ["torch", "omegaconf", "yaml", "torchvision"]
print(" ".join(m for m in needed if importlib.util.find_spec(m) is None))
PYEOF
)
if [[ -n "$missing" && -n "${BAVQ_WHEELS:-}" ]]; then
    echo "gpu_check: installing $missing from $BAVQ_WHEELS (offline)"
    "$PY" -m pip install --no-index --find-links "$BAVQ_WHEELS" $missing
elif [[ -n "$missing" ]]; then
    echo "gpu_check: missing Python modules: $missing (bavq imports them; set BAVQ_WHEELS to a wheel folder)" >&2
    exit 3
fi

# SIGINT first so Python stops between sections with the JSON of the finished ones on disk.
exec timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT:-470}" "$PY" benchmarks/gpu_check.py "$@"
