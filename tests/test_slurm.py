"""SLURM templates and launch files: the real sbatch scripts run under fake scontrol/srun/accelerate/
bavq-prep (tests/_fake_slurm.py), the exact command each node would run, accelerate's own parsing of
the config files, and one real 2-"node" launch on localhost that checks the SIGUSR1 set-up end to end."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import _fake_slurm
import pytest
from _fake_slurm import array_task_env, job_env, run_script

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "slurm" / "train.sbatch"
PREP = ROOT / "slurm" / "prep_shards.sbatch"
ACC = ROOT / "launch" / "accelerate"
HOSTS = ["gpu-a01", "gpu-a02"]
DEFAULT_CONFIG = "configs/imagenet_vqgan_f16_k16384_ba_vq.yaml"


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _by_node(run) -> list:
    return sorted(run.of("accelerate"), key=lambda c: c.node)


# ----------------------------------------------------------------------------- train.sbatch
@pytest.mark.parametrize("script", [TRAIN, PREP], ids=lambda p: p.name)
def test_scripts_parse_with_bash_n(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_two_node_launch_commands_are_exact():
    env = {**job_env(HOSTS, job_id=123456, gpus_on_node=4), "BAVQ_CONFIG": "configs/cifar10_ba_vq_k512.yaml",
           "BAVQ_NAME": "ba run", "BAVQ_EXTRA": "train.max_steps=5  data.num_workers=3"}
    run = run_script(TRAIN, env, HOSTS, cwd=ROOT)
    assert run.returncode == 0, run.output
    assert [c.argv for c in run.of("scontrol")] == [["show", "hostnames", "gpu-a01,gpu-a02"]]
    (srun,) = run.of("srun")
    assert {"--nodes=2", "--ntasks-per-node=1"} <= set(srun.argv)
    calls = _by_node(run)
    assert [c.node for c in calls] == [0, 1]
    for node, call in enumerate(calls):
        assert call.argv == [
            "accelerate", "launch", "--config_file", "launch/accelerate/multi_node.yaml", "--num_machines", "2",
            "--machine_rank", str(node),  # each node read its own \$SLURM_NODEID
            "--num_processes", "8", "--main_process_ip", "gpu-a01", "--main_process_port", str(20000 + 123456 % 20000),
            "-m", "bavq.train", "--config", "configs/cifar10_ba_vq_k512.yaml", "--name", "ba run", "train.backend=ddp",
            "train.max_steps=5", "data.num_workers=3"]
        assert call.usr1_ignored, "the launcher must start with SIGUSR1 ignored (trap '' USR1; exec ...)"


@pytest.mark.parametrize("backend, nodes, gpus, expected", [
    ("ddp", 1, 1, "1gpu.yaml"),
    ("ddp", 1, 4, "multi_gpu.yaml"),
    ("ddp", 3, 2, "multi_node.yaml"),
    ("deepspeed", 1, 1, "deepspeed_zero2.yaml"),
    ("deepspeed", 2, 8, "deepspeed_zero2.yaml"),
])
def test_backend_picks_the_accelerate_config(backend, nodes, gpus, expected):
    hosts = [f"n{i}" for i in range(nodes)]
    env = {**job_env(hosts, job_id=77), "GPUS_PER_NODE": str(gpus), "BAVQ_BACKEND": backend}
    run = run_script(TRAIN, env, hosts, cwd=ROOT)
    assert run.returncode == 0, run.output
    calls = _by_node(run)
    assert len(calls) == nodes
    for call in calls:
        assert call.argv == [
            "accelerate", "launch", "--config_file", f"launch/accelerate/{expected}", "--num_machines", str(nodes),
            "--machine_rank", str(call.node), "--num_processes", str(nodes * gpus), "--main_process_ip", "n0",
            "--main_process_port", str(20000 + 77), "-m", "bavq.train", "--config", DEFAULT_CONFIG,
            "--name", "imagenet_vqgan_f16_k16384_ba_vq", f"train.backend={backend}",
            *(["train.deepspeed_config=launch/deepspeed/zero2.json"] if backend == "deepspeed" else [])]


def test_defaults_come_from_slurm_and_the_imagenet_config():
    env = job_env(HOSTS, job_id=5, gpus_on_node=2)
    (first, _) = _by_node(run_script(TRAIN, env, HOSTS, cwd=ROOT))
    assert _flag(first.argv, "--num_processes") == "4"  # SLURM_GPUS_ON_NODE when GPUS_PER_NODE is unset
    assert _flag(first.argv, "--config") == DEFAULT_CONFIG
    assert _flag(first.argv, "--name") == "imagenet_vqgan_f16_k16384_ba_vq"
    assert (ROOT / DEFAULT_CONFIG).is_file()


def test_unknown_backend_is_a_one_line_error():
    run = run_script(TRAIN, {**job_env(HOSTS), "BAVQ_BACKEND": "fsdp"}, HOSTS, cwd=ROOT)
    assert run.returncode == 2
    assert "BAVQ_BACKEND must be ddp or deepspeed, got 'fsdp'" in run.output
    assert not run.of("srun") and not run.of("accelerate")


@pytest.mark.parametrize("step_code, script_code, message", [
    (0, 0, "training finished"),
    (75, 0, "preempted"),
    (1, 1, "training crashed (exit 1"),  # no exit status from the trainer: a crash, requeued
])
def test_exit_code_of_the_step(step_code, script_code, message):
    run = run_script(TRAIN, job_env(HOSTS), HOSTS, exit_code=step_code, cwd=ROOT)
    assert run.returncode == script_code
    assert message in run.output


def test_launch_command_is_accepted_by_accelerate_and_bavq_train(monkeypatch):
    """The exact argv the script gives node 1 goes through accelerate's launch parser + validation
    (which loads the config file) and the trainer's command line + config loading."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    from bavq.config import load_config
    from bavq.train.main import _train_overrides, train_parser

    monkeypatch.chdir(ROOT)
    for backend in ("ddp", "deepspeed"):
        env = {**job_env(HOSTS, gpus_on_node=8), "BAVQ_BACKEND": backend, "BAVQ_EXTRA": "train.max_steps=7"}
        run = run_script(TRAIN, env, HOSTS, cwd=ROOT)
        assert run.returncode == 0, run.output
        argv = _by_node(run)[1].argv
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv[2:]))
        assert (args.num_machines, int(args.machine_rank), args.num_processes) == (2, 1, 16)
        assert (args.main_process_ip, args.mixed_precision) == ("gpu-a01", "no")
        assert args.use_deepspeed == (backend == "deepspeed") and args.multi_gpu == (backend == "ddp")
        if backend == "deepspeed":
            assert args.deepspeed_multinode_launcher == "standard"  # one launcher per node, no pdsh/ssh
            assert args.deepspeed_config_file == "launch/deepspeed/zero2.json"
        cfg = load_config(*_cli_config(train_parser, _train_overrides, args.training_script_args))
        assert (cfg.train.backend, cfg.train.max_steps) == (backend, 7)
        assert cfg.train.name == "imagenet_vqgan_f16_k16384_ba_vq"
        # the trainer reads the same DeepSpeed JSON the accelerate file names
        assert cfg.train.deepspeed_config == ("launch/deepspeed/zero2.json" if backend == "deepspeed" else "")


