"""Run a bavq entry point with two device checks that a CPU machine can fail (tests/test_devices.py).

On a GPU the default device (CPU) differs from the device the model and NCCL use (CUDA); on this
CPU machine they coincide, so a tensor created without a device would pass unnoticed. This probe
makes them differ: while the training loop, the final evaluation or ``evaluate_model`` runs, every
tensor factory called from bavq code (tests and the host-side data pipeline excepted) without an
explicit ``device`` creates a *meta* tensor. Such a tensor fails as soon as it meets a real one (as
a CPU tensor meets a CUDA one on a GPU) or reaches a collective (``bavq.dist`` checks every
collective's tensor against ``dist.comm_device()``). Every collective is recorded and written to
``$BAVQ_PROBE_OUT/rank<R>.json``.

Usage: python tests/_device_probe.py train|eval ARGS...   (also under torch.distributed.run)
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import bavq

BAVQ_DIR = str(Path(bavq.__file__).resolve().parent)
HOST_SIDE = (os.path.join(BAVQ_DIR, "data") + os.sep,)  # decoding and batching images is CPU work by design
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.linspace, torch.randn, torch.rand, torch.randint, torch.randperm, torch.eye}
trapped: set[str] = set()


def _bavq_caller() -> str | None:
    frame = sys._getframe(2)
    skip = (TORCH_DIR, __file__)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame = frame.f_back
    if frame is None:
        return None
    name = frame.f_code.co_filename
    if name.startswith(BAVQ_DIR) and not name.startswith(HOST_SIDE):
        return f"{os.path.relpath(name, BAVQ_DIR)}:{frame.f_lineno}"
    return None


class ImplicitDeviceTrap(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in FACTORIES and kwargs.get("device") is None:
            where = _bavq_caller()
            if where is not None:
                trapped.add(where)
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def trapped_call(fn):
    def wrapper(*args, **kwargs):
        with ImplicitDeviceTrap():
            return fn(*args, **kwargs)
    return wrapper


def main() -> int:
    from bavq import dist, evaluate
    from bavq.train.main import main as train_main
    from bavq.train.trainer import Trainer

    Trainer._loop = trapped_call(Trainer._loop)
    Trainer.final_evaluation = trapped_call(Trainer.final_evaluation)
    evaluate.evaluate_model = trapped_call(evaluate.evaluate_model)
    recorder = dist.record_collectives()
    log = recorder.__enter__()
    out = Path(os.environ["BAVQ_PROBE_OUT"])

    def write():
        rank = os.environ.get("RANK", "0")
        rows = [{"op": op, "device": str(device), "dtype": str(dtype), "shape": list(shape)}
                for op, device, dtype, shape in log]
        (out / f"rank{rank}.json").write_text(json.dumps({"collectives": rows, "trapped": sorted(trapped)}))

    atexit.register(write)
    command, argv = sys.argv[1], sys.argv[2:]
    return {"train": train_main, "eval": evaluate.main}[command](argv)


if __name__ == "__main__":
    sys.exit(main())
