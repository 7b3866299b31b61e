"""bavq-sweep: the grid's commands, the shipped sweep file, failures, --skip-done and --report."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from bavq import sweep as sweep_mod
from bavq.sweep import main

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT / "configs" / "sweeps" / "fashion_mnist.yaml"


def dry_run(capsys, *args) -> list[list[str]]:
    assert main([*map(str, args), "--dry-run"]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def overrides_of(cmd: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in cmd if "=" in a and not a.startswith("-"))


def test_fashion_mnist_sweep_dry_run(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the sweep's base_config is relative to the repository root
    spec = yaml.safe_load(FMNIST.read_text())
    cmds = dry_run(capsys, FMNIST)
    assert len(cmds) == 6 * 4 * 3
    names = [cmd[cmd.index("--name") + 1] for cmd in cmds]
    assert len(set(names)) == 72 and "fmnist_ba_vq_l2_k16384_s2" in names
    for cmd in cmds:
        assert cmd[1:4] == ["-m", "bavq.train", "--config"] and cmd[4] == spec["base_config"]
        ov = overrides_of(cmd)
        for key, value in spec["overrides"].items():  # shared overrides reach every cell
            assert yaml.safe_load(ov[key]) == value, key
    by_name = {n: overrides_of(c) for n, c in zip(names, cmds)}
    cell = by_name["fmnist_ba_vq_l2_k1024_s1"]
    assert (cell["quantizer.name"], cell["quantizer.entropy_weight"], cell["quantizer.beta_mode"]) == \
        ("ba_vq", "2.0", "adaptive")
    assert (cell["quantizer.num_codes"], cell["train.seed"]) == ("1024", "1")
    assert {c["quantizer.entropy_weight"] for n, c in by_name.items() if "_ba_vq_" in n} == {"0.0", "1.0", "2.0"}
    assert {c["quantizer.num_codes"] for c in by_name.values()} == {"256", "512", "1024", "16384"}
    # BA-VQ uses exactly the init and restart options of the restart baseline
    restart = by_name["fmnist_vq_ema_restart_k256_s0"]
    assert float(restart["quantizer.dead_code_threshold"]) > 0 and restart["quantizer.name"] == "vq_ema"
    for lam in (0, 1, 2):
        ba = by_name[f"fmnist_ba_vq_l{lam}_k256_s0"]
        for key in ("quantizer.init", "quantizer.dead_code_threshold"):
            assert ba[key] == restart[key]
    assert by_name["fmnist_vq_ema_data_k256_s0"]["quantizer.init"] == "data"
    assert by_name["fmnist_vq_ema_k256_s0"]["quantizer.dead_code_threshold"] == "0.0"


def test_filters_and_launcher(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    cmds = dry_run(capsys, FMNIST, "--only-k", 256, 16384, "--seeds", 2, "--launcher",
                   "accelerate launch --multi_gpu --num_processes 2", "--report", "out/rep")
    assert len(cmds) == 6 * 2 * 1 + 1
    assert all(c[:7] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "bavq.train"]
               for c in cmds[:-1])
    assert {overrides_of(c)["quantizer.num_codes"] for c in cmds[:-1]} == {"256", "16384"}
    assert {overrides_of(c)["train.seed"] for c in cmds[:-1]} == {"2"}
    assert cmds[-1] == ["bavq-report", "experiments/sweeps/fashion_mnist/fmnist_*", "--out", "out/rep"]


def write_sweep(tmp_path, **changes) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  max_steps: 10\n")
    spec = {"name": "t", "base_config": str(base), "num_codes": [16, 32], "seeds": [0, 1],
            "overrides": {"train.output_dir": str(tmp_path / "exp"), "data.image_size": 16},
            "variants": {"vq": {"quantizer.name": "vq_ema"},
                         "ba": {"quantizer.name": "ba_vq", "quantizer.entropy_weight": 2}}}
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


REAL_RUN = subprocess.run


def fake_trainer(fail_names: set[str], calls: list[str]):
    """Stands in for subprocess.run: writes a finished run folder, or fails for the named cells; the
    bavq-report run after the cells is real."""
    def run(cmd, stdout=None, stderr=None):
        if cmd[1:3] == ["-m", "bavq.report"]:
            return REAL_RUN(cmd, stdout=stdout, stderr=stderr)
        name = cmd[cmd.index("--name") + 1]
        calls.append(name)
        ov = overrides_of(cmd)
        if name in fail_names:
            stdout.write("Traceback ...\nRuntimeError: boom\n")
            return subprocess.CompletedProcess(cmd, 1)
        run_dir = Path(ov["train.output_dir"]) / name
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(
            {"quantizer": {"name": ov["quantizer.name"], "num_codes": int(ov["quantizer.num_codes"]),
                           "entropy_weight": float(ov.get("quantizer.entropy_weight", 1))},
             "train": {"seed": int(ov["train.seed"]), "name": name}}))
        (run_dir / "final_metrics.json").write_text(json.dumps(
            {"quantizer": ov["quantizer.name"], "num_codes": int(ov["quantizer.num_codes"]),
             "codebook_usage": 0.5, "perplexity": 8.0, "psnr": 20.0, "rfid": None}))
        return subprocess.CompletedProcess(cmd, 0)
    return run


def test_run_continues_after_failure_skips_done_and_reports(tmp_path, capsys, monkeypatch):
    path = write_sweep(tmp_path)
    calls: list[str] = []
    monkeypatch.setattr(sweep_mod.subprocess, "run", fake_trainer({"t_ba_k16_s1"}, calls))
    assert main([str(path), "--report", str(tmp_path / "rep")]) == 1
    assert len(calls) == 8 and calls[-1] == "t_ba_k32_s1"  # the failure did not stop the sweep
    captured = capsys.readouterr()
    assert "1 of 8 cells failed" in captured.err and "t_ba_k16_s1 (exit 1" in captured.err
    assert "RuntimeError: boom" in captured.out  # the failed cell's log tail
    log = tmp_path / "exp" / "sweep_logs" / "t_ba_k16_s1.log"
    assert log.read_text().startswith("$ ") and "-m bavq.train" in log.read_text()
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert len(summary["runs"]) == 7
    # labelled by the sweep file's variant names (bavq-sweep writes RUN/sweep.json)
    assert {(g["variant"], g["num_codes"], g["n"]) for g in summary["groups"]} == {
        ("vq", 16, 2), ("vq", 32, 2), ("ba", 16, 1), ("ba", 32, 2)}

    calls.clear()  # second pass: only the failed cell runs again, and now succeeds
    monkeypatch.setattr(sweep_mod.subprocess, "run", fake_trainer(set(), calls))
    assert main([str(path), "--skip-done"]) == 0
    assert calls == ["t_ba_k16_s1"]
    assert "[6/8] t_ba_k16_s1: ok" in capsys.readouterr().out
    assert main([str(path), "--skip-done", "--dry-run"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("changes, message", [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"seeds": []}, "'seeds' must be a non-empty list of integers"),
    ({"overrides": {"train.seed": 3}}, "may not set 'train.seed'"),
    ({"variants": {"vq": {"quantizer.nam": "vq_ema"}}}, "cell t_vq_k16_s0: config key 'quantizer.nam'"),
    ({"variants": {"vq": {"quantizer.name": "pq"}}}, "'pq' is not one of"),
    ({"base_config": "nowhere.yaml"}, "base_config 'nowhere.yaml' does not exist"),
])
def test_sweep_file_mistakes_are_one_line(tmp_path, capsys, changes, message):
    assert main([str(write_sweep(tmp_path, **changes)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_filter_mistakes_are_one_line(tmp_path, capsys):
    path = write_sweep(tmp_path)
    for args, message in ((["--only-k", "64"], "K 64 is not in"), (["--variants", "pq"], "variant pq"),
                          (["--launcher", "'unbalanced"], "quotation")):
        assert main([str(path), "--dry-run", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_format_value_round_trips_through_omegaconf():
    from omegaconf import OmegaConf

    values = {"a": True, "b": 0.05, "c": [1, 2], "d": "data/x-{000..011}.tar", "e": "yes", "f": "1.5", "g": None}
    dotlist = [f"{k}={sweep_mod.format_value(v)}" for k, v in values.items()]
    assert OmegaConf.to_container(OmegaConf.from_dotlist(dotlist)) == values
