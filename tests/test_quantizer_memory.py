"""Memory: a BA-VQ training step at K = 16,384 never holds the N x K matrix (4 GiB at N = 65,536).

torch's CPU allocations bypass tracemalloc, so the step runs in a fresh subprocess and the test
reads the growth of its peak resident set (ru_maxrss) over a baseline taken after the inputs, the
module and a small warm-up step (which loads the BLAS kernels) exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from bavq.quantizers import BAVQ

    K, D, N = 16384, 8, int(sys.argv[1])
    q = BAVQ(K, D, entropy_loss_weight=float(sys.argv[2]), chunk_budget_mib=int(sys.argv[3]))
    q(torch.randn(4, D, 8, 8, requires_grad=True)).loss.backward()  # warm-up: kernels, allocator
    z = torch.randn(N // 1024, D, 32, 32, requires_grad=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = q(z)
    (out.loss + out.quantized.square().mean()).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(z.grad).all()
    print(json.dumps({"extra_mib": (peak - base) / 1024}))  # ru_maxrss is in KiB on Linux
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("rows,entropy_loss_weight,budget_mib", [
    (65536, 0.0, 128),  # the DESIGN case: N x K fp32 = 4 GiB, default 128 MiB chunk budget
    (8192, 0.1, 16),  # entropy loss on: the chunked backward too (N x K = 512 MiB)
])
def test_ba_vq_training_step_stays_under_a_quarter_of_n_by_k(rows, entropy_loss_weight, budget_mib):
    args = [str(rows), str(entropy_loss_weight), str(budget_mib)]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    extra_mib = json.loads(proc.stdout.strip().splitlines()[-1])["extra_mib"]
    full_matrix_mib = rows * 16384 * 4 / 2**20
    assert extra_mib < full_matrix_mib / 4, f"{extra_mib:.0f} MiB extra, N x K is {full_matrix_mib:.0f} MiB"
