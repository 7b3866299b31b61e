"""bavq-sweep: run a grid of training runs (variant x K x seed) described by a sweep YAML.

A sweep file (see configs/sweeps/fashion_mnist.yaml) names a base config, overrides shared by every
cell, the grid (``num_codes``, ``seeds``) and the variants (each a mapping of ``key.sub: value``
overrides). Each cell becomes one command,
``python -m bavq.train --config BASE --name NAME_variant_kK_sS key=value ...`` (or the same module
under a launcher such as ``accelerate launch --multi_gpu --num_processes 2``). Cells run one after
another; a failed cell does not stop the sweep, and the failures are listed at the end. Every cell's
config is resolved and validated before anything runs, so a typo fails in one line, not an hour in.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bavq.config import ConfigError, load_config

TOP_KEYS = {"name", "base_config", "num_codes", "seeds", "overrides", "variants", "options"}
RESERVED = ("quantizer.num_codes", "train.seed", "train.name")  # set by the grid, per cell
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class SweepError(ValueError):
    """A mistake in a sweep file or in the command line; the message is one line."""


@dataclass
class Sweep:
    """A parsed sweep file."""

    path: Path
    name: str
    base_config: Path
    num_codes: list[int]
    seeds: list[int]
    overrides: dict  # shared by every cell
    variants: dict[str, dict]  # variant name -> overrides


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    name: str  # train.name
    variant: str
    num_codes: int
    seed: int
    overrides: tuple[str, ...]  # key=value: shared, then variant, then K and seed
    run_dir: Path  # train.output_dir / name, as the trainer will write it

    @property
    def done(self) -> bool:
        return (self.run_dir / "final_metrics.json").is_file()


def _ints(value, key: str, where: Path) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
        raise SweepError(f"{where}: '{key}' must be a non-empty list of integers")
    return value


def _overrides(value, key: str, where: Path) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{where}: '{key}' must be a mapping of key.sub: value")
    for k in value:
        if k in RESERVED:
            raise SweepError(f"{where}: '{key}' may not set '{k}'; the grid sets it for each cell")
        if not isinstance(k, str) or "=" in k or not k.strip():
            raise SweepError(f"{where}: '{key}' has a bad config key {k!r}")
    return value


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; raises SweepError with a one-line message."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError:
        raise SweepError(f"sweep file '{path}' cannot be read") from None
    except yaml.YAMLError as exc:
        raise SweepError(f"sweep file '{path}': {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SweepError(f"sweep file '{path}' must hold a mapping")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(TOP_KEYS))})")
    for key in ("name", "base_config", "num_codes", "seeds", "variants"):
        if key not in data:
            raise SweepError(f"{path}: missing key '{key}'")
    if not isinstance(data["name"], str) or not _NAME.match(data["name"]):
        raise SweepError(f"{path}: 'name' must be letters, digits, '_', '-' or '.'")
    variants = data["variants"]
    if not isinstance(variants, dict) or not variants:
        raise SweepError(f"{path}: 'variants' must be a non-empty mapping of name -> overrides")
    for v in variants:
        if not isinstance(v, str) or not _NAME.match(v):
            raise SweepError(f"{path}: variant name {v!r} must be letters, digits, '_', '-' or '.'")
    base = Path(str(data["base_config"]))
    if not base.is_file():
        raise SweepError(f"{path}: base_config '{base}' does not exist (paths are relative to the working "
                         "directory, normally the repository root)")
    return Sweep(path, data["name"], base, _ints(data["num_codes"], "num_codes", path),
                 _ints(data["seeds"], "seeds", path), _overrides(data.get("overrides"), "overrides", path),
                 {v: _overrides(o, f"variants.{v}", path) for v, o in variants.items()})


def format_value(value) -> str:
    """A value as OmegaConf's dotlist parser (YAML) reads it back unchanged."""
    if isinstance(value, str):
        return value if yaml.safe_load(value) == value and value.strip() == value else json.dumps(value)
    return json.dumps(value)  # numbers, booleans (true/false), null and lists are valid YAML flow


