"""Process-group set-up for ``torchrun`` (DDP): gloo on CPU, NCCL on CUDA."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from cctk.train.config import ConfigError


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its
    machine, the ``device`` it computes on, and whether it opened the process group itself."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: List[float]) -> List[float]:
        """Sum a list of numbers over all processes (float64 on the compute device)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_gather_object(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def resolve_device(text: Optional[str] = None) -> torch.device:
    """``--device``: None is cuda when available, else cpu; a name that is not a device, or a
    device this machine does not have, is a :class:`ConfigError`."""
    try:
        device = torch.device(text or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"--device {text!r} is not a device ({exc}); give cpu, cuda or "
                          f"cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {text} needs a CUDA GPU and none is available; use "
                          f"--device cpu")
    if (device.type == "cuda" and device.index is not None
            and device.index >= torch.cuda.device_count()):
        raise ConfigError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s)")
    return device


def setup_distributed(device: Optional[str] = None) -> DistContext:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun) and join the process group.

    With ``WORLD_SIZE`` unset or 1, nothing is initialised. The device is ``device`` when given,
    else ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; the backend is NCCL for CUDA
    devices and gloo otherwise. A process group opened by the caller is reused, not re-created.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        dev = resolve_device(device)
        if dev.type == "cuda" and dev.index is None and world_size > 1:
            dev = torch.device("cuda", local_rank)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        owns = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                       owns_group=owns)
