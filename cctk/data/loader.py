"""DataLoader construction with reproducible, per-epoch shuffling (single process or DDP).

Shuffling is a function of ``(seed, epoch)`` only: call :func:`set_loader_epoch` before each
epoch (the sampler honours it), so a resumed run sees the same order as an uninterrupted one
without saving any generator state. Worker seeds come from the loader's generator, which
:func:`set_loader_epoch` reseeds with ``seed + epoch`` for the same reason.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = ["epoch_sampler", "EpochSampler", "build_loader", "set_loader_epoch"]


def epoch_sampler(length: int, shuffle: bool = True, seed: int = 0) -> DistributedSampler:
    """The single-process sampler: torch's ``DistributedSampler(num_replicas=1, rank=0, seed)``,
    whose permutation of epoch e is ``randperm(length, generator=manual_seed(seed + e))`` (all
    indices, no padding with one replica; in order without ``shuffle``)."""
    return DistributedSampler(range(int(length)), num_replicas=1, rank=0, shuffle=bool(shuffle),
                              seed=int(seed))


EpochSampler = epoch_sampler  # the name of cctk <= 0.1's own class (same orders, bit for bit)


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0,
                 distributed: bool = False, seed: int = 0, drop_last: bool = False,
                 collate_fn: Optional[Callable] = None, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``dataset``.

    ``distributed=True`` needs an initialised ``torch.distributed`` process group and uses a
    ``DistributedSampler(shuffle, seed, drop_last)``: each rank gets ``ceil(N / world)`` samples
    (the sampler pads by repeating samples unless ``drop_last``; evaluate on one rank or weigh
    duplicates if exact counts matter). Otherwise :func:`epoch_sampler` (the same sampler with
one replica). In both cases call
    :func:`set_loader_epoch(loader, epoch)` at the start of each epoch.
    ``collate_fn`` (e.g. ``MixupCutmix(...).collate``) replaces the default stacking.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if distributed:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("build_loader(distributed=True) needs torch.distributed initialised: "
                               "launch with torchrun and call torch.distributed.init_process_group "
                               "first, or pass distributed=False")
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    else:
        sampler = epoch_sampler(len(dataset), shuffle=shuffle, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        drop_last=drop_last, collate_fn=collate_fn, pin_memory=pin_memory,
                        generator=generator, persistent_workers=False)
    loader.cctk_seed = seed  # read by set_loader_epoch
    return loader


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Make the next pass over ``loader`` the one of epoch ``epoch``: the sampler's permutation
    and the worker seeds become functions of ``(seed, epoch)``."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    seed = getattr(loader, "cctk_seed", None)
    if seed is not None and loader.generator is not None:
        loader.generator.manual_seed(seed + epoch)
