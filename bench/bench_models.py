"""Whole-model inference: pruned CCT-7/3x1 (100 classes, 32x32) against the best dense runtimes.

    pytest bench/bench_models.py --benchmark-only [--bench-full] [--benchmark-json=models.json]

One group per (dtype, batch, block density). In each group every provider runs in one process,
**interleaved round by round** (ROUNDS rounds, default 15, env CCTK_BENCH_ROUNDS); a provider's
figure is its **fastest round** (on a shared 2-core machine medians swing 10-35%), and each test
records it in ``extra_info`` (``images_per_s``, ``ratio_vs_best_dense``, ``ratio_vs_openvino``)
beside pytest-benchmark's own rounds. Providers:

* dense (the unpruned model): ``torch eager`` (stock PyTorch: SDPA attention), ``torch.compile``,
  ``OpenVINO`` (``ov.convert_model``; ``INFERENCE_PRECISION_HINT`` f32/bf16, latency hint, the
  torch thread count), ``ONNX Runtime`` (fp32; ``torch.onnx.export`` dynamo=False, opset 17,
  intra-op spinning off), ``cctk.optimize``;
* ``structured``: a smaller dense model keeping the same fraction of every FF layer's units and
  every head's dims (``cctk.prune.structured.remove_nodes``), run by OpenVINO and by
  ``cctk.optimize`` (and ``+ compile``): what a user could deploy instead of block sparsity;
* ``pruned``: every encoder linear an ``ANDCLinear`` holding the kept 32x32 blocks (random masks,
  seeded): ``cctk eager`` (the module as loaded) and ``cctk.optimize`` (and ``+ compile``).

``ratio_vs_best_dense``: images/s over the best dense provider's in the same group (OpenVINO,
ONNX Runtime, torch, torch.compile or cctk.optimize, whichever is fastest). Before timing, every
provider's logits are checked against the fp32 output of the model it runs (bf16: within 5% of
the logit scale). Without openvino / onnxruntime (``pip install cctk[bench]``) those providers
skip with a one-line reason. The session summary prints each group's table and the machine's
measured peaks (``torch.mm`` 2048^3 fp32/bf16, copy bandwidth).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from cctk.models import create_model
from cctk import _ext
from cctk.timing import cpu_flags, cpu_model, images_per_s, interleaved_times
from cctk.prune import PrunePlan, apply_masks, convert_to_andc, encoder_linear_names
from cctk.prune.masks import block_grid
from cctk.prune.structured import node_fraction_keep, remove_nodes
from runtimes import (cctk_runner, checked_runs, onnxruntime_runner, openvino_int8_runner, openvino_runner,
                      torch_runner)

MODEL = "cct_7_3x1_32"
NUM_CLASSES = 100
BLOCK = 32
ROUNDS = int(os.environ.get("CCTK_BENCH_ROUNDS", "15"))
DENSE_KINDS = ("torch eager", "torch.compile", "OpenVINO", "OpenVINO int8", "ONNX Runtime", "cctk.optimize")
PROVIDERS = (
    [("dense", k) for k in DENSE_KINDS]
    + [("structured", "OpenVINO"), ("structured", "OpenVINO int8"), ("structured", "cctk.optimize"),
       ("structured", "cctk.optimize+compile")]
    + [("pruned", "cctk eager"), ("pruned", "cctk.optimize"), ("pruned", "cctk.optimize+compile")]
)
FULL_ONLY: set = set()  # every provider runs by default
_GROUPS: dict = {}
PEAKS: dict = {}


def cpu_has_bf16_units() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _groups(full: bool):
    groups = [(torch.bfloat16, 32, 0.25), (torch.bfloat16, 1, 0.25), (torch.float32, 32, 0.25),
              (torch.float32, 1, 0.25), (torch.bfloat16, 32, 0.5)]
    if full:
        groups += [(torch.float32, 32, 0.5), (torch.bfloat16, 32, 0.125), (torch.bfloat16, 1, 0.5)]
    if not cpu_has_bf16_units() and os.environ.get("CCTK_BENCH_BF16", "0") != "1":
        # no AVX512-BF16 or AMX: torch's bf16 GEMMs run ~500x slower than fp32 here and nobody
        # deploys bf16 on such a CPU; the fp32 groups are this family's table (CCTK_BENCH_BF16=1
        # runs the bf16 groups anyway)
        groups = [g for g in groups if g[0] != torch.bfloat16]
    return groups


def _gid(g):
    dtype, batch, density = g
    return f"{str(dtype).replace('torch.', '')}-batch{batch}-d{density:g}"


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        full = metafunc.config.getoption("--bench-full")
        cases = [(g, p) for g in _groups(full) for p in PROVIDERS if full or p not in FULL_ONLY]
        metafunc.parametrize("case", cases, ids=[f"{_gid(g)}-{p[0]}-{p[1]}" for g, p in cases])


# ---------------------------------------------------------------------------------------------
# models

_BASE = {}


def _base():
    if "dense" not in _BASE:
        torch.manual_seed(0)
        _BASE["dense"] = create_model(MODEL, num_classes=NUM_CLASSES).eval()
    return _BASE["dense"]


def _pruned(density, seed=0):
    base = _base()
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name in encoder_linear_names(base):
        nbr, nbc = block_grid(base.get_submodule(name).weight.shape, BLOCK)
        m = torch.zeros(nbr * nbc, dtype=torch.bool)
        m[torch.randperm(nbr * nbc, generator=g)[:round(density * nbr * nbc)]] = True
        masks[name] = m.view(nbr, nbc)
    masked = copy.deepcopy(base)
    apply_masks(masked, PrunePlan(method="random", block_size=BLOCK, block_masks=masks, classifier_mask=None))
    return convert_to_andc(copy.deepcopy(masked)).eval()


def _structured(density):
    base = _base()
    ff, heads = node_fraction_keep(base, density, seed=0)
    return remove_nodes(base, ff, heads).eval()


def _build(kind, runtime, dtype, density, x):
    model = {"dense": _base, "structured": lambda: _structured(density), "pruned": lambda: _pruned(density)}[kind]()
    if runtime == "torch eager":
        return model, torch_runner(model, dtype), None
    if runtime == "torch.compile":
        return model, torch_runner(model, dtype, compile_=True), None
    if runtime == "OpenVINO":
        run, why = openvino_runner(model, dtype, x)
        return model, run, why
    if runtime == "OpenVINO int8":
        run, why = openvino_int8_runner(model, x)
        return model, run, why
    if runtime == "ONNX Runtime":
        run, why = onnxruntime_runner(model, dtype, x)
        return model, run, why
    if runtime == "cctk eager":
        m = copy.deepcopy(model).to(dtype)

        def run(xb):
            with torch.no_grad():
                return m(xb.to(dtype)).float()
        return model, run, None
    if runtime == "cctk.optimize":
        return model, cctk_runner(model, dtype, x), None
    if runtime == "cctk.optimize+compile":
        return model, cctk_runner(model, dtype, x, compile_=True), None
    raise ValueError(runtime)


def _group(g, full):
    """Build every provider of group g, check its output, time all interleaved; cached."""
    if g in _GROUPS:
        return _GROUPS[g]
    dtype, batch, density = g
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    torch._dynamo.reset()  # each group compiles new model objects: start below dynamo's recompile limit
    runs, skipped = checked_runs({p: _build(p[0], p[1], dtype, density, x) for p in PROVIDERS
                                  if full or p not in FULL_ONLY}, x, dtype)
    times = interleaved_times({p: (lambda run=run: run(x)) for p, run in runs.items()}, rounds=ROUNDS, warmup=0)
    best = {p: images_per_s(ts, batch) for p, ts in times.items()}
    dense = {p: v for p, v in best.items() if p[0] == "dense"}
    best_dense = max(dense, key=dense.get) if dense else None
    _GROUPS[g] = dict(runs=runs, skipped=skipped, times=times, images_per_s=best, best_dense=best_dense, x=x)
    return _GROUPS[g]


def test_model_throughput(benchmark, case, bench_full):
    g, p = case
    dtype, batch, density = g
    res = _group(g, bench_full)
    if p in res["skipped"]:
        pytest.skip(res["skipped"][p])
    dt = str(dtype).replace("torch.", "")
    benchmark.group = f"{MODEL} c100 {dt} batch {batch} density {density:g}"
    ips = res["images_per_s"][p]
    bd = res["best_dense"]
    ov = res["images_per_s"].get(("dense", "OpenVINO"))
    benchmark.extra_info.update(
        provider=f"{p[0]} {p[1]}", model=MODEL, dtype=dt, batch=batch, density=density, block_size=BLOCK,
        threads=torch.get_num_threads(), rounds=ROUNDS, images_per_s=ips,
        best_dense_provider=f"{bd[0]} {bd[1]}" if bd else None,
        ratio_vs_best_dense=ips / res["images_per_s"][bd] if bd else None,
        ratio_vs_openvino=ips / ov if ov else None)
    run, x = res["runs"][p], res["x"]
    benchmark.pedantic(run, args=(x,), rounds=3, warmup_rounds=0)


# ---------------------------------------------------------------------------------------------
def machine_peaks() -> dict:
    """torch.mm 2048^3 GFLOP/s (fp32, bf16) and copy bandwidth (GB/s, 256 MiB), fastest of 5."""
    if PEAKS:
        return PEAKS
    for dt in (torch.float32, torch.bfloat16):
        # a CPU without bf16 units runs torch's bf16 mm at well under 1 GFLOP/s: 2048^3 would take minutes
        n = 2048 if dt == torch.float32 or cpu_has_bf16_units() else 256
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        torch.mm(a, b)
        best = min(interleaved_times({"mm": lambda: torch.mm(a, b)}, rounds=5)["mm"])
        PEAKS[f"mm_{str(dt).replace('torch.', '')}_gflops"] = 2 * n ** 3 / best / 1e9
    src = torch.empty(64 << 20, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(interleaved_times({"copy": lambda: dst.copy_(src)}, rounds=5)["copy"])
    PEAKS["copy_gbps"] = 2 * src.numel() * 4 / best / 1e9  # read + write
    return PEAKS


def summary_lines() -> list[str]:
    """The per-group tables (images/s, ratio to the best dense runtime) for the session summary."""
    if not _GROUPS:
        return []
    flags = cpu_flags()
    units = ("AMX" if "amx_bf16" in flags else "no AMX") + (", AVX512-BF16" if "avx512_bf16" in flags else "") + \
        (", AVX-512" if "avx512f" in flags else ", AVX2 only")
    lines = [f"CPU: {cpu_model()} ({units}; cctk kernels: {_ext.cpu_capabilities()}), {torch.get_num_threads()} threads"]
    for g, res in _GROUPS.items():
        dtype, batch, density = g
        bd = res["best_dense"]
        best = res["images_per_s"][bd] if bd else None
        lines.append(f"{MODEL} {str(dtype).replace('torch.', '')} batch {batch}, block density {density:g} "
                     f"(fastest of {ROUNDS} interleaved rounds; best dense: {bd[0] + ' ' + bd[1] if bd else '-'})")
        for p in PROVIDERS:
            if p in res["images_per_s"]:
                ips = res["images_per_s"][p]
                ratio = f"{ips / best:5.2f}x" if best else "     "
                lines.append(f"    {p[0]:<11} {p[1]:<22} {ips:8.1f} img/s  {ratio}")
            elif p in res["skipped"]:
                lines.append(f"    {p[0]:<11} {p[1]:<22}  skipped: {res['skipped'][p]}")
    pk = machine_peaks()
    lines.append(f"machine peaks: torch.mm 2048^3 {pk['mm_float32_gflops']:.0f} GFLOP/s fp32, "
                 f"{pk['mm_bfloat16_gflops']:.1f} GFLOP/s bf16; copy {pk['copy_gbps']:.0f} GB/s "
                 f"(read + write); torch threads {torch.get_num_threads()}")
    return lines
