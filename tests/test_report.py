"""bavq-report on fake run folders written in the trainer's exact formats."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from PIL import Image

from bavq.config import load_config, save_config
from bavq.report import main, write_report
from bavq.report.collect import read_history, variant_label


def make_run(root, name, *, quantizer="vq_ema", k=64, seed=0, usage=0.5, psnr=25.0, rfid=None, init="random",
             threshold=0.0, lam=1.0, extra=(), steps=(0, 50, 100), grid=True, usage_key="quantizer/usage_window"):
    """A run folder as the trainer leaves it: config.yaml, metrics.jsonl, final_metrics.json,
    code_histogram.npy and reconstructions.png."""
    cfg = load_config(None, [f"quantizer.name={quantizer}", f"quantizer.num_codes={k}", f"quantizer.init={init}",
                             f"quantizer.dead_code_threshold={threshold}", f"quantizer.entropy_weight={lam}",
                             "train.max_steps=100", f"train.seed={seed}", f"train.name={name}", *extra])
    run = root / name
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    rows = []
    for i, step in enumerate(steps):
        row = {"step": step, "total": 1.0 / (i + 1), "rec_loss": 0.5, "quant_loss": None, "lr": 2e-4,
               "samples_seen": 64 * step, "samples_per_s": 100.0, usage_key: usage * (i + 1) / len(steps),
               "quantizer/perplexity": 9.0}
        if quantizer == "ba_vq":
            row["quantizer/beta"] = 2.0 * (i + 1)
        if i == len(steps) - 2:  # an eval row; the final evaluation is in final_metrics.json
            row.update({"val/codebook_usage": usage, "val/perplexity": 12.0, "val/psnr": psnr, "val/ssim": 0.8})
        rows.append(row)
    rows.append({"step": steps[-1], "final/codebook_usage": usage, "final/psnr": psnr})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    used = int(round(usage * k))
    hist = np.zeros(k, dtype=np.int64)
    hist[:used] = np.arange(used, 0, -1) * 3
    np.save(run / "code_histogram.npy", hist)
    final = {"quantizer": quantizer, "num_codes": k, "codebook_usage": usage, "perplexity": 20.0 + 100 * usage,
             "normalized_entropy": 0.5 + usage / 4, "dead_codes": k - used, "psnr": psnr, "ssim": 0.8,
             "rec_l1": 0.05, "images": 100, "rfid": rfid, "rfid_reason": None if rfid is not None else
             "no local Inception weights (eval.inception_weights is empty)", "steps": steps[-1],
             "samples_seen": 64 * steps[-1], "wall_seconds": 10.0 + seed, "world_size": 1}
    (run / "final_metrics.json").write_text(json.dumps(final))
    if grid:
        pixels = (np.random.default_rng(seed).random((2 * 29 + 1, 4 * 29 + 1)) * 255).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").save(run / "reconstructions.png")
    return run


@pytest.fixture
def four_runs(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "vq_restart_s0", seed=0, usage=0.5, psnr=25.0, threshold=0.1)
    make_run(runs, "vq_restart_s1", seed=1, usage=0.7, psnr=26.0, threshold=0.1)
    make_run(runs, "ba_l1_s0", quantizer="ba_vq", seed=0, usage=0.9, psnr=24.0, rfid=30.0, threshold=0.1)
    make_run(runs, "ba_l1_s1", quantizer="ba_vq", seed=1, usage=0.95, psnr=24.5, threshold=0.1)
    return runs


def test_report_table_numbers_plots_and_index(four_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(four_runs / "vq_restart_s0"), str(four_runs / "vq_restart_s1"),
                 str(four_runs / "ba_l1_*"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    groups = {g["variant"]: g for g in summary["groups"]}
    assert set(groups) == {"VQ-EMA + restart", "BA-VQ (λ=1) + restart"}
    vq = groups["VQ-EMA + restart"]
    assert vq["n"] == 2 and vq["seeds"] == [0, 1] and vq["num_codes"] == 64
    assert vq["metrics"]["codebook_usage"]["mean"] == pytest.approx(0.6)
    assert vq["metrics"]["codebook_usage"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert vq["metrics"]["psnr"]["std"] == pytest.approx(statistics.stdev([25.0, 26.0]))
    assert vq["metrics"]["rfid"] == {"mean": None, "std": None, "n": 0}
    ba = groups["BA-VQ (λ=1) + restart"]
    assert ba["metrics"]["rfid"] == {"mean": 30.0, "std": None, "n": 1}
    # VQ-EMA rows come before BA-VQ rows at the same K
    assert [g["variant"] for g in summary["groups"]] == ["VQ-EMA + restart", "BA-VQ (λ=1) + restart"]

    table = (out / "table.md").read_text()
    vq_row = next(line for line in table.splitlines() if line.startswith("| VQ-EMA + restart |"))
    cells = [c.strip() for c in vq_row.strip("|").split("|")]
    # variant, K, n, usage, perplexity, H/logK, dead, PSNR, SSIM, rFID, LPIPS (absent: n/a), wall
    assert cells[:4] == ["VQ-EMA + restart", "64", "2", "60.0 ± 14.1"]
    assert cells[4] == "80.0 ± 14.1"  # perplexity 20 + 100 * usage
    assert cells[7] == "25.50 ± 0.71" and cells[9] == cells[10] == "n/a" and cells[11] == "10 ± 1"
    ba_row = next(line for line in table.splitlines() if line.startswith("| BA-VQ (λ=1) + restart |"))
    assert "30.00 (n=1)" in ba_row and "92.5 ± 3.5" in ba_row

    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == sorted(["usage_over_steps.png", "perplexity_over_steps.png", "code_frequency.png",
                           "psnr_vs_usage.png"] + [f"grids/{n}.png" for n in
                                                   ("vq_restart_s0", "vq_restart_s1", "ba_l1_s0", "ba_l1_s1")])
    for rel in pngs:
        with Image.open(out / rel) as img:
            assert img.format == "PNG" and img.size[0] > 100
            img.verify()
    index_md, index_html = (out / "index.md").read_text(), (out / "index.html").read_text()
    for rel in pngs:
        assert f"]({rel})" in index_md and f"src='{rel}'" in index_html
    assert table.splitlines()[2] in index_md and "60.0 ± 14.1" in index_html
    assert "no local Inception weights" in index_md
    assert "4 runs in 2 groups" in capsys.readouterr().out


def test_parent_folder_finds_runs_and_tolerates_missing_optional_files(tmp_path):
    root = tmp_path / "sweep"
    make_run(root / "a", "k64", k=64, steps=(0, 10), grid=False)
    run = make_run(root / "b", "k128", k=128, quantizer="ba_vq", lam=0.0, init="data", steps=(0, 10))
    (run / "metrics.jsonl").unlink()
    (run / "code_histogram.npy").unlink()
    result = write_report([str(root)], tmp_path / "out")
    assert sorted((g["variant"], g["num_codes"]) for g in result["groups"]) == [
        ("BA-VQ (λ=0) + data init", 128), ("VQ-EMA", 64)]
    assert result["groups"][0]["metrics"]["codebook_usage"]["std"] is None  # one seed: no std
    assert not (tmp_path / "out" / "grids" / "k64.png").exists()
    for name in ("usage_over_steps", "perplexity_over_steps", "code_frequency", "psnr_vs_usage"):
        with Image.open(tmp_path / "out" / f"{name}.png") as img:
            img.verify()


def test_groups_split_when_configs_differ_beyond_seed(tmp_path):
    make_run(tmp_path, "a", quantizer="ba_vq", seed=0)
    make_run(tmp_path, "b", quantizer="ba_vq", seed=1)
    make_run(tmp_path, "c", quantizer="ba_vq", seed=0, extra=["quantizer.decay=0.999"])
    result = write_report([str(tmp_path)], tmp_path / "out")
    assert {(g["variant"], g["n"]) for g in result["groups"]} == {
        ("BA-VQ (λ=1) [decay=0.99]", 2), ("BA-VQ (λ=1) [decay=0.999]", 1)}
    final = tmp_path / "c" / "final_metrics.json"  # the same config trained on 2 processes is apart too
    final.write_text(final.read_text().replace('"world_size": 1', '"world_size": 2'))
    result = write_report([str(tmp_path / n) for n in "abc"], tmp_path / "out2")
    assert "BA-VQ (λ=1) [decay=0.999, world_size=2]" in {g["variant"] for g in result["groups"]}


def test_a_field_added_after_older_runs_does_not_split_their_group(tmp_path):
    """A grid that spans the addition of a config field: the older runs' config.yaml lacks it. Missing
    at its default, they are seeds of one variant; a run that set a non-default value still splits."""
    import yaml

    make_run(tmp_path, "old", quantizer="ba_vq", seed=0)
    make_run(tmp_path, "new", quantizer="ba_vq", seed=1)
    make_run(tmp_path, "tuned", quantizer="ba_vq", seed=2, extra=["quantizer.balance_warm_start=true"])
    cfg_path = tmp_path / "old" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    del cfg["quantizer"]["balance_warm_start"]
    cfg_path.write_text(yaml.safe_dump(cfg))
    result = write_report([str(tmp_path / "old"), str(tmp_path / "new")], tmp_path / "out")
    assert [(g["variant"], g["n"]) for g in result["groups"]] == [("BA-VQ (λ=1)", 2)]
    result = write_report([str(tmp_path)], tmp_path / "out2")
    assert {(g["variant"], g["n"]) for g in result["groups"]} == {
        ("BA-VQ (λ=1) [balance_warm_start=False]", 2), ("BA-VQ (λ=1) [balance_warm_start=True]", 1)}


@pytest.mark.parametrize("quantizer, extra, label", [
    ({"name": "vq_ema"}, {}, "VQ-EMA"),
    ({"name": "vq_ema", "init": "data"}, {}, "VQ-EMA + data init"),
    ({"name": "vq_ema", "dead_code_threshold": 0.5}, {}, "VQ-EMA + restart"),
    ({"name": "vq_ema", "init": "data", "dead_code_threshold": 2}, {}, "VQ-EMA + data init + restart"),
    ({"name": "ba_vq", "entropy_weight": 1.0}, {}, "BA-VQ (λ=1)"),
    ({"name": "ba_vq", "entropy_weight": 0.5, "init": "data"}, {}, "BA-VQ (λ=0.5) + data init"),
    ({"name": "ba_vq", "entropy_weight": 2, "beta_mode": "fixed"}, {}, "BA-VQ (λ=2, fixed β)"),
    ({}, {"quantizer": "ba_vq"}, "BA-VQ (λ=1)"),
])
def test_variant_label(quantizer, extra, label):
    assert variant_label({"quantizer": quantizer}, extra) == label


def test_history_keeps_last_row_of_a_resumed_step_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1}\n{"step": 10, "a": 2}\n{"step": 10, "a": 3, "b": 4}\n{"step": 20, "a"')
    assert read_history(path) == [{"step": 0, "a": 1}, {"step": 10, "a": 3, "b": 4}]


def test_no_runs_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no runs found" in err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unreadable_final_metrics_is_a_one_line_error(tmp_path, capsys):
    run = make_run(tmp_path, "bad")
    (run / "final_metrics.json").write_text("{not json")
    assert main([str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "final_metrics.json" in err


def test_training_curves_use_each_runs_logged_key_and_the_final_evaluation(tmp_path, monkeypatch):
    import bavq.report.plot as report_plot

    make_run(tmp_path, "batch_s0", seed=0, steps=(0, 50, 100), usage_key="quantizer/usage")
    make_run(tmp_path, "new_s0", seed=0, steps=(0, 50, 100), usage=0.6, usage_key="quantizer/usage_window")
    make_run(tmp_path, "new_s1", seed=1, steps=(0, 50, 100), usage=0.8, usage_key="quantizer/usage_window")
    panels = {}
    original = report_plot._finish

    def rounded(values):
        return tuple(round(float(v), 6) for v in values)

    def spy(fig, axes, path, *args):
        panels[path.name] = [(ax.get_ylabel(), [(rounded(line.get_xdata()), rounded(line.get_ydata()))
                                                for line in ax.get_lines()]) for ax in axes.values()]
        original(fig, axes, path, *args)

    monkeypatch.setattr(report_plot, "_finish", spy)
    write_report([str(tmp_path)], tmp_path / "out")
    [(ylabel, lines)] = panels["usage_over_steps.png"]
    assert ylabel.endswith("(lines: quantizer/usage_window, quantizer/usage)")  # window first, per batch second
    steps = (0.0, 50.0, 100.0)
    for usage in (0.5, 0.6, 0.8):  # one line per run, whichever key it logged
        assert (steps, rounded(100 * usage * i / 3 for i in (1, 2, 3))) in lines
    mean = (0.5 + 0.6 + 0.8) / 3  # the three runs are one variant (their configs differ only in seed)
    assert (steps, rounded(100 * mean * i / 3 for i in (1, 2, 3))) in lines
    # held-out dots: the eval row at step 50 and the final evaluation at step 100
    assert ((50.0, 100.0), (50.0, 50.0)) in lines and ((50.0, 100.0), (80.0, 80.0)) in lines


def test_ba_vq_diagnostics_table_averages_the_last_logged_row(four_runs, tmp_path):
    out = tmp_path / "report"
    assert main([str(four_runs), "--out", str(out)]) == 0
    text = (out / "diagnostics.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| BA-VQ")]
    assert len(lines) == 1 and "VQ-EMA" not in text  # only BA-VQ runs carry β
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells[1] == "64" and cells[2] == "2" and cells[3] == "6"  # last β of the fake runs is 2 * 3
    assert "BA-VQ diagnostics" in (out / "index.md").read_text()
