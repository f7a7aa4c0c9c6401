"""Checkpoints: written atomically, loaded back into a model, with every RNG state needed to
continue a run exactly."""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from cctk.train.config import ConfigError

CHECKPOINT_FORMAT = "cctk-checkpoint"
CHECKPOINT_VERSION = 1


def _atomic_write(path, mode: str, write: Callable[[Any], None]) -> None:
    """Write through ``write(file)`` to a temporary file in the target directory, fsync, then
    ``os.replace`` it over ``path``: a reader sees the old file or the complete new one, never a
    partial write; on failure the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temporary file + ``os.replace``)."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path) -> None:
    """Write ``text`` to ``path`` atomically (temporary file + ``os.replace``)."""
    _atomic_write(path, "w", lambda f: f.write(text))


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


def _torch_load(path: str, map_location) -> Dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except TypeError:  # torch without the weights_only keyword
        return torch.load(path, map_location=map_location)


def read_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load a cctk checkpoint dict; a missing, unreadable or foreign file is a ConfigError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        ckpt = _torch_load(path, map_location)
    except Exception as exc:  # corrupt/truncated/foreign pickle
        raise ConfigError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a cctk checkpoint (written by `cctk train`)")
    return ckpt


def build_model_from_config(model_config: Dict[str, Any]) -> nn.Module:
    """Rebuild a model from ``model.config`` (its name + constructor kwargs)."""
    from cctk.models import CCT

    return CCT.from_config(dict(model_config))


def load_checkpoint(path: str, map_location="cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """``(model, ckpt)``: the model rebuilt from the checkpoint's model config with its trained
    weights (strict), in eval mode on ``map_location``; ``ckpt`` is the whole checkpoint dict.
    Dense training checkpoints and pruned ones (ANDCLinear / masked layers) both load here."""
    ckpt = read_checkpoint(path, map_location)
    if isinstance(ckpt.get("pruning"), dict):
        # a pruned checkpoint (cctk.prune.save_pruned) holds only the kept blocks: its sparse
        # layers are rebuilt from the stored block masks before the (strict) load
        from cctk.prune.convert import build_pruned_model
        model = build_pruned_model(ckpt)
    else:
        model = build_model_from_config(ckpt["model_config"])
        model.load_state_dict(ckpt["state_dict"], strict=True)
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    model.eval()
    return model, ckpt


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
