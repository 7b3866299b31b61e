"""notebooks/analyze.ipynb executes headless on small fake runs (so it cannot rot) and is committed
without outputs."""

from __future__ import annotations

import json

import pytest
from test_report import make_run
from test_train import ROOT

NOTEBOOK = ROOT / "notebooks" / "analyze.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert "parameters" in code[0]["metadata"].get("tags", [])


@pytest.mark.slow
def test_notebook_executes_on_fake_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    runs = tmp_path / "sweep"
    make_run(runs, "vq_s0", seed=0, usage=0.5, psnr=25.0)
    make_run(runs, "vq_s1", seed=1, usage=0.7, psnr=26.0)
    make_run(runs, "ba_s0", quantizer="ba_vq", seed=0, usage=0.9, psnr=24.0, grid=False)
    monkeypatch.setenv("BAVQ_RUNS", str(runs))
    monkeypatch.setenv("BAVQ_PLOTS", str(tmp_path / "plots"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports this checkout's bavq
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on a failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "3 runs in 2 groups" in text and "| VQ-EMA | 64 | 2 | 60.0 ± 14.1 |" in text
    assert "BA-VQ diagnostics" in text and "highest usage: ba_s0" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4 + 2  # four plots, two runs with reconstruction grids
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == sorted(
        ["usage_over_steps.png", "perplexity_over_steps.png", "code_frequency.png", "psnr_vs_usage.png"])
