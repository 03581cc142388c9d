"""Data-parallel training across processes (``torchrun``), kept to what the Trainer needs.

``torchrun --nproc_per_node=N -m rnnkit train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` in their environment; :func:`init_from_env` joins
them into one process group (``gloo`` on CPU, ``nccl`` on CUDA). Every rank draws the same global
batch (a pure function of its index) and keeps rows ``[r * B/N, (r+1) * B/N)``, so the data split is
deterministic and a resumed run continues exactly.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

from rnnkit.errors import InputError


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str) -> str:
    """Join the process group described by torchrun's environment variables, if any.

    Args:
        device: the requested device (``"cpu"``, ``"cuda"``, ``"cuda:0"``).

    Returns:
        The device this rank should use (``cuda:<LOCAL_RANK>`` for CUDA runs).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise InputError("WORLD_SIZE: expected a torch build with torch.distributed, got one without")
    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


#: How long :func:`shutdown` lets the backend's worker threads finish before the group goes.
SETTLE_SECONDS = 0.05


def shutdown() -> None:
    """Leave the process group (if one was joined).

    Every rank first meets at a barrier, so no collective is still running, then waits a moment with
    the GIL released: a gloo worker thread frees each finished collective's tensors after the result
    is handed back, and freeing a tensor Python created needs the GIL. Were the group's last owner
    (DDP's reducer) freed first, its destructor would join that worker while holding the GIL, and
    both would wait forever.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        time.sleep(SETTLE_SECONDS)
        dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device | str) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``model`` inside ``DistributedDataParallel`` in a process group of more than one rank, else itself."""
    if not is_distributed():
        return model
    device = torch.device(device)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def barrier() -> None:
    if is_distributed():
        dist.barrier()
