"""Fused node outputs + per-label statistics vs the plain forward, at CCT shapes.

    pytest bench/bench_label_stats.py --benchmark-only

Shapes (CCT-7/3x1 on 32x32 images, batch 64): B = 64 samples, T = 256 tokens, K = 100 labels;
FF: d = 256 -> 512 with exact GELU; MHA: H = 4 heads of d_h = 64.

Providers, side by side in one ``benchmark.group`` per (op, mode):
* ``plain``  the forward alone, as the model writes it: ``F.gelu(F.linear(x))`` (out of place, like
  ``nn.GELU``) / ``F.scaled_dot_product_attention``;
* ``torch``  ``backend="torch"`` (forward, then the sums by an accumulating index_put; its GELU
  runs in place, which saves one (B, T, d_ff) buffer and can outweigh the pooled statistics);
* ``triton`` ``backend="triton"`` (the sums in the kernel's epilogue; CUDA only: skipped on CPU,
  where Triton would only run in the interpreter).
Each non-plain benchmark records ``extra_info["ratio_vs_plain"]`` = its median / the plain
median of the same group (the plain case runs first in each group), and ``ratio_vs_plain_min``,
the same for the fastest rounds. CPU: float32; CUDA: bfloat16.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from cctk.ops import attention_label_stats, linear_label_stats

B, T, D_MODEL, D_FF, HEADS, D_HEAD, K = 64, 256, 256, 512, 4, 64, 100

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32

# (mode, provider) with plain first in each group, so its median is known when the others run
CASES = [(mode, provider) for mode in ("pooled", "token") for provider in ("plain", "torch", "triton")]
_plain_times = {}   # group -> (median, min) of the plain provider


def _synchronized(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result
    return run


def _skip_unavailable(provider):
    if provider == "triton":
        if DEVICE.type != "cuda":
            pytest.skip("the Triton kernels are timed on a GPU only (on CPU they would run interpreted)")
        from cctk.kernels import triton_available
        if not triton_available():
            pytest.skip("triton is not installed")


def _record(benchmark, group, provider):
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE).replace("torch.", ""),
                                threads=torch.get_num_threads())
    stats = getattr(benchmark, "stats", None)
    if stats is None:          # --benchmark-disable: the function ran once, nothing was timed
        return
    median, fastest = stats.stats.median, stats.stats.min
    if provider == "plain":
        _plain_times[group] = (median, fastest)
    elif group in _plain_times:
        plain_median, plain_fastest = _plain_times[group]
        benchmark.extra_info["ratio_vs_plain"] = round(median / plain_median, 4)
        # the ratio of the fastest rounds: less sensitive to other processes on a shared CPU
        benchmark.extra_info["ratio_vs_plain_min"] = round(fastest / plain_fastest, 4)


@pytest.fixture(scope="module")
def ff_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D_MODEL, generator=gen).to(DEVICE, DTYPE)
    weight = (torch.randn(D_FF, D_MODEL, generator=gen) / math.sqrt(D_MODEL)).to(DEVICE, DTYPE)
    bias = (0.1 * torch.randn(D_FF, generator=gen)).to(DEVICE, DTYPE)
    labels = torch.randint(0, K, (B,), generator=gen).to(DEVICE)
    return x, weight, bias, labels


@pytest.fixture(scope="module")
def mha_inputs():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, HEADS, T, D_HEAD, generator=gen).to(DEVICE, DTYPE) for _ in range(3))
    labels = torch.randint(0, K, (B,), generator=gen).to(DEVICE)
    return q, k, v, labels


@pytest.mark.parametrize("mode,provider", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_linear_label_stats(benchmark, ff_inputs, mode, provider):
    _skip_unavailable(provider)
    x, weight, bias, labels = ff_inputs
    group = f"linear_label_stats {mode} B*T={B * T} {D_MODEL}->{D_FF} K={K}"
    benchmark.group = group
    if provider == "plain":
        fn = _synchronized(lambda: F.gelu(F.linear(x, weight, bias)))
    else:
        fn = _synchronized(lambda: linear_label_stats(x, weight, bias, labels, K, mode=mode,
                                                      backend=provider))
        # what is timed computes the same forward as the plain provider
        out = fn()[0]
        torch.testing.assert_close(out, F.gelu(F.linear(x, weight, bias)),
                                   **({} if DTYPE == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}))
    benchmark(fn)
    _record(benchmark, group, provider)


@pytest.mark.parametrize("mode,provider", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_attention_label_stats(benchmark, mha_inputs, mode, provider):
    _skip_unavailable(provider)
    q, k, v, labels = mha_inputs
    group = f"attention_label_stats {mode} B={B} H={HEADS} T={T} d_h={D_HEAD} K={K}"
    benchmark.group = group
    if provider == "plain":
        fn = _synchronized(lambda: F.scaled_dot_product_attention(q, k, v))
    else:
        fn = _synchronized(lambda: attention_label_stats(q, k, v, labels, K, mode=mode, backend=provider))
        out = fn()[0]
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v),
                                   **({"rtol": 1e-4, "atol": 1e-5} if DTYPE == torch.float32
                                      else {"rtol": 2e-2, "atol": 2e-2}))
    benchmark(fn)
    _record(benchmark, group, provider)
