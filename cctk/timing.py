"""One timing harness for cctk's throughput figures (the demo, ``cctk study``, ``bench/``).

On a shared CPU, medians of consecutive runs of one provider swing by 10-35% as other work comes
and goes; timing several providers **interleaved round by round** exposes them to the same
machine state, and each provider's **fastest round** is its least-disturbed figure. The order
changes from round to round (a seeded shuffle), so no provider always runs after the same one. So every
comparison cctk reports is ``interleaved_times`` -> ``fastest`` ratios, in one process.
"""
from __future__ import annotations

import os
import random
import time
from typing import Any, Callable, Dict, Mapping

import torch


def interleaved_times(fns: Mapping[str, Callable[[], Any]], rounds: int = 15, warmup: int = 1,
                      device: torch.device | str | None = None, shuffle: bool = True,
                      seed: int = 0) -> Dict[str, list]:
    """Seconds per call of every provider in ``fns``, ``rounds`` rounds each, interleaved (round r
    runs every provider once) after ``warmup`` untimed rounds in the given order. ``shuffle``
    (default): each timed round runs the providers in a fresh order (``random.Random(seed)``), so
    that no provider always follows the same one: a runtime whose worker threads keep spinning
    after its call (OpenVINO's) slows whichever provider runs next, and in a fixed order that
    penalty would land on the same provider in every round, fastest round included. On a CUDA
    ``device`` each call is followed by a synchronisation (the GPU work is timed, not the launch)."""
    if not fns:
        raise ValueError("interleaved_times needs at least one provider")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    cuda = device is not None and torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(max(0, warmup)):
        for fn in fns.values():
            fn()
    sync()
    names = list(fns)
    rng = random.Random(seed)
    times: Dict[str, list] = {name: [] for name in fns}
    for _ in range(rounds):
        if shuffle:
            rng.shuffle(names)
        for name in names:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def cpu_flags() -> frozenset:
    """The CPU's feature flags as the kernel names them (``/proc/cpuinfo``: avx2, avx512f,
    avx512_bf16, amx_tile, amx_bf16, ...); empty where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timing_machine(device: torch.device | str | None = None) -> str:
    """Where a figure was timed, for its record: the GPU's name on a CUDA ``device``, else the
    CPU model and torch's intra-op thread count (a ratio measured on one machine says little
    about another)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def _cpu_times():
    """(busy, total) CPU time of the whole machine in seconds (``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    ticks = [int(v) for v in fields[1:9]]   # user nice system idle iowait irq softirq steal
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = sum(ticks) / hz
    idle = (ticks[3] + (ticks[4] if len(ticks) > 4 else 0)) / hz
    return total - idle, total


class OtherLoad:
    """The share of the machine's CPU time other processes used while the ``with`` block ran:
    the whole machine's busy time (``/proc/stat``, steal included: another guest on the host)
    minus this process's own CPU time, over the block's CPU capacity. ``fraction`` is None where
    ``/proc/stat`` is missing or the block was too short to tell (under 50 ms). A choice timed
    while ``fraction`` is high was made against a machine that will not be there later."""

    fraction: float | None = None

    def __enter__(self) -> "OtherLoad":
        self._machine, self._self, self._wall = _cpu_times(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        end, own, wall = _cpu_times(), time.process_time(), time.perf_counter()
        if self._machine is None or end is None or wall - self._wall < 0.05:
            self.fraction = None
            return
        busy = end[0] - self._machine[0]
        capacity = max(end[1] - self._machine[1], 1e-9)
        self.fraction = min(1.0, max(0.0, (busy - (own - self._self)) / capacity))


def images_per_s(seconds: list, batch: int) -> float:
    """Throughput of the fastest round: ``batch / min(seconds)``."""
    return batch / min(seconds)


@torch.no_grad()
def models_images_per_s(models: Mapping[str, torch.nn.Module], example: torch.Tensor, rounds: int = 15,
                        warmup: int = 1) -> Dict[str, Dict[str, float]]:
    """Inference throughput of several models on one batch, interleaved: per model
    ``{"images_per_s", "ms_per_batch", "batch"}`` from its fastest round (eval mode, no autograd)."""
    for m in models.values():
        m.eval()
    fns = {name: (lambda m=m: m(example)) for name, m in models.items()}
    times = interleaved_times(fns, rounds=rounds, warmup=warmup, device=example.device)
    batch = int(example.shape[0])
    return {name: {"images_per_s": images_per_s(ts, batch), "ms_per_batch": min(ts) * 1e3, "batch": batch}
            for name, ts in times.items()}
