"""CPU dry runs of the performance benchmarks (bench_step, bench_kernel, gpu_check).

They check that every code path runs and that the reports carry every field the README and the
lead's notes quote, not the speed of this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bavq.quantizers import BAVQ, VQEMA

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts at the root, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_kernel, bench_step  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: OpenMP threads on a busy shared CI machine can make a tiny step 100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("cls,name", [(VQEMA, "vq_ema"), (BAVQ, "ba_vq")])
def test_stats_numel_is_the_buffer_the_quantizer_reduces(cls, name):
    quantizer = cls(16, 3)
    quantizer.auto_update = False  # keep the local buffer pending so its length can be read
    quantizer.train()(torch.randn(2, 3, 4, 4))
    assert quantizer._pending.numel() == bench_step.stats_numel(name, 16, 3)


def test_time_steps_fails_when_the_statistics_buffer_is_not_seen():
    cfg = bench_step.make_config("vqvae", "vq_ema", 32, 4, ["model.base_channels=8", "data.image_size=16"])
    parts = bench_step.build_parts(cfg, torch.device("cpu"), ddp=False)
    batches = [torch.rand(1, 3, 16, 16)]
    timing = bench_step.time_steps(parts, batches, 0, 1, bench_step.stats_numel("vq_ema", 32, 4))
    assert len(timing["step_s"]) == 1 and len(timing["stats_reduce_s"]) == 1
    with pytest.raises(RuntimeError, match="statistics all-reduce"):
        bench_step.time_steps(parts, batches, 0, 1, bench_step.stats_numel("ba_vq", 32, 4))


def test_scaling_table_uses_the_real_layouts_and_models():
    table = bench_step.scaling_rows(num_codes_list=(16384,), dims=(8,), ranks=(8, 512))
    (stats,) = table["stats"]
    assert stats["vq_ema_bytes"] == 4 * 16384 * 9 + 8  # 4K(D+1) + two scalars
    # + hard counts, reached flags, the anneal moments (1 + D + D^2) and five scalars
    assert stats["ba_vq_bytes"] == 4 * (16384 * 11 + 1 + 8 + 64 + 5)
    vqvae, vqgan = table["grads"]
    assert vqvae["disc_params"] == 0 and vqgan["disc_params"] > 0
    assert vqgan["grad_bytes"] > 50 * stats["ba_vq_bytes"]  # gradients dwarf the statistics
    assert table["ring_factor"] == {8: 1.75, 512: 2 * 511 / 512}


def test_bench_kernel_dry_run_report(tmp_path):
    out = tmp_path / "kernel.json"
    assert bench_kernel.main(["--dry-run", "--repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["peak_matmul_flops"] > 0 and report["chunk_sweep"]
    (dim,) = report["dims"]
    assert set(dim["kernels"]) == set(bench_kernel.PASSES)
    for kernel in dim["kernels"].values():
        assert kernel["seconds"] > 0 and kernel["efficiency_vs_matmul"] > 0
        assert kernel["bound"] in kernel["floors_seconds"]
    soft = dim["kernels"]["soft_assign(lambda=1)"]
    assert soft["matmul_flops"] == 2 * 256 * 512 * 8 + 2 * 256 * 512 * 9


@pytest.mark.slow
def test_bench_step_dry_run_one_and_two_processes(tmp_path):
    out = tmp_path / "step.json"
    argv = ["--dry-run", "--models", "vqvae", "--quantizers", "ba_vq", "--world-sizes", "1", "2",
            "--json", str(out)]
    assert bench_step.main(argv) == 0
    report = json.loads(out.read_text())
    one, busy, two = report["records"]  # alone, 2 independent processes at once, 2 ranks
    layout = [(r["world_size"], r["concurrent_processes"]) for r in (one, busy, two)]
    assert layout == [(1, 1), (1, 2), (2, 2)]
    assert one["stats_bytes"] == two["stats_bytes"] == 4 * bench_step.stats_numel("ba_vq", 64, 8)
    assert one["stats_reduce_s_isolated"] == busy["stats_reduce_s_isolated"] == 0.0
    assert two["stats_reduce_s_isolated"] > 0 and two["grad_reduce_s_isolated"] > 0
    assert two["samples_per_s"] == pytest.approx(2 * 2 / two["step_s_median"])
    (scaling,) = report["weak_scaling"]
    assert scaling["ratio"] == pytest.approx(two["step_s_median"] / one["step_s_median"])
    assert scaling["ratio_vs_concurrent"] == pytest.approx(two["step_s_median"] / busy["step_s_median"])


@pytest.mark.slow
def test_gpu_check_script_dry_run_writes_every_field(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["errors"] == []
    assert result["meta"]["dry_run"] is True
    assert not set(result["meta"]["third_party_imports"]) & {"webdataset", "wandb", "deepspeed"}
    assert {(r["quantizer"], r["code_dim"]) for r in result["quantizer"]} == {
        (q, d) for q in ("vq_ema", "ba_vq") for d in (8, 32)}
    for row in result["quantizer"]:
        assert row["fwd_bwd_ms"] > 0 and "peak_mem_bytes" in row
    assert [r["quantizer"] for r in result["vqgan_step"]] == ["vq_ema", "ba_vq"]
    for row in result["vqgan_step"]:
        assert row["images_per_s"] > 0 and "peak_mem_bytes" in row
    for dim in result["kernel"]["dims"]:
        for kernel in dim["kernels"].values():
            assert kernel["efficiency_vs_matmul"] > 0
    assert len(result["fused_check"]) == 6
    for row in result["fused_check"]:
        assert row["indices_equal_fraction"] == 1.0 and row["max_rel_error"] <= 1e-5, row
    summary = (tmp_path / "gpu_check.txt").read_text()
    assert "img/s" in summary and "of torch.mm" in summary and "fused E-step vs eager" in summary


def test_gpu_check_blocks_modules_absent_on_the_gpu_machine():
    code = ("import benchmarks.gpu_check\n"
            "try:\n    import wandb\nexcept ModuleNotFoundError as e:\n    print('blocked', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "blocked" in proc.stdout


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    # In a subprocess: importing gpu_check blocks deepspeed/wandb/webdataset for the whole process,
    # which would break later tests that need them.
    code = f"import sys, benchmarks.gpu_check as g; sys.exit(g.main(['--out', {str(tmp_path)!r}]))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_gpu_smoke_script_dry_run_runs_every_stage_of_the_real_trainer(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "BAVQ_WHEELS": str(tmp_path / "none"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert [s["stage"] for s in result["stages"]] == ["ddp", "deepspeed_bf16", "deepspeed_resume", "eval_ddp",
                                                      "eval_deepspeed", "export"]
    assert result["passed"] and all(s["rc"] == 0 for s in result["stages"])
    metrics = result["metrics"]
    assert metrics["deepspeed"]["steps"] == result["sizes"]["steps"]
    assert metrics["eval_deepspeed"]["images"] == metrics["eval_ddp"]["images"] > 0
    assert "resumed from" in (tmp_path / "gpu_smoke_work" / "deepspeed_resume.log").read_text()
    assert (tmp_path / "gpu_smoke_work" / "export" / "model.safetensors").is_file()  # a Tokenizer folder
    assert "PASSED" in (tmp_path / "gpu_smoke.txt").read_text()
