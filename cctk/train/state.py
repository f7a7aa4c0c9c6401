"""A training run's state in its checkpoint: every RNG state needed to continue a run exactly,
the per-epoch seeds, and the checkpoint dict ``cctk train`` writes (format, atomic writes and
reading live in :mod:`cctk.checkpoint`)."""
from __future__ import annotations

import random
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from cctk.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION


def capture_rng_state() -> Dict[str, Any]:
    """torch CPU, every CUDA device (only if CUDA is already initialised), numpy and Python
    ``random`` states, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of everything random in one epoch on one rank (shuffling, augmentation, mixup,
    dropout): a function of (seed, epoch, rank) only, so a resumed run draws the same numbers."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + int(rank) * 104_729 + 12345) % (2 ** 31 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def checkpoint_dict(*, model: nn.Module, dataset: Dict[str, Any], train_config: Dict[str, Any],
                    optimizer=None, scheduler=None, scaler=None, epoch: int,
                    metrics: Optional[Dict[str, Any]] = None,
                    sampler: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    m = unwrap(model)
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "torch_version": str(torch.__version__),
        "model_config": dict(getattr(m, "config", {})),
        "dataset": dataset,
        "train_config": train_config,
        "state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "rng": capture_rng_state(),
        "sampler": sampler or {},
        "metrics": metrics or {},
    }
