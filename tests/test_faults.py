"""Faults at cluster scale (issue 16): a dead rank, a dead launcher, a second launch of one run,
elastic resume on another world size, signals during evaluation, exit codes through the SLURM
script, teardown after damaged-checkpoint fall-backs, and unreadable shards mid-run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _fake_slurm import job_env, run_script
from test_resume import loss_rows, start_training, wait_for
from test_train import ROOT, make_image_folder, read_jsonl, run_cli, tiny_overrides

from bavq.config import load_config
from bavq.train.checkpoint import checkpoint_step, list_checkpoints
from bavq.train.schedule import lr_at
from bavq.weights import verify_checkpoint

TRAIN = ROOT / "slurm" / "train.sbatch"
ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "images")


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK=")).split(b"=", 1)[1])


def _alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except (FileNotFoundError, StopIteration):
        return False
    return "zombie" not in state


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


# ----------------------------------------------------------------------------- fast: lock, watchdog, data order
HOLD = ("import sys, time; from bavq.train.runlock import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
        "print('held', flush=True); time.sleep(60)")


def test_run_lock_names_the_live_holder_and_dies_with_it(tmp_path):
    from bavq.train.runlock import RunLock, RunLockedError

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"in use by a live run \\(host=.* pid={holder.pid} started="):
            RunLock(tmp_path).acquire(wait_s=0.3)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire(wait_s=0)  # a stale lock file never blocks
    assert f"pid={os.getpid()}" in lock.holder()
    lock.release()


def test_watchdog_names_a_silent_peer_but_not_a_finished_one(monkeypatch):
    from torch.distributed import HashStore

    from bavq.train import watchdog as wd

    fatal = []
    monkeypatch.setattr(wd, "_fatal", lambda message, announce=True: fatal.append(message))
    store = HashStore()
    dog = wd.Watchdog(0, 3, store, interval_s=0.05, timeout_s=0.4, watch_parent=False)
    beating = wd.Watchdog(2, 3, store, interval_s=0.05, timeout_s=60, watch_parent=False).start()  # rank 1 never beats
    dog.start()
    deadline = time.monotonic() + 10
    while not fatal and time.monotonic() < deadline:
        time.sleep(0.05)
    dog.stop(), beating.stop()
    assert fatal and fatal[0].startswith("rank 1 stopped responding"), fatal
    assert store.get("bavq/watchdog/abort").decode() == fatal[0]  # every other rank stops at its next beat
    assert dog.silent_ranks(wait_s=0.2) == [1]  # rank 2 said it was done: not dead
    orphan = wd.Watchdog(0, 1, None, interval_s=0.05, watch_parent=True)
    orphan.parent = -1  # as if the launcher had died and the rank been re-parented
    fatal.clear()
    orphan.start()
    time.sleep(0.3)
    orphan.stop()
    assert fatal and "its launcher (pid -1) is gone" in fatal[0]


def test_map_data_position_survives_a_world_size_change():
    """2 ranks x 4 read 3 global batches, then 1 rank x 6 continues: within the epoch no item is read
    twice and only a tail shorter than the new global batch is dropped; then epoch 1 starts."""
    from bavq.data.loaders import _BatchIndices, advance_position

    n = 50

    def perm(epoch):
        return torch.randperm(n, generator=torch.Generator().manual_seed(epoch))

    def global_batches(world, batch, position, count):
        ranks = [iter(_BatchIndices(SimpleNamespace(num_samples=n, world_size=world, batch_size=batch, rank=r,
                                                    permutation=perm), position)) for r in range(world)]
        return [sum((next(it) for it in ranks), []) for _ in range(count)]

    first = global_batches(2, 4, [0, 0], 3)
    position = [0, 0]
    for _ in range(3):
        position = advance_position(position, n, 8)
    assert position == [0, 24]
    second = global_batches(1, 6, position, 5)
    epoch0 = [i for b in first + second[:4] for e, i in b if e == 0]
    assert len(epoch0) == len(set(epoch0)) == 48 and epoch0 == perm(0)[:48].tolist()
    assert second[4] == [(1, i) for i in perm(1)[:6].tolist()]


def test_shards_deleted_and_truncated_mid_stream_are_skipped_and_counted(tmp_path, caplog):
    from _builders import train_stream
    from test_shards import _cfg, write_shards

    pattern = write_shards(tmp_path / "shards", sizes=[6, 6, 6, 6])
    stream = train_stream(_cfg(pattern), 0, 1)
    batches = stream.iterate()
    for _ in range(3):
        next(batches)
    assert stream.skipped == 0
    (tmp_path / "shards" / "s-000001.tar").unlink()
    truncated = tmp_path / "shards" / "s-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[:1500])
    with caplog.at_level(logging.WARNING, logger="bavq.data.shards"):
        for _ in range(30):
            assert next(batches).shape[0] == 4  # batches stay full
    assert stream.skipped >= 2
    assert "s-000001.tar (unreadable shard skipped)" in caplog.text and "s-000002.tar" in caplog.text


def test_exit_status_file_keeps_a_decided_code_over_a_later_crash(tmp_path, monkeypatch):
    from bavq.exitstatus import write_exit_status

    path = tmp_path / "status"
    monkeypatch.setenv("BAVQ_EXIT_FILE", str(path))
    write_exit_status(2, "config key 'x': bad")
    write_exit_status(1, "rank 1 crashed: RuntimeError: Connection reset by peer")  # the peer of a user error
    assert path.read_text() == "2 config key 'x': bad\n"
    path.unlink()
    write_exit_status(1, "rank 0 crashed")
    write_exit_status(1, "rank 1 died (no heartbeat)")
    assert path.read_text().startswith("1 rank 1 died")


# ----------------------------------------------------------------------------- fast: the SLURM script's branches
FAKE_ACCELERATE = """#!/bin/sh
if [ -n "$FAKE_STATUS" ]; then printf '%s\\n' "$FAKE_STATUS" > "$BAVQ_EXIT_FILE"; fi
exit "$FAKE_RC"
"""


@pytest.mark.parametrize("status, rc, crashes, stale, code, needle, requeued", [
    ("0 finished", 0, 0, False, 0, "training finished (finished)", False),
    ("75 preempted at step 3; checkpoint saved", 1, 0, False, 0, "preempted; checkpoint saved", False),
    ("2 config key 'data.root': /x does not exist", 1, 0, False, 2, "not requeued: the run stopped on a user error",
     False),
    ("", 137, 0, False, 137, "training crashed (exit 137: no exit status", True),
    ("1 rank 1 died (no heartbeat)", 1, 1, False, 1, "rank 1 died (no heartbeat)); requeueing (crash requeue 2", True),
    ("1 rank 1 died (no heartbeat)", 1, 3, False, 1, "not requeued again (BAVQ_MAX_CRASH_REQUEUES=3)", False),
    ("", 1, 0, True, 1, "training crashed (exit 1", True),  # a stale "0" of an earlier attempt is not believed
], ids=["finished", "preempted", "user-error", "killed", "crash-requeued", "crash-limit", "stale-status"])
def test_sbatch_branches_on_the_exit_status(tmp_path, monkeypatch, status, rc, crashes, stale, code, needle,
                                            requeued):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text(FAKE_ACCELERATE)
    (bin_dir / "accelerate").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    exit_file = tmp_path / "exit" / "status"
    exit_file.parent.mkdir()
    if stale:
        exit_file.write_text("0 finished\n")
    if crashes:  # earlier crash requeues of this job (preemptions, in SLURM_RESTART_COUNT, do not count)
        Path(f"{exit_file}.crashes").write_text(f"{crashes}\n")
    env = {**job_env(["n0"], job_id=77), "GPUS_PER_NODE": "1", "SLURM_RESTART_COUNT": "7",
           "BAVQ_EXIT_FILE": str(exit_file), "FAKE_STATUS": status, "FAKE_RC": str(rc),
           "BAVQ_OUTPUT_DIR": str(tmp_path / "runs")}
    run = run_script(TRAIN, env, ["n0"], cwd=ROOT, fakes=("scontrol", "srun"))
    assert run.returncode == code, run.output
    assert needle in run.output
    assert any(c.argv == ["requeue", "77"] for c in run.of("scontrol")) == requeued, run.output
    if requeued:
        assert Path(f"{exit_file}.crashes").read_text().strip() == str(crashes + 1)


# ----------------------------------------------------------------------------- slow: real 2-rank runs
@pytest.mark.slow
def test_killed_rank_ends_the_job_within_the_bound_and_a_relaunch_resumes(image_folder, tmp_path):
    args = tiny_overrides(image_folder, tmp_path, "vq_ema", batch=4, steps=400) + [
        "--name=dead", "train.save_every=2", "train.heartbeat_timeout_s=5"]
    run = tmp_path / "dead"
    proc = start_training(args, nproc=2)
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(loss_rows(run)) >= 3, proc)
    ranks = {_rank_of(pid): pid for pid in _children(proc.pid)}
    os.kill(ranks[1], signal.SIGKILL)
    start = time.time()
    _, err = proc.communicate(timeout=120)
    elapsed = time.time() - start
    assert proc.returncode != 0 and elapsed < 25, (elapsed, err[-3000:])  # bound: heartbeat 5 s + exit; gloo: ~1 s
    assert not _alive(ranks[0])
    lines = _error_lines(err)
    assert lines and lines[0].split("error: ")[1].startswith("rank 1 died (no heartbeat)"), err[-3000:]
    latest = list_checkpoints(run / "checkpoints")[-1]
    assert verify_checkpoint(latest) is None
    step = checkpoint_step(latest)
    again = run_cli([a for a in args if not a.startswith("--max_steps")] + [f"--max_steps={step + 1}"], nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {latest} at step {step}" in again.stderr


@pytest.mark.slow
def test_second_launch_is_refused_and_ranks_of_a_killed_launcher_stop(image_folder, tmp_path):
    args = tiny_overrides(image_folder, tmp_path, "vq_ema", batch=4, steps=400) + ["--name=busy"]
    run = tmp_path / "busy"
    proc = start_training(args, nproc=2)
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(loss_rows(run)) >= 2, proc)
    ranks = {_rank_of(pid): pid for pid in _children(proc.pid)}
    second = run_cli(args + ["train.lock_wait_s=0.5"], timeout=180)
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = _error_lines(second.stderr)
    assert "is in use by a live run" in line and f"pid={ranks[0]} " in line, line
    proc.kill()  # the launcher alone: torchrun's workers live in their own sessions
    start = time.time()
    while any(_alive(pid) for pid in ranks.values()) and time.time() - start < 30:
        time.sleep(0.1)
    elapsed = time.time() - start
    proc.communicate()
    assert not any(_alive(pid) for pid in ranks.values()), "orphaned ranks kept training"
    assert elapsed < 10, elapsed  # bound: the watchdog's 1 s poll + the interpreter's exit
    rows = len(loss_rows(run))
    time.sleep(1.5)
    assert len(loss_rows(run)) == rows  # nobody writes the run any more


@pytest.mark.slow
def test_resume_on_another_world_size_keeps_the_schedule_and_the_samples(image_folder, tmp_path):
    """2 ranks (global batch 8) -> 1 rank (4) -> 2 ranks: the run of 6 x 8 = 48 samples keeps its
    length in samples and its cosine schedule, whose lr at each resumed step is the uninterrupted run's."""
    args = tiny_overrides(image_folder, tmp_path, "vq_ema", batch=4, steps=6) + ["--name=el"]
    for nproc, stop in ((2, 2), (1, 4), (2, 0)):
        proc = run_cli(args + [f"train.stop_at_step={stop}"], nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if nproc == 1:
            assert "keeping its 48 samples and lr schedule" in proc.stderr
    rows = loss_rows(tmp_path / "el")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["samples_seen"] for r in rows] == [8, 16, 20, 24, 32, 40, 48]
    train = load_config(None, ["train.max_steps=6", "train.lr=1e-3"]).train
    before = [0] + [r["samples_seen"] for r in rows[:-1]]
    # the uninterrupted 2-rank run sets lr_at(step, 6) before step `step`, i.e. after step * 8 samples
    assert [r["lr"] for r in rows] == [lr_at(s / 8, 6, 1e-3, train) for s in before]
    assert rows[2]["lr"] == lr_at(2, 6, 1e-3, train) and rows[4]["lr"] == lr_at(3, 6, 1e-3, train)
    final = json.loads((tmp_path / "el" / "final_metrics.json").read_text())
    assert final["samples_seen"] == 48 and final["world_size"] == 2