def _cli_config(train_parser, train_overrides, script_args):
    parsed = train_parser().parse_args(script_args)
    return parsed.config, train_overrides(parsed)


# ----------------------------------------------------------------------------- accelerate / DeepSpeed files
@pytest.mark.parametrize("name, dist_type, processes", [
    ("1gpu.yaml", "NO", 1), ("multi_gpu.yaml", "MULTI_GPU", 8),
    ("multi_node.yaml", "MULTI_GPU", -1), ("deepspeed_zero2.yaml", "DEEPSPEED", 8),
])
def test_accelerate_config_files_load(name, dist_type, processes):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(str(ACC / name))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type.value == dist_type and cfg.num_processes == processes
    assert cfg.gpu_ids == "all"  # never override the CUDA_VISIBLE_DEVICES SLURM sets


def test_multi_node_file_refuses_to_start_without_num_processes(monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.chdir(ROOT)
    args = launch_command_parser().parse_args(["--config_file", "launch/accelerate/multi_node.yaml", "x.py"])
    with pytest.raises(ValueError, match="num_processes"):
        _validate_launch_command(args)


def test_deepspeed_files_build_zero2_plugins_under_the_launchers_environment(monkeypatch):
    """What `accelerate launch --config_file deepspeed_zero2.yaml` exports must not make the
    trainer's own plugins (built from launch/deepspeed/*.json) fail accelerate's conflict check."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    from bavq.config import load_config
    from bavq.train.deepspeed_backend import load_deepspeed_json, resolved_deepspeed_dict

    monkeypatch.chdir(ROOT)
    args = launch_command_parser().parse_args(
        ["--config_file", "launch/accelerate/deepspeed_zero2.yaml", "--num_processes", "2", "x.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    args.main_process_port = 0  # a free port: the launcher checks that its port is unused
    _, launcher_env = prepare_deepspeed_cmd_env(args)
    assert launcher_env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == "launch/deepspeed/zero2.json"
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_CONFIG_DS_FIELDS", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
                "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.setenv(key, launcher_env[key])
    cfg = load_config(None, ["train.backend=deepspeed", "train.max_steps=1", "train.mixed_precision=bf16"])
    for name in ("zero2.json", "zero2_disc.json"):
        path = ROOT / "launch" / "deepspeed" / name
        raw = json.loads(path.read_text())
        assert raw["zero_optimization"]["stage"] == 2 and raw["gradient_clipping"] == 1.0
        assert raw["train_micro_batch_size_per_gpu"] == "auto" and raw["bf16"]["enabled"] == "auto"
        plugin = DeepSpeedPlugin(hf_ds_config=resolved_deepspeed_dict(cfg, load_deepspeed_json(str(path))))
        assert (plugin.zero_stage, plugin.gradient_clipping) == (2, 1.0)
        assert plugin.deepspeed_config["bf16"] == {"enabled": True}


# ----------------------------------------------------------------------------- prep_shards.sbatch
def _prep_env(task: int, task_max: int, **extra) -> dict:
    return {**array_task_env(task, task_max), "PREP_INPUT": "/data/in", "PREP_OUTPUT": "/data/out", **extra}


def test_array_tasks_get_their_part():
    for task in range(3):
        run = run_script(PREP, _prep_env(task, 2), cwd=ROOT)
        assert run.returncode == 0, run.output
        (call,) = run.of("bavq-prep")
        assert call.argv[:8] == ["bavq-prep", "write", "--source", "image_folder", "--input", "/data/in",
                                 "--output", "/data/out"]
        assert call.argv[-4:] == ["--part", str(task), "--num_parts", "3"]


def test_rerun_of_one_index_keeps_its_part_and_bad_indices_are_refused():
    run = run_script(PREP, _prep_env(5, 5, PREP_NUM_PARTS="8"), cwd=ROOT)  # sbatch --array=5
    assert run.of("bavq-prep")[0].argv[-4:] == ["--part", "5", "--num_parts", "8"]
    run = run_script(PREP, _prep_env(5, 5, PREP_NUM_PARTS="4"), cwd=ROOT)
    assert run.returncode == 2 and "outside 0..3" in run.output and not run.of("bavq-prep")
    run = run_script(PREP, {**array_task_env(0, 1), "PREP_OUTPUT": "/o"}, cwd=ROOT)
    assert run.returncode != 0 and "PREP_INPUT" in run.output and not run.of("bavq-prep")


def test_array_tasks_write_disjoint_shards_that_together_are_complete(tmp_path):
    """Each fake array task's recorded bavq-prep command, run for real: disjoint, complete shards."""
    from PIL import Image

    from bavq import prep

    src, out = tmp_path / "images", tmp_path / "shards"
    for i in range(9):
        (src / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(src / f"c{i % 2}" / f"{i}.png")
    seen: list[set[str]] = []
    for task in range(3):
        env = {**array_task_env(task, 2), "PREP_INPUT": str(src), "PREP_OUTPUT": str(out),
               "PREP_ARGS": "--samples_per_shard 2 --workers 0 --no-progress --val_fraction 0"}
        (call,) = run_script(PREP, env, cwd=ROOT).of("bavq-prep")
        before = set(p.name for p in out.glob("*.tar"))
        assert prep.main(call.argv[1:]) == 0
        seen.append(set(p.name for p in out.glob("*.tar")) - before)
    assert seen == [{"train-000000.tar", "train-000003.tar"}, {"train-000001.tar", "train-000004.tar"},
                    {"train-000002.tar"}]
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == 9


def test_dry_run_cli_prints_one_command_per_node(capsys):
    assert _fake_slurm.main(["train", "--nodes", "2", "BAVQ_BACKEND=deepspeed", "BAVQ_NAME=x"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["node 0", "node 1"]
    assert "--machine_rank 1" in lines[1] and "deepspeed_zero2.yaml" in lines[1]


# ----------------------------------------------------------------------------- a real 2-node launch
PROBE = r'''
import json, os, signal, sys, time

# No torch here (it would double the test's time): the launchers' own rendezvous through the
# head's store is what assigns RANK / WORLD_SIZE / GROUP_RANK below.
inherited_ignore = signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))  # what the trainer does: a flag, no exit
launcher = os.getppid()
os.kill(launcher, signal.SIGUSR1)  # SLURM's --signal reaches the launcher too
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.5)
row = {key: os.environ[key] for key in ("RANK", "WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")}
row.update(inherited_ignore=inherited_ignore, handled=bool(got), launcher_alive=os.getppid() == launcher,
           argv=sys.argv[1:])
with open(os.path.join(os.environ["PROBE_OUT"], "rank%s.json" % row["RANK"]), "w") as f:
    json.dump(row, f)
sys.exit(75)  # "preempted"
'''


@pytest.mark.slow
def test_real_two_node_launch_on_localhost_survives_sigusr1(tmp_path):
    """train.sbatch with only scontrol/srun faked: the real accelerate launch on two localhost
    "nodes" rendezvous through the head, each rank starts with SIGUSR1 ignored, replaces that with
    its own handler, and a SIGUSR1 sent to the launcher does not kill it."""
    (tmp_path / "bavq" / "train").mkdir(parents=True)  # `-m bavq.train` finds this probe first (cwd)
    (tmp_path / "bavq" / "__init__.py").write_text("")
    (tmp_path / "bavq" / "train" / "__init__.py").write_text("")
    (tmp_path / "bavq" / "train" / "__main__.py").write_text(PROBE)
    (tmp_path / "launch").symlink_to(ROOT / "launch")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**job_env(["127.0.0.1", "localhost"], job_id=9), "GPUS_PER_NODE": "1", "BAVQ_PORT": str(port),
           "BAVQ_PROJECT": str(tmp_path), "BAVQ_VENV": str(Path(sys.executable).parent.parent),
           "PROBE_OUT": str(tmp_path), "BAVQ_NAME": "probe"}
    run = run_script(TRAIN, env, ["127.0.0.1", "localhost"], fakes=("scontrol", "srun"), timeout=120)
    rows = sorted((json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["RANK"])
    assert len(rows) == 2, run.output[-3000:]
    for rank, row in enumerate(rows):
        assert (row["RANK"], row["WORLD_SIZE"], row["GROUP_RANK"]) == (str(rank), "2", str(rank))
        assert (row["MASTER_ADDR"], row["MASTER_PORT"]) == ("127.0.0.1", str(port))
        assert row["inherited_ignore"] and row["handled"] and row["launcher_alive"], row
        assert row["argv"][-3:] == ["--name", "probe", "train.backend=ddp"]
    # accelerate launch 1.15 reports a rank's exit code 75 as 1; a launcher killed by SIGUSR1 would give 138
    assert run.returncode in (0, 1), run.output[-3000:]
