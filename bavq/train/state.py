"""Resumable trainer state and the preemption flag."""

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

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "wall_seconds": self.wall_seconds,
                "corrupt_skipped": self.corrupt_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.wall_seconds = float(state["wall_seconds"])
        self.corrupt_skipped = int(state.get("corrupt_skipped", 0))


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