def _pick(values: list | None, grid: list, what: str) -> list:
    if values is None:
        return list(grid)
    missing = [v for v in values if v not in grid]
    if missing:
        raise SweepError(f"{what} {missing[0]} is not in the sweep's {what} list {grid}")
    return [v for v in grid if v in values]


def make_cells(sweep: Sweep, only_k: list[int] | None = None, seeds: list[int] | None = None,
               variants: list[str] | None = None) -> list[Cell]:
    """The grid's cells (variant-major, then K, then seed), optionally restricted; each cell's config
    is resolved with bavq.config.load_config, so bad keys or values fail here with ConfigError's line."""
    cells = []
    for variant in _pick(variants, list(sweep.variants), "variant"):
        for k in _pick(only_k, sweep.num_codes, "K"):
            for seed in _pick(seeds, sweep.seeds, "seed"):
                name = f"{sweep.name}_{variant}_k{k}_s{seed}"
                items = {**sweep.overrides, **sweep.variants[variant], "quantizer.num_codes": k, "train.seed": seed}
                overrides = tuple(f"{key}={format_value(v)}" for key, v in items.items())
                try:
                    cfg = load_config(sweep.base_config, [*overrides, f"train.name={name}"])
                except ConfigError as exc:
                    raise SweepError(f"cell {name}: {exc}") from None
                cells.append(Cell(name, variant, k, seed, overrides, Path(cfg.train.output_dir) / name))
    return cells


def cell_command(cell: Cell, base_config: Path, launcher: str | None = None) -> list[str]:
    """The command that trains one cell: this Python's ``-m bavq.train``, or the launcher's ``-m``
    (accelerate launch and torchrun both run a module with ``-m``)."""
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    return [*prefix, "-m", "bavq.train", "--config", str(base_config), "--name", cell.name, *cell.overrides]


def run_cell(cell: Cell, command: list[str]) -> tuple[int, Path]:
    """Run one cell with its console output in OUTPUT_DIR/sweep_logs/NAME.log; (exit code, log path)."""
    log = cell.run_dir.parent / "sweep_logs" / f"{cell.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        try:
            code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode
        except OSError as exc:  # launcher not found: a failed cell, like any other
            f.write(f"{exc}\n")
            code = 127
    return code, log


def mark_cell(cell: Cell) -> None:
    """Write RUN/sweep.json (the sweep variant's name, K, seed) into a finished cell's run folder:
    bavq-report labels the run with the variant's short name instead of a list of config keys."""
    path = cell.run_dir / "sweep.json"
    if cell.done and not path.exists():
        path.write_text(json.dumps({"variant": cell.variant, "num_codes": cell.num_codes, "seed": cell.seed,
                                    "cell": cell.name}) + "\n")


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return "\n".join("    " + line for line in text[-lines:])


def _announce(cells: list[Cell], skip_done: bool) -> None:
    """Say up front what will run and where each cell's console output goes."""
    todo = sum(not (skip_done and c.done) for c in cells)
    logs = sorted({str(c.run_dir.parent / "sweep_logs") for c in cells})
    print(f"bavq-sweep: {todo} of {len(cells)} cells to run, one after another; each cell's console output "
          f"goes to {', '.join(logs)}/NAME.log (follow one with tail -f)", flush=True)


