"""Multi-process training under ``torchrun``: rank, world size, local device, ``print0``, barrier, ``ddp_sync``.

No state of its own: everything is read from ``torch.distributed`` (joined once by ``init``) and from the
environment variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). Without them, or with one process, every function here is the single-process no-op, so
library code calls them unconditionally. Backends: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel


def launched_world_size() -> int:
    """Number of processes ``torchrun`` started (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: torch.device | str) -> torch.device:
    """Join torchrun's process group (once) and return this process's device.

    CUDA devices become ``cuda:LOCAL_RANK`` (nccl); anything else stays as given (gloo). A no-op with one process.
    """
    device = torch.device(device)
    if launched_world_size() <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        td.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return device


def is_initialized() -> bool:
    return td.is_available() and td.is_initialized()


def shutdown() -> None:
    """Leave the process group (if joined)."""
    if is_initialized():
        td.destroy_process_group()


def rank() -> int:
    return td.get_rank() if is_initialized() else 0


def world_size() -> int:
    return td.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the only process that writes files and logs."""
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def barrier() -> None:
    if is_initialized():
        td.barrier()


def _collective_device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo CPU tensors
    return torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over all ranks, in place (``x`` on the backend's device); returns ``x``."""
    if is_initialized():
        td.all_reduce(x, op=td.ReduceOp.SUM)
    return x


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (so all ranks take the same branch)."""
    return bool(max_over_ranks(int(flag)))


def max_over_ranks(value: int) -> int:
    """The largest ``value`` of all ranks, on every rank."""
    if not is_initialized():
        return value
    t = torch.tensor([float(value)], device=_collective_device())
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return int(t.item())


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` (a small picklable value, e.g. an error message) on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(module: torch.nn.Module, device: torch.device, *, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` when several processes run, else ``module`` itself.

    Keep the unwrapped module for saving and the EMA: its state-dict keys have no ``module.`` prefix.
    Buffers are synced once at construction, not every step: edmkit's buffers are fixed and identical on all ranks.
    """
    if not is_initialized() or world_size() == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   forward_sync_buffers=False, find_unused_parameters=find_unused_parameters)


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Gradient accumulation: inside ``ddp_sync(m, False)`` backward keeps gradients local (no all-reduce);
    the last micro-batch runs with ``sync=True`` and DDP averages the accumulated sums over ranks."""
    if isinstance(module, DistributedDataParallel) and not sync:
        with module.no_sync():
            yield
    else:
        yield
