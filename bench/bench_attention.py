"""Fused CPU attention (``cctk.ops.attention``) vs torch's SDPA vs OpenVINO, at CCT shapes.

    pytest bench/bench_attention.py --benchmark-only [--bench-full]

One group per (dtype, B, H, T, d_h); q, k, v are the strided views the CCT makes (one qkv
buffer, permuted). Providers run **interleaved round by round** in one process (15 rounds,
``cctk.timing``); each records its fastest round's GFLOP/s (4 B H T^2 d_h per call) and
``speedup_vs_sdpa`` (ratio of fastest rounds) in ``extra_info``; pytest-benchmark keeps its own
rounds beside them. Outputs are checked against the fp32 reference before timing.
Default shapes: CCT-7/3x1 (B=32, H=4, T=256, d_h=64) and batch 1; ``--bench-full`` adds the
224-px models' T=196 with d_h 64 and CCT-14's d_h 64 at H=6.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from cctk.ops.fused_attention import attention, attention_ref
from cctk.timing import interleaved_times

ROUNDS = 15
PROVIDERS = ("sdpa", "cctk", "OpenVINO")
_GROUPS: dict = {}


def _shapes(full):
    s = [(32, 4, 256, 64), (1, 4, 256, 64)]
    if full:
        s += [(32, 4, 196, 64), (16, 6, 196, 64), (32, 2, 64, 64)]
    return [(dt, *sh) for dt in (torch.bfloat16, torch.float32) for sh in s]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = [(g, p) for g in _shapes(metafunc.config.getoption("--bench-full")) for p in PROVIDERS]
        metafunc.parametrize("case", cases, ids=[f"{str(g[0]).replace('torch.', '')}-B{g[1]}-H{g[2]}-T{g[3]}-d{g[4]}-{p}"
                                                 for g, p in cases])


def _openvino(q, k, v):
    try:
        import openvino as ov
    except ImportError:
        return None, "openvino not installed (pip install cctk[bench])"

    class SDPA(torch.nn.Module):
        def forward(self, a, b, c):
            return F.scaled_dot_product_attention(a, b, c)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        om = ov.convert_model(SDPA(), example_input=(q.float().contiguous(), k.float().contiguous(),
                                                     v.float().contiguous()))
    hint = "bf16" if q.dtype == torch.bfloat16 else "f32"
    compiled = ov.Core().compile_model(om, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                                   "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    req = compiled.create_infer_request()
    inputs = {i: t.float().contiguous().numpy() for i, t in enumerate((q, k, v))}  # OpenVINO takes f32 in
    return (lambda: req.infer(inputs)), None


def _group(g):
    if g in _GROUPS:
        return _GROUPS[g]
    dtype, B, H, T, D = g
    qkv = torch.randn(B, T, 3, H, D, generator=torch.Generator().manual_seed(0)).to(dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    ref = attention_ref(q.float(), k.float(), v.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    fns, skipped = {}, {}
    fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v)
    fns["cctk"] = lambda: attention(q, k, v)
    for name in ("sdpa", "cctk"):
        assert (fns[name]().float() - ref).abs().max().item() <= tol, f"{name} differs from the reference"
    run, why = _openvino(q, k, v)
    if why:
        skipped["OpenVINO"] = why
    else:
        fns["OpenVINO"] = run
    times = interleaved_times(fns, rounds=ROUNDS, warmup=1)
    flops = 4 * B * H * T * T * D
    _GROUPS[g] = dict(fns=fns, skipped=skipped, gflops={p: flops / min(t) / 1e9 for p, t in times.items()},
                      fastest={p: min(t) for p, t in times.items()})
    return _GROUPS[g]


def test_attention(benchmark, case):
    g, p = case
    res = _group(g)
    if p in res["skipped"]:
        pytest.skip(res["skipped"][p])
    dtype, B, H, T, D = g
    benchmark.group = f"attention {str(dtype).replace('torch.', '')} B={B} H={H} T={T} d_h={D}"
    benchmark.extra_info.update(provider=p, gflops=res["gflops"][p], rounds=ROUNDS,
                                speedup_vs_sdpa=res["fastest"]["sdpa"] / res["fastest"][p],
                                threads=torch.get_num_threads())
    benchmark.pedantic(res["fns"][p], rounds=3, warmup_rounds=0)
