#!/usr/bin/env bash
# GPU smoke run of the REAL trainer on one NVIDIA GPU (benchmarks/gpu_smoke.py): DDP under a
# one-rank NCCL group, DeepSpeed ZeRO-2 bf16 + resume, bavq-eval of both, bavq-export; synthetic
# images, no network, a few minutes. Writes gpu_smoke.json / gpu_smoke.txt to $OUT or benchmarks/results.
# On CPU (CI): `bash benchmarks/gpu_smoke.sh --dry-run`.
#   PYTHON=...       interpreter (default: python3)
#   BAVQ_WHEELS=...  folder of wheels for what the GPU machine lacks (default: .whl; made here by
#                    `make gpu-wheels`), installed offline into /tmp/bavq_site before the run
#   GPU_SMOKE_TIMEOUT=...  seconds before the whole run is stopped (default 480)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
WHEELS="${BAVQ_WHEELS:-.whl}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "gpu_smoke: installing the wheels in $WHEELS offline into /tmp/bavq_site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bavq_site \
        "$WHEELS"/*.whl || { echo "gpu_smoke: offline install from $WHEELS failed" >&2; exit 3; }
    export PYTHONPATH="/tmp/bavq_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - <<'PYEOF'
import importlib.util
needed = ["torch", "torchvision", "accelerate", "omegaconf", "yaml", "webdataset", "braceexpand", "deepspeed",
          "safetensors", "timm", "torchmetrics", "PIL"]
print(" ".join(m for m in needed if importlib.util.find_spec(m) is None))
PYEOF
)
if [[ -n "$missing" ]]; then
    echo "gpu_smoke: missing Python modules: $missing (run 'make gpu-wheels' here and carry .whl)" >&2
    exit 3
fi
exec timeout --kill-after=20 "${GPU_SMOKE_TIMEOUT:-480}" "$PY" benchmarks/gpu_smoke.py "$@"
