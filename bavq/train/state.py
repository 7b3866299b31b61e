"""Resumable trainer state, the preemption flag and interruptible evaluation."""

from __future__ import annotations

import signal

import torch


class TrainState:
    """Everything about the loop's progress that a checkpoint must carry (registered with
    ``accelerator.register_for_checkpointing``, so it travels inside the save_state folder)."""

    def __init__(self):
        self.step = 0  # optimizer steps done
        self.samples_seen = 0  # images consumed by all ranks together
        self.wall_seconds = 0.0  # training time summed over resumed segments
        self.corrupt_skipped = 0  # corrupt samples skipped by the data stream (all ranks)
        # The run's plan, fixed when it starts so a resume on another world size keeps it (the
        # rule: the number of samples is kept; the lr follows samples_seen / start_global_batch):
        self.total_samples = 0  # images the whole run trains on (0: not planned yet / old checkpoint)
        self.planned_steps = 0  # its length in steps of the starting global batch (the lr schedule's length)
        self.start_global_batch = 0  # images per step when the plan was made
        self.length_setting = ""  # the config that set the length; a change on resume re-plans
        self.data_position: list[int] | None = None  # map-style data: [epoch, offset] of the next batch

    def schedule_step(self) -> float:
        """The step of the lr schedule: steps of the starting global batch done (== step when the
        world size never changed)."""
        return self.samples_seen / self.start_global_batch if self.start_global_batch else float(self.step)

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "wall_seconds": self.wall_seconds,
                "corrupt_skipped": self.corrupt_skipped, "total_samples": self.total_samples,
                "planned_steps": self.planned_steps, "start_global_batch": self.start_global_batch,
                "length_setting": self.length_setting, "data_position": self.data_position}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.wall_seconds = float(state["wall_seconds"])
        self.corrupt_skipped = int(state.get("corrupt_skipped", 0))
        self.total_samples = int(state.get("total_samples", 0))
        self.planned_steps = int(state.get("planned_steps", 0))
        self.start_global_batch = int(state.get("start_global_batch", 0))
        self.length_setting = str(state.get("length_setting", ""))
        position = state.get("data_position")
        self.data_position = [int(v) for v in position] if position is not None else None


class PreemptionFlag:
    """SIGUSR1 / SIGTERM only set a flag; the loop checks it (agreed across ranks) at a step
    boundary, saves and exits. A second signal while saving changes nothing but a counter, so the
    checkpoint being written is never interrupted half-way by our own handler."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.count = 0
        self.signal_name = ""
        self._previous = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.count += 1
        self.signal_name = signal.Signals(signum).name


def tensor_checksum(t: torch.Tensor) -> float:
    """A position-sensitive checksum (a plain sum misses permuted rows), computed on ``t``'s device
    (one host sync for the result)."""
    flat = t.detach().double().flatten()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device) % 997 + 1
    return float((flat * weights).sum())


class EvalInterrupted(Exception):
    """A preemption signal arrived during an evaluation; every rank raised it at the same batch."""


def interruptible(loader, requested):
    """Yield ``loader``'s batches until every rank is done, or raise EvalInterrupted on every rank
    as soon as ``requested()`` is true on one (checked between batches, agreed across ranks).

    Ranks may hold different numbers of evaluation batches, so a rank that has run out keeps joining
    the two tiny all-reduces until all are done (the "join" pattern); the bound on honouring a signal
    is one evaluation batch."""
    from bavq import dist

    batches = iter(loader)
    while True:
        if dist.any_rank(bool(requested())):
            raise EvalInterrupted("preemption signal during evaluation")
        batch = next(batches, None)
        if not dist.any_rank(batch is not None):
            return
        if batch is not None:
            yield batch