def run_sweep(cells: list[Cell], base_config: Path, launcher: str | None, skip_done: bool) -> list[str]:
    """Run the cells in order, skipping finished ones when asked; returns one line per failed cell."""
    from bavq.progress import format_duration

    failures, spent, ran = [], 0.0, 0
    _announce(cells, skip_done)
    todo = [c for c in cells if not (skip_done and c.done)]
    for i, cell in enumerate(cells, 1):
        head = f"[{i}/{len(cells)}] {cell.name}"
        if skip_done and cell.done:
            mark_cell(cell)
            print(f"{head}: done already, skipped", flush=True)
            continue
        print(f"{head}: running (log {cell.run_dir.parent / 'sweep_logs' / (cell.name + '.log')})", flush=True)
        start = time.time()
        code, log = run_cell(cell, cell_command(cell, base_config, launcher))
        spent, ran = spent + time.time() - start, ran + 1
        left = len(todo) - ran
        eta = f"; about {format_duration(spent / ran * left)} left for {left} cells" if left else ""
        if code == 0 and cell.done:
            mark_cell(cell)
            print(f"{head}: ok ({time.time() - start:.0f} s{eta})", flush=True)
            continue
        why = f"exit {code}" if code else "exit 0 but no final_metrics.json"
        if code == 75:
            why += ", preempted: rerun to resume"
        failures.append(f"{cell.name} ({why}; log {log})")
        print(f"{head}: FAILED ({why}{eta}); last lines of {log}:\n{_tail(log)}", flush=True)
    return failures


def sweep_parser():
    from bavq.cli import OneLineParser

    p = OneLineParser(prog="bavq-sweep", description="Run a sweep file's grid of training runs, then "
                      "optionally bavq-report on them.")
    p.add_argument("sweep", help="sweep YAML (configs/sweeps/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the commands (one per line) and exit")
    p.add_argument("--only-k", type=int, nargs="+", metavar="K", help="run only these codebook sizes")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S", help="run only these seeds")
    p.add_argument("--variants", nargs="+", metavar="V", help="run only these variants")
    p.add_argument("--launcher", help='prefix that runs the module, e.g. "accelerate launch --multi_gpu '
                   '--num_processes 2" or "torchrun --standalone --nproc_per_node 2"; default: this python')
    p.add_argument("--skip-done", action="store_true", help="skip cells whose final_metrics.json exists")
    p.add_argument("--report", metavar="OUT", help="afterwards, run bavq-report on the finished cells into OUT")
    return p


def _print_dry_run(cells: list[Cell], sweep: Sweep, args) -> None:
    for cell in cells:
        if args.skip_done and cell.done:
            print(f"bavq-sweep: {cell.name} is done, skipped", file=sys.stderr)
        else:
            print(shlex.join(cell_command(cell, sweep.base_config, args.launcher)), flush=True)
    if args.report:  # quoted globs: bavq-report expands them when the runs exist
        globs = dict.fromkeys(str(c.run_dir.parent / f"{sweep.name}_*") for c in cells)
        print(shlex.join(["bavq-report", *globs, "--out", args.report]), flush=True)


def main(argv: list[str] | None = None) -> int:
    """``bavq-sweep SWEEP.yaml [...]``: 0 when every cell succeeded, 1 when some failed, 2 on a mistake."""
    from bavq.cli import fail

    args = sweep_parser().parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        cells = make_cells(sweep, args.only_k, args.seeds, args.variants)
        if args.launcher is not None and not shlex.split(args.launcher):
            raise SweepError("--launcher is empty")
    except (SweepError, ValueError) as exc:  # shlex raises ValueError on unbalanced quotes
        return fail("bavq-sweep", str(exc).splitlines()[0])
    if args.dry_run:
        try:
            _print_dry_run(cells, sweep, args)
        except BrokenPipeError:  # `bavq-sweep ... --dry-run | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    try:
        failures = run_sweep(cells, sweep.base_config, args.launcher, args.skip_done)
    except KeyboardInterrupt:  # the cell's processes got the same Ctrl-C; its checkpoints stay
        print("bavq-sweep: interrupted; rerun with --skip-done to continue", file=sys.stderr)
        return 130
    status = 0
    if args.report:  # bavq-report is another application: run it as one, like the cells
        finished = [str(c.run_dir) for c in cells if c.done]
        status = subprocess.run([sys.executable, "-m", "bavq.report", *finished, "--out", args.report]).returncode \
            if finished else fail("bavq-sweep", "no finished cells to report on")
    if failures:
        print(f"bavq-sweep: {len(failures)} of {len(cells)} cells failed:\n  " + "\n  ".join(failures),
              file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
