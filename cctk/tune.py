"""Measured choices between equivalent implementations, remembered per machine.

``cctk.optimize`` has several ways to run each part of a model that compute the same function
(cctk's fused attention or torch's SDPA; a block-sparse layer through cctk's kernel or as a dense
GEMM through oneDNN; bf16 arithmetic or fp32 arithmetic on bf16-rounded weights where the CPU has
no bf16 units). Which is fastest depends on the CPU family (AMX, AVX512-BF16, AVX2 only), the
shape and the density, so it is measured, not guessed: :func:`choose` times the candidates in
interleaved rounds (a fresh random order each round, fastest round compared: ``cctk.timing``) and
remembers the winner for this machine, in memory and in a JSON file
(``$CCTK_CACHE_DIR/tune.json``, default ``~/.cache/cctk``), keyed by the CPU model, the kernels'
instruction set, the torch version and the thread count. ``CCTK_TUNE=0`` turns measuring off: the
first candidate (the default) is taken. A missing, unreadable or corrupt cache file costs only a
re-measurement; a read-only cache directory keeps the choices in memory. A choice measured while
other processes used more than ``BUSY_LIMIT`` of the CPUs (:class:`cctk.timing.OtherLoad`) is
used by this process but not written to the file (with a warning): a quiet machine later measures
again instead of inheriting a loaded machine's choice.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Any, Callable, Mapping

import torch

from cctk import _ext
from cctk.timing import OtherLoad, cpu_model, interleaved_times

_MEMORY: dict = {}
_UNSAVED: dict = {}   # choices measured under load: this process only
_LOADED: dict = {"path": None}
#: the share of the CPUs other processes may use while a choice is measured for it to be cached
BUSY_LIMIT = 0.25


def enabled() -> bool:
    return os.environ.get("CCTK_TUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def machine_key() -> str:
    """What a measured choice depends on besides the part itself."""
    return (f"{cpu_model()} | kernels {_ext.cpu_capabilities()} | torch {torch.__version__.split('+')[0]} | "
            f"threads {torch.get_num_threads()}")


def cache_path() -> str:
    root = os.environ.get("CCTK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cctk")
    return os.path.join(root, "tune.json")


def _load() -> None:
    path = cache_path()
    if _LOADED["path"] == path:
        return
    _LOADED["path"] = path
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        warnings.warn(f"cctk: ignoring the tuning cache {path} ({e}); choices will be measured again",
                      RuntimeWarning, stacklevel=3)
        return
    for machine, choices in data.items():
        if isinstance(choices, dict):
            _MEMORY.setdefault(machine, {}).update({k: v for k, v in choices.items() if isinstance(v, str)})


def _save() -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tune-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(_MEMORY, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # read-only or full: the choices stay in memory for this process


def cached(kind: str, signature: str) -> str | None:
    _load()
    key = f"{kind} | {signature}"
    return _MEMORY.get(machine_key(), {}).get(key) or _UNSAVED.get(machine_key(), {}).get(key)


def choose(kind: str, signature: str, candidates: Mapping[str, Callable[[], Any]], rounds: int = 5,
           probes: Mapping[str, Callable[[], Any]] | None = None) -> str:
    """The name of the fastest candidate (each a no-argument callable computing the same thing).

    Measured once per machine and ``(kind, signature)``; later calls read the cache. First every
    candidate runs once (its ``probes`` entry where given: the same work on less data, so a path
    100x too slow for this CPU costs little); any candidate more than three times the fastest
    there is dropped. The rest run one warm-up and ``rounds`` interleaved rounds, and the fastest
    round decides."""
    if not candidates:
        raise ValueError("choose needs at least one candidate")
    names = list(candidates)
    if len(names) == 1 or not enabled():
        return names[0]
    hit = cached(kind, signature)
    if hit in candidates:
        return hit
    probes = probes or candidates
    with torch.no_grad(), OtherLoad() as load:
        first = {name: min(t) for name, t in interleaved_times({n: probes[n] for n in names}, rounds=1,
                                                                 warmup=0).items()}
        best = min(first.values())
        alive = {n: candidates[n] for n in names if first[n] <= 3.0 * best}
        if len(alive) > 1:
            times = interleaved_times(alive, rounds=rounds, warmup=1)
            winner = min(alive, key=lambda n: min(times[n]))
        else:
            winner = next(iter(alive))
    if load.fraction is not None and load.fraction > BUSY_LIMIT:
        _UNSAVED.setdefault(machine_key(), {})[f"{kind} | {signature}"] = winner
        if not _LOADED.get("warned"):   # once per process (a model has a dozen choices)
            _LOADED["warned"] = True
            warnings.warn(f"cctk: {kind} chosen while other processes used {100 * load.fraction:.0f}% of the "
                          f"CPUs; choices measured under such load hold for this process only and are not "
                          f"cached: tune on a quiet machine to remember them", RuntimeWarning, stacklevel=2)
        return winner
    _MEMORY.setdefault(machine_key(), {})[f"{kind} | {signature}"] = winner
    _save()
    return winner


def forget() -> None:
    """Drop the choices held in memory (the cache file is kept): the next choices are re-read or re-measured."""
    _MEMORY.clear()
    _UNSAVED.clear()
    _LOADED["path"] = None
    _LOADED["warned"] = False