SLOW_EVAL = r'''
import os, sys, time
from pathlib import Path
from bavq.data import loaders

marker, pause = Path(os.environ["EVAL_MARKER"]), float(os.environ["EVAL_BATCH_SECONDS"])
plain = loaders.MapEvalLoader.__iter__

def slow(self):  # a long evaluation: every batch takes `pause` seconds; the marker counts them
    for i, batch in enumerate(plain(self)):
        marker.write_text(str(i + 1))
        time.sleep(pause)
        yield batch

loaders.MapEvalLoader.__iter__ = slow
from bavq.train.main import main as train_main
sys.exit(train_main(sys.argv[1:], prog="slow-eval"))
'''


@pytest.mark.slow
def test_sigterm_during_a_long_evaluation_saves_within_the_bound(image_folder, tmp_path):
    script, marker = tmp_path / "slow_eval.py", tmp_path / "evaluating"
    script.write_text(SLOW_EVAL)
    args = tiny_overrides(image_folder, tmp_path, "vq_ema", batch=4, steps=4) + [
        "--name=ev", "train.eval_every=2", "eval.batch_size=1"]  # 8 batches per rank x 4 s = 32 s
    env = {**ENV, "EVAL_MARKER": str(marker), "EVAL_BATCH_SECONDS": "4"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # from the 2nd batch on: the 1st also pays for lazy imports (SSIM), which is not what is measured here
    wait_for(lambda: marker.exists() and marker.read_text() == "2", proc)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    start = time.time()
    _, err = proc.communicate(timeout=120)
    elapsed = time.time() - start
    run = tmp_path / "ev"
    assert (run / "PREEMPTED").read_text().strip() == "2", err[-3000:]
    assert verify_checkpoint(run / "checkpoints" / "step_00000002") is None
    assert not any("val/psnr" in r for r in read_jsonl(run / "metrics.jsonl"))  # the evaluation was cut short
    assert elapsed < 20, elapsed  # bound: one evaluation batch (4 s) + the save + exit; the rest of the eval: 24 s


TEARDOWN = r'''
import json, os, socket, sys
from pathlib import Path

import accelerate.checkpointing, safetensors.torch, yaml  # noqa: F401,E401 - import once, before forking:
import bavq.data.sources, bavq.train.trainer  # noqa: F401,E401 - the runs should pay for the run, not imports
from bavq.train.main import main as train_main
from bavq.train.checkpoint import list_checkpoints

args, root, runs = json.loads(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])


def launch(argv):
    """Two ranks forked from here; each leaves through the real interpreter exit (C++ teardown included)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pids = []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            sys.exit(train_main(argv))
        pids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


def damage(folder):
    victim = max((p for p in folder.rglob("*") if p.is_file() and p.name != "MANIFEST.json"),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


results = [launch(args)]
for i in range(runs):
    latest = list_checkpoints(root)[-1]
    damage(latest)
    if i % 5 == 4:  # an explicit resume of the damaged one: refused (exit 2), also without an abort
        results.append(launch(args + [f"--resume={latest}"]))
    else:  # auto: falls back to step 1, trains one step, saves step 2 again, stops there (exit 0)
        results.append(launch(args))
print("RESULTS " + json.dumps(results), flush=True)
'''


@pytest.mark.slow
def test_twenty_fallbacks_from_damaged_checkpoints_end_without_an_abort(image_folder, tmp_path):
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN)
    # each run tiny: 1 step, 1 save, no final evaluation (stop_at_step), 2 ranks forked from one process
    args = tiny_overrides(image_folder, tmp_path, "vq_ema", batch=4, steps=3) + [
        "--name=fb", "train.save_every=1", "train.stop_at_step=2"]
    runs = 20
    proc = subprocess.run([sys.executable, str(script), json.dumps(args), str(tmp_path / "fb" / "checkpoints"),
                           str(runs)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "RESULTS" in proc.stdout, out[-3000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    expected = [[0, 0]] + [[2, 2] if i % 5 == 4 else [0, 0] for i in range(runs)]
    assert results == expected, out[-3000:]
    assert "terminate called" not in out and out.count("skipping damaged checkpoint") == runs - runs // 5


# ----------------------------------------------------------------------------- slow: every shard unreadable
@pytest.mark.slow
def test_a_run_whose_every_shard_is_unreadable_stops_with_one_line(tmp_path):
    from test_shards import write_shards

    pattern = write_shards(tmp_path / "shards", sizes=[4, 4])
    for tar in (tmp_path / "shards").glob("*.tar"):
        tar.write_bytes(b"not a tar file " * 64)
    args = ["--quantizer=vq_ema", "--codebook_size=16", "--max_steps=3", "--no_wandb", "--name=bad",
            f"train.output_dir={tmp_path}", "data.source=shards", f"data.train_shards={pattern}",
            f"data.val_shards={pattern}", "data.num_workers=0", "data.image_size=16", "data.channels=1",
            "model.in_channels=1", "model.base_channels=16", "model.num_res_blocks=1", "quantizer.code_dim=8",
            "train.batch_size=2", "log.tensorboard=false", "log.progress=false"]
    proc = run_cli(args, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _error_lines(proc.stderr)
    assert "no training shard is readable" in line and "bavq-prep verify" in line
    assert "Traceback" not in proc.stderr

