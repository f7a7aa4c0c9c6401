"""Shared set-up of the benchmark suite (pytest-benchmark).

    pytest bench --benchmark-only                               # quick sweep (a few minutes on 2 cores)
    pytest bench --benchmark-only --bench-full                  # larger sweep (more block sizes, rows, dtypes)
    pytest bench --benchmark-only --benchmark-json=out.json     # save every timing + the machine description
    pytest bench --benchmark-only --benchmark-autosave          # ... or under .benchmarks/

On a machine other jobs share, wall-clock medians swing by 10-100x (a descheduled OpenMP thread
stalls a whole parallel region). Per-core CPU time is steady there:

    OMP_NUM_THREADS=1 pytest bench --benchmark-only --benchmark-timer=time.thread_time

* ``--bench-full`` (fixture ``bench_full``): bench files widen their sweep with it.
* The saved JSON's ``machine_info`` gains ``cctk``: CPU model, cores, AVX-512 / AMX flags, torch,
  triton and cctk versions, ``cctk._ext.info()`` (what was compiled and which CPU path runs),
  torch threads and the GPU name when there is one.
* At the end of the session a summary table lists every benchmark by group: provider, median
  time, and the figure each bench file records in ``extra_info`` against its baseline
  (``speedup_vs_dense``, ``ratio_vs_plain`` or ``ratio_vs_best_dense``); bench_models adds its
  per-group table (images/s of each provider's fastest interleaved round, ratio to the best dense
  runtime) and the machine's measured peaks; bench_study_peers the same table for a finished
  study's models.
"""
from __future__ import annotations

import os
import sys

import pytest

RATIO_KEYS = ("speedup_vs_dense", "ratio_vs_plain", "ratio_vs_best_dense", "speedup_vs_sdpa")


def pytest_addoption(parser):
    group = parser.getgroup("cctk benchmarks")
    group.addoption("--bench-full", action="store_true", default=False,
                    help="run the larger benchmark sweep (more block sizes, densities, row counts)")


@pytest.fixture(scope="session")
def bench_full(request) -> bool:
    return bool(request.config.getoption("--bench-full"))


def _cpu_description() -> dict:
    from cctk.timing import cpu_flags, cpu_model
    flags = cpu_flags()
    info = {"model": cpu_model(), "logical_cpus": os.cpu_count(),
            "flags": sorted(fl for fl in flags if fl.startswith(("avx512", "amx", "avx2", "fma")))}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    info["avx512"] = "avx512f" in flags
    info["avx512_bf16"] = "avx512_bf16" in flags
    info["amx"] = any(f.startswith("amx") for f in flags)
    return info


def machine_description() -> dict:
    """What the timings ran on (also used by bench files for their own records)."""
    import torch
    desc = {"cpu": _cpu_description(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    try:
        import triton
        desc["triton"] = triton.__version__
    except Exception:
        desc["triton"] = None
    try:
        import cctk
        from cctk import _ext
        desc["cctk"] = cctk.__version__
        desc["cctk_ext"] = _ext.info()
    except Exception as e:  # the suite still records timings without cctk's extension
        desc["cctk_ext"] = {"error": f"{type(e).__name__}: {e}"}
    if torch.cuda.is_available():
        desc["gpu"] = torch.cuda.get_device_name(0)
        desc["cuda"] = torch.version.cuda
    return desc


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cctk"] = machine_description()


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not getattr(bs, "benchmarks", None):
        return
    rows = []
    for bench in bs.benchmarks:
        if not bench or getattr(bench, "has_error", False):
            continue
        extra = bench.extra_info or {}
        ratio_key = next((k for k in RATIO_KEYS if k in extra), None)
        ratio = f"{extra[ratio_key]:.2f}x {ratio_key}" if ratio_key and extra[ratio_key] is not None else ""
        min_key = f"{ratio_key}_min"
        if ratio and extra.get(min_key) is not None:
            ratio += f" (fastest rounds: {extra[min_key]:.2f}x)"
        provider = extra.get("provider") or bench.name.split("[", 1)[-1].rstrip("]")
        rows.append((bench.group or "", provider, _fmt_time(bench.stats.median), ratio))
    if not rows:
        return
    rows.sort(key=lambda r: r[0])
    tr = terminalreporter
    tr.write_sep("=", "cctk benchmark summary (median; ratio vs the group's baseline)")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    last = None
    for group, provider, median, ratio in rows:
        if group != last and last is not None:
            tr.write_line("")
        tr.write_line(f"{group if group != last else '':<{w0}}  {provider:<{w1}}  {median:>10}  {ratio}")
        last = group
    lines = [ln for name in ("bench_models", "bench_study_peers") if name in sys.modules
             for ln in sys.modules[name].summary_lines()]
    if lines:
        tr.write_sep("=", "whole-model throughput: images/s and ratio to the best dense runtime")
        for line in lines:
            tr.write_line(line)
    desc = machine_description()
    cpu = desc["cpu"]
    tr.write_line("")
    tr.write_line(f"machine: {cpu['model']} ({cpu.get('usable_cpus', cpu['logical_cpus'])} cpus, "
                  f"avx512={cpu['avx512']}, avx512_bf16={cpu['avx512_bf16']}, amx={cpu['amx']}); "
                  f"torch {desc['torch']} ({desc['torch_threads']} threads), triton {desc['triton']}, "
                  f"cctk ext {desc.get('cctk_ext')}" + (f", gpu {desc['gpu']}" if "gpu" in desc else ""))
