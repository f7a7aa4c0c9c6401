"""ANDCLinear (block-sparse linear) vs dense F.linear vs PyTorch's BSR, at CCT feed-forward shapes.

    pytest bench/bench_andc_linear.py --benchmark-only [--bench-full] [--benchmark-json=andc.json]

One group per (direction, dtype, rows, in -> out): the dense ``F.linear`` runs first, then every
(block size, density, provider) beside it, each recording ``extra_info["speedup_vs_dense"]`` =
dense median / its median (dense timed in the same session; if a filter skipped the dense case it
is timed inline and ``dense_inline`` says so), and ``speedup_vs_dense_min``, the same for the
fastest rounds (steadier when other work shares the cores).

Note on 16384 x 512 fp32 outputs (32 MiB): glibc serves allocations of >= 32 MiB with fresh
mmap pages (its dynamic mmap threshold tops out at 32 MiB), so each call faults its output in:
~8-15 ms per call on this machine with 4-KiB pages. The cctk op asks for transparent huge pages on
such outputs (~4 ms left); F.linear does not, so part of the 256 -> 512 fp32 speedup at 16384
rows is that allocation. To compare the kernels alone (neither pays the faults), run with
``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824`` (read by glibc at start-up).
"""
from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from cctk import _ext
from cctk.nn import ANDCLinear
from cctk.timing import interleaved_times

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = ((256, 512), (512, 256))
DENSITIES = (1.0, 0.5, 0.25, 0.125)
_DENSE = {}   # (direction, dtype, rows, in, out) -> dense median (s)


def _cases(full: bool):
    dtypes = (torch.float32, torch.bfloat16)
    rows_all = (16384, 1024, 256) if full else (16384, 256)
    blocks = (16, 32, 64) if full else (32,)
    cases = []
    for direction in ("forward", "backward"):
        for dtype in dtypes:
            for rows in rows_all:
                if direction == "backward" and not full and rows != 16384:
                    continue
                for in_f, out_f in SHAPES:
                    cases.append((direction, dtype, rows, in_f, out_f, None, None, "dense"))
                    for B in blocks:
                        for d in DENSITIES:
                            providers = ["ext", "triton"]
                            if rows <= 256 or full:
                                providers.append("torch")
                            if direction == "forward":
                                providers.append("torch_bsr")
                            for p in providers:
                                cases.append((direction, dtype, rows, in_f, out_f, B, d, p))
    return cases


def _case_id(c):
    direction, dtype, rows, in_f, out_f, B, d, p = c
    dt = str(dtype).replace("torch.", "")
    tail = "dense" if B is None else f"{p}-B{B}-d{d:g}"
    return f"{direction}-{dt}-{rows}x{in_f}to{out_f}-{tail}"


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config.getoption("--bench-full"))
        metafunc.parametrize("case", cases, ids=[_case_id(c) for c in cases])


def _random_block_mask(out_f, in_f, B, density, seed=0):
    nbr, nbc = math.ceil(out_f / B), math.ceil(in_f / B)
    n = nbr * nbc
    keep = round(density * n)
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:keep]] = True
    return mask.reshape(nbr, nbc)


def _sync(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def _make_fn(direction, x, layer_fn, params):
    if direction == "forward":
        def fwd():
            with torch.no_grad():
                return layer_fn(x)
        return _sync(fwd)
    g = torch.randn(x.shape[0], *layer_fn(x).shape[1:], dtype=x.dtype, device=x.device)

    def fwd_bwd():
        for p in params:
            p.grad = None
        xg = x.detach().requires_grad_(True)
        layer_fn(xg).backward(g)
    return _sync(fwd_bwd)


def _dense_fn(direction, dtype, rows, in_f, out_f):
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, device=DEVICE, dtype=dtype)
    x = torch.randn(rows, in_f, device=DEVICE, dtype=dtype)
    return _make_fn(direction, x, lin, list(lin.parameters()))


def test_andc_linear(benchmark, case):
    direction, dtype, rows, in_f, out_f, B, density, provider = case
    dt = str(dtype).replace("torch.", "")
    benchmark.group = f"andc_linear {direction} {dt} {rows}x{in_f}->{out_f}"
    key = (direction, dtype, rows, in_f, out_f)
    benchmark.extra_info.update(provider=provider if B is None else f"{provider} B={B} d={density:g}",
                                direction=direction, dtype=dt, rows=rows, in_features=in_f, out_features=out_f,
                                block_size=B, density=density, device=str(DEVICE), threads=torch.get_num_threads())
    if provider == "dense":
        fn = _dense_fn(direction, dtype, rows, in_f, out_f)
        benchmark(fn)
        if not benchmark.stats:  # --benchmark-disable: ran once, nothing timed
            return
        _DENSE[key] = (benchmark.stats.stats.median, benchmark.stats.stats.min)
        benchmark.extra_info["gflop_s"] = 2 * rows * in_f * out_f / benchmark.stats.stats.median / 1e9
        return

    if provider == "triton":
        if DEVICE.type != "cuda":
            pytest.skip("the Triton kernels are timed on a GPU only (on CPU they would run interpreted)")
        from cctk.kernels import triton_available
        if not triton_available():
            pytest.skip("triton is not installed")
    if provider == "ext" and not _ext.supports(DEVICE):
        pytest.skip(f"cctk's compiled extension has no kernels for {DEVICE}")
    if provider == "torch_bsr" and DEVICE.type == "cpu" and dtype != torch.float32:
        pytest.skip("PyTorch's CPU BSR matmul supports float32 only (no bf16 kernel)")

    torch.manual_seed(0)
    mask = _random_block_mask(out_f, in_f, B, density, seed=B * 1000 + int(density * 1000))
    layer = ANDCLinear(in_f, out_f, B, mask, dtype=dtype, device=DEVICE)
    x = torch.randn(rows, in_f, device=DEVICE, dtype=dtype)
    if provider == "torch_bsr":
        W = layer.to_dense().detach()
        W_bsr = W.to_sparse_bsr((B, B))
        bias = layer.bias.detach()
        fn = _make_fn(direction, x, lambda x_: F.linear(x_, W_bsr, bias), [])
    else:
        layer.backend = provider
        fn = _make_fn(direction, x, layer, list(layer.parameters()))

    slow = provider in ("torch", "torch_bsr")
    if slow:  # seconds per call at 16384 rows: a few rounds, no warm-up round at that size
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0 if rows >= 8192 else 1)
    else:
        benchmark(fn)
    if not benchmark.stats:
        return
    median, fastest = benchmark.stats.stats.median, benchmark.stats.stats.min
    if key not in _DENSE:
        ts = interleaved_times({"dense": _dense_fn(direction, dtype, rows, in_f, out_f)}, rounds=5)["dense"]
        _DENSE[key] = (statistics.median(ts), min(ts))
        benchmark.extra_info["dense_inline"] = True
    dense_median, dense_min = _DENSE[key]
    benchmark.extra_info["dense_median_s"] = dense_median
    benchmark.extra_info["speedup_vs_dense"] = dense_median / median
    # ratio of the fastest rounds: steadier than the medians on a shared machine
    benchmark.extra_info["speedup_vs_dense_min"] = dense_min / fastest
    benchmark.extra_info["gflop_s_kept"] = 2 * rows * in_f * out_f * layer.density / median / 1e9
