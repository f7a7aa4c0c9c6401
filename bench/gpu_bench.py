"""GPU benchmarks of cctk's GPU paths, run by ``bench/gpu_check.sh`` (one call on a lent GPU).

    python bench/gpu_bench.py OUT_DIR [--budget SECONDS] [--sections a,b] [--providers p,q]
                              [--append] [--dry-run] [--table-only]

Sections (each with a share of the time budget; what does not fit is skipped with a note row):

1. ``ceilings``: device-to-device copy bandwidth and a bf16 8192^3 cuBLAS matmul (the two roofs).
2. ``linear``: ANDCLinear forward (``cctk.ops.bsr_linear``, providers ``ext`` = CUDA kernels of the
   extension, ``triton``) vs cuBLAS dense ``F.linear`` with the masked weight (``dense``) vs
   PyTorch BSR (``torch_bsr``); bf16; blocks 64/32/16; density 0.25 first, then 0.125 and 0.5
   (exactly that fraction of blocks, random); in->out 1024->4096 first, then 256->512 and 512->256
   at 8192/16384 rows, then the other row counts (256 to 262144). At every timed point each
   provider's output is checked against bf16 dense at that row count (``check_err``).
3. ``backward``: forward + backward (x, kept blocks, bias) of the ext op vs dense, 16384 rows.
4. ``snp``: the fused label-stats kernels timed directly (``cctk.kernels.label_stats``) and
   through the op (its Python overhead reported apart), vs the plain kernels without statistics
   (``F.gelu(F.linear)``, ``F.scaled_dot_product_attention``), CCT shapes.
5. ``cct``: CCT-7/3x1 (100 classes, 32x32) images/s at batch 1 and 256, bf16, eval, each model
   captured in a CUDA graph: every encoder linear as ``cctk.nn.ANDCLinear`` at 25% block density
   (B = 64) vs the same masked model run dense; outputs compared.

Timing: the median of CUDA-event timings after warm-up. Inputs are fresh random tensors (never
zeros), as many sets as make several times the GPU's L2 (read off the device), rotated. A point
whose dense time is under ``GRAPH_BELOW_MS`` (0.2 ms) is timed for every provider from a CUDA graph
(the calls over all input sets captured once, the replay time divided by the calls): at CCT widths
eager timings would measure Python and dispatch. Rows say which (``timing``: graph / eager).
Writes ``OUT_DIR/results.json`` (every row + the environment) after every section (``--append``
adds to the rows already there: gpu_check.sh runs the script several times), ``OUT_DIR/bench.log``
(appended) and ``OUT_DIR/table.txt``; prints the short table LAST. ``--table-only``: the table of
an existing results.json.

``--dry-run``: the same code on the CPU with tiny shapes and a few repetitions (no GPU needed):
checks the script's logic, imports and table; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ---------------------------------------------------------------------------------------------
# Run state: rows, log, budget

class Run:
    def __init__(self, out_dir: str, budget_s: float, dry: bool, providers=None, append: bool = False):
        self.out_dir = out_dir
        self.dry = dry
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.providers = providers  # None: all
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.env: dict = {}
        os.makedirs(out_dir, exist_ok=True)
        self.results_path = os.path.join(out_dir, "results.json")
        self.earlier = load_results(self.results_path) if append else {}
        self.log_f = open(os.path.join(out_dir, "bench.log"), "a" if append else "w")
        self.dev = torch.device("cpu" if dry else "cuda")

    def wants(self, provider: str) -> bool:
        return self.providers is None or provider in self.providers

    def all_rows(self) -> list[dict]:
        return self.earlier.get("rows", []) + self.rows

    def all_notes(self) -> list[str]:
        return self.earlier.get("notes", []) + self.notes

    def save(self):
        """results.json with the earlier invocations' rows (``--append``) and this one's so far."""
        data = {"environment": self.env or self.earlier.get("environment", {}), "rows": self.all_rows(),
                "notes": self.all_notes(),
                "elapsed_s": round(self.earlier.get("elapsed_s", 0) + time.perf_counter() - self.t0, 1)}
        tmp = self.results_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, self.results_path)

    def log(self, msg: str):
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log_f.write(line + "\n")
        self.log_f.flush()

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def add(self, section: str, **kw):
        row = {"section": section, **kw}
        self.rows.append(row)
        self.log(json.dumps(row, default=str))
        return row

    def error(self, section: str, what: str, exc: BaseException):
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        self.add(section, name=what, error=tb[:400])

    def note(self, msg: str):
        self.notes.append(msg)
        self.log("NOTE " + msg)


# ---------------------------------------------------------------------------------------------
# Timing

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(fn, inputs, dev, target_s=0.12, min_reps=5, max_reps=100, warmup=3):
    """Median time (ms) of ``fn(inp)`` over repetitions rotating through ``inputs``.

    CUDA: an event pair around each call, all enqueued back to back, one sync at the end (GPU time
    per call, launches pipelined). CPU: perf_counter around each call. Returns (median_ms, reps).
    """
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    sync(dev)
    # estimate one call to choose the number of repetitions
    t = time.perf_counter()
    fn(inputs[0])
    sync(dev)
    one = max(time.perf_counter() - t, 1e-6)
    reps = int(max(min_reps, min(max_reps, target_s / one)))
    times = []
    if dev.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for r in range(reps):
            ev[r][0].record()
            fn(inputs[r % len(inputs)])
            ev[r][1].record()
        torch.cuda.synchronize(dev)
        times = [a.elapsed_time(b) for a, b in ev]
    else:
        for r in range(reps):
            t = time.perf_counter()
            fn(inputs[r % len(inputs)])
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), reps


GRAPH_BELOW_MS = 0.2   # points faster than this (dense, eager) are timed from a CUDA graph


def l2_bytes(dev) -> int:
    """The GPU's L2 size (read off the device); 4 MiB stands in on the CPU (dry run)."""
    if dev.type != "cuda":
        return 4 << 20
    return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or (50 << 20))


def input_sets(make, nbytes_one: int, dev, factor: int = 4, cap_bytes: int = 8 << 30, max_sets: int = 64):
    """Input sets (``make()`` each) that together hold >= ``factor`` x L2, at least 2: rotating
    through them, no call finds its inputs in L2 from the call before."""
    n = max(2, math.ceil(factor * l2_bytes(dev) / max(nbytes_one, 1)))
    n = min(n, max_sets, max(2, cap_bytes // max(nbytes_one, 1)))
    return [make() for _ in range(n)]


def bench_graph(fn, inputs, dev, min_calls=20, replays=10):
    """Per-call time (ms) of ``fn(inp)`` from a CUDA graph: the calls over every input set (at
    least ``min_calls`` in all) captured once; the median over ``replays`` replays, divided by the
    calls. Removes the host's launch and Python overhead, so small problems show the kernels' own
    time. Warm-up runs eagerly on a side stream (Triton compiles, caches fill), then once more on
    the current stream after a sync, so that the ext op's order cache is seen complete and the
    capture reuses it instead of sorting in every captured call."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for inp in inputs:
            fn(inp)
    torch.cuda.current_stream(dev).wait_stream(side)
    torch.cuda.synchronize(dev)
    fn(inputs[0])
    torch.cuda.synchronize(dev)
    calls = len(inputs) * max(1, math.ceil(min_calls / len(inputs)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in range(calls):
            fn(inputs[c % len(inputs)])
    graph.replay()
    torch.cuda.synchronize(dev)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for a, b in ev:
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize(dev)
    del graph
    return statistics.median(a.elapsed_time(b) for a, b in ev) / calls


def timed(run, fn, inputs, graph: bool | None = None, target_s=0.12):
    """``(ms, timing, eager_ms)``: eager CUDA events first; then, on a GPU, the graph time when
    ``graph`` is True, or (``graph`` None) when the eager time is under GRAPH_BELOW_MS."""
    ms, _ = bench(fn, inputs, run.dev, target_s=target_s)
    if run.dev.type == "cuda" and (graph if graph is not None else ms < GRAPH_BELOW_MS):
        return bench_graph(fn, inputs, run.dev), "graph", ms
    return ms, "eager", ms


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def exact_block_mask(nr: int, nc: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly round(density * nr * nc) kept blocks (at least 1), at random positions."""
    n = nr * nc
    k = max(1, int(round(density * n)))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[:k]] = True
    return mask.reshape(nr, nc)


def expand(mask: torch.Tensor, B: int, out_f: int, in_f: int) -> torch.Tensor:
    return mask.repeat_interleave(B, 0).repeat_interleave(B, 1)[:out_f, :in_f]


# ---------------------------------------------------------------------------------------------
# Environment

def environment(run: Run) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "host": platform.node(), "argv": sys.argv, "dry_run": run.dry,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = f"unavailable ({e})"
    if run.dev.type == "cuda":
        p = torch.cuda.get_device_properties(run.dev)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}", l2_mib=round(l2_bytes(run.dev) / 2**20, 1))
    try:
        from cctk import _ext
        env["cctk_ext"] = _ext.info()
    except Exception as e:
        env["cctk_ext"] = f"import failed: {e}"
    return env


def section_ceilings(run: Run, share: float):
    dev = run.dev
    n = (1 << 28) if not run.dry else (1 << 20)  # 1 GiB of fp32 on the GPU
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)
    ms, _ = bench(lambda t: b.copy_(t), [a], dev, target_s=0.2)
    gbs = 2 * a.numel() * 4 / (ms * 1e-3) / 1e9
    run.add("ceilings", name="d2d_copy", ms=ms, GBps=round(gbs, 1), bytes=2 * a.numel() * 4)
    del a, b
    s = 8192 if not run.dry else 256
    dt = torch.bfloat16 if not run.dry else torch.float32
    xs = [torch.randn(s, s, device=dev, dtype=dt) for _ in range(2)]
    w = torch.randn(s, s, device=dev, dtype=dt)
    ms, _ = bench(lambda t: t @ w, xs, dev, target_s=0.3)
    run.add("ceilings", name=f"matmul_{s}^3_{str(dt).split('.')[-1]}", ms=ms,
            TFLOPs=round(2 * s ** 3 / (ms * 1e-3) / 1e12, 1))


# ---------------------------------------------------------------------------------------------
# Block-sparse linear

def _bsr_module():
    # cctk.ops re-exports the function bsr_linear under the module's name: import the module itself
    return importlib.import_module("cctk.ops.block_sparse")


def _providers(run: Run):
    bl = _bsr_module()
    provs = {}

    def dense(x, ctx):
        return F.linear(x, ctx["w_masked"], ctx["bias"])

    provs["dense"] = dense

    def ext(x, ctx):
        return bl.bsr_linear(x, ctx["values"], ctx["crow"], ctx["col"], ctx["bias"], ctx["out_f"], backend="ext")

    provs["ext"] = ext

    def tri(x, ctx):
        return bl.bsr_linear(x, ctx["values"], ctx["crow"], ctx["col"], ctx["bias"], ctx["out_f"], backend="triton",
                             transposed_index=ctx["tindex"])  # kept by ANDCLinear, as here

    provs["triton"] = tri

    def tbsr(x, ctx):
        return F.linear(x, ctx["w_bsr"], ctx["bias"])

    provs["torch_bsr"] = tbsr
    return provs


# (in, out, rows) in order of importance: 1024->4096 first (the shape where pruning can pay),
# then the CCT widths at 8192/16384 rows, then the rest.
LINEAR_POINTS = [(1024, 4096, 16384), (1024, 4096, 262144), (256, 512, 8192), (256, 512, 16384),
                 (512, 256, 8192), (512, 256, 16384), (1024, 4096, 256), (256, 512, 256), (512, 256, 256),
                 (1024, 4096, 4096), (256, 512, 65536), (256, 512, 262144), (512, 256, 262144)]
LINEAR_CONFIGS = [(64, 0.25), (32, 0.25), (16, 0.25), (64, 0.125), (32, 0.125), (64, 0.5), (16, 0.5)]


def _linear_layer(run: Run, in_f, out_f, B, density, dtype, gen):
    bl = _bsr_module()
    dev = run.dev
    nr, nc = math.ceil(out_f / B), math.ceil(in_f / B)
    mask = exact_block_mask(nr, nc, density, gen).to(dev)
    w = (torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5).to(dev, dtype)
    w_masked = w * expand(mask, B, out_f, in_f).to(dtype)
    bias = torch.randn(out_f, generator=gen).to(dev, dtype)
    values, crow, col = bl.dense_to_bsr(w_masked, mask, B)
    ctx = dict(w_masked=w_masked, bias=bias, values=values, crow=crow, col=col, out_f=out_f,
               kept=mask.float().mean().item(), tindex=bl.bsr_transpose_index(crow, col, nc), w_bsr=None)
    if run.wants("torch_bsr") and in_f % B == 0 and out_f % B == 0:
        try:
            ctx["w_bsr"] = w_masked.to_sparse_bsr((B, B))
        except Exception as e:  # older torch / dtype not supported
            run.error("linear", f"torch_bsr build {in_f}x{out_f} B{B}", e)
    return ctx


def section_linear(run: Run, share: float):
    dev = run.dev
    deadline = time.perf_counter() + share
    if run.dry:
        points, cfgs, dtype = [(64, 96, 8), (64, 96, 32)], [(32, 0.25), (16, 0.5)], torch.float32
    else:
        points, cfgs, dtype = LINEAR_POINTS, LINEAR_CONFIGS, torch.bfloat16
    dn = str(dtype).split(".")[-1]
    provs = {k: f for k, f in _providers(run).items() if k == "dense" or run.wants(k)}
    gen = torch.Generator().manual_seed(0)
    layers = {}
    skipped = 0
    for B, density in cfgs:
        for in_f, out_f, M in points:
            if time.perf_counter() > deadline:
                skipped += 1
                continue
            key = (in_f, out_f, B, density)
            if key not in layers:
                layers[key] = _linear_layer(run, in_f, out_f, B, density, dtype, gen)
            ctx = layers[key]
            xs = input_sets(lambda: torch.randn(M, in_f, device=dev, dtype=dtype),
                            M * (in_f + out_f) * dtype.itemsize, dev, cap_bytes=(2 << 30) if not run.dry else 1 << 20)
            with torch.no_grad():
                ref = provs["dense"](xs[0], ctx).float()  # bf16 dense at the timed row count
            res, graph = {}, None
            for name, fn in provs.items():
                if name == "torch_bsr" and ctx["w_bsr"] is None:
                    continue
                label = f"{name} {in_f}x{out_f} B{B} d{density} rows{M}"
                try:
                    with torch.no_grad():
                        err = rel_err(fn(xs[0], ctx), ref) if name != "dense" else 0.0
                        try:
                            ms, timing, eager_ms = timed(run, lambda x: fn(x, ctx), xs, graph=graph)
                        except Exception as e:  # not capturable (torch_bsr may sync): eager, noted
                            if graph is not True:
                                raise
                            run.error("linear", f"graph {label} (eager instead)", e)
                            ms, timing, eager_ms = timed(run, lambda x: fn(x, ctx), xs, graph=False)
                    if name == "dense":
                        graph = timing == "graph"   # every provider at this point is timed alike
                    res[name] = (ms, timing)
                    flops = 2.0 * M * in_f * out_f * (ctx["kept"] if name != "dense" else 1.0)
                    run.add("linear", provider=name, in_f=in_f, out_f=out_f, B=B, density=density,
                            kept=round(ctx["kept"], 4), rows=M, dtype=dn, ms=ms, timing=timing,
                            eager_ms=eager_ms, input_sets=len(xs),
                            TFLOPs_useful=round(flops / (ms * 1e-3) / 1e12, 2), check_err=err)
                except Exception as e:
                    run.error("linear", label, e)
            for name, (ms, timing) in res.items():
                if name != "dense" and "dense" in res and res["dense"][1] == timing:
                    run.add("linear_speedup", provider=name, in_f=in_f, out_f=out_f, B=B, density=density,
                            rows=M, timing=timing, speedup=round(res["dense"][0] / ms, 3))
            del xs, ref
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if skipped:
        run.note(f"linear ({','.join(provs)}): {skipped} (config, point) pairs skipped: the section's "
                 f"{share:.0f}s budget ran out")


def section_backward(run: Run, share: float):
    dev = run.dev
    bl = _bsr_module()
    deadline = time.perf_counter() + share
    dtype = torch.float32 if run.dry else torch.bfloat16
    M = 32 if run.dry else 16384
    shapes = [(64, 96)] if run.dry else [(256, 512), (512, 256), (1024, 4096)]
    gen = torch.Generator().manual_seed(1)
    B, density = (32, 0.25) if run.dry else (64, 0.25)
    for in_f, out_f in shapes:
        if time.perf_counter() > deadline:
            run.note(f"backward: {in_f}x{out_f} skipped (budget)")
            continue
        mask = exact_block_mask(math.ceil(out_f / B), math.ceil(in_f / B), density, gen).to(dev)
        w = (torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5).to(dev, dtype) * expand(mask, B, out_f, in_f).to(dev, dtype)
        bias = torch.randn(out_f, generator=gen).to(dev, dtype)
        values, crow, col = bl.dense_to_bsr(w, mask, B)
        xs = input_sets(lambda: torch.randn(M, in_f, device=dev, dtype=dtype, requires_grad=True),
                        M * (2 * in_f + 2 * out_f) * dtype.itemsize, dev, cap_bytes=(2 << 30) if not run.dry else 1 << 20)
        gout = torch.randn(M, out_f, device=dev, dtype=dtype)
        wd = w.clone().requires_grad_(True)
        bd = bias.clone().requires_grad_(True)
        vs = values.clone().requires_grad_(True)
        bs = bias.clone().requires_grad_(True)

        def dense_fb(x):  # autograd.grad: no .grad accumulation, so the graph needs no static grads
            return torch.autograd.grad(F.linear(x, wd, bd), (x, wd, bd), gout)

        def ext_fb(x):
            return torch.autograd.grad(bl.bsr_linear(x, vs, crow, col, bs, out_f, backend="ext"), (x, vs, bs), gout)

        graph = None
        for name, fn in (("dense", dense_fb), ("ext", ext_fb)):
            if not run.wants(name) and name != "dense":
                continue
            try:
                ms, timing, eager_ms = timed(run, fn, xs, graph=graph)
                graph = timing == "graph" if graph is None else graph
                run.add("backward", provider=name, in_f=in_f, out_f=out_f, B=B, density=density, rows=M,
                        ms_fwd_bwd=ms, timing=timing, eager_ms=eager_ms)
            except Exception as e:
                run.error("backward", f"{name} {in_f}x{out_f}", e)


# ---------------------------------------------------------------------------------------------
# SNP fused ops

def section_snp(run: Run, share: float):
    """The fused label-stats kernels at kernel level (the launchers of cctk.kernels.label_stats,
    graph-timed), the op around them (graph-timed and eager: the difference is its Python
    overhead: validation, dispatch), the plain kernels without statistics, the torch twins."""
    dev = run.dev
    from cctk.ops import attention_label_stats, linear_label_stats
    deadline = time.perf_counter() + share
    K = 100 if not run.dry else 5
    Bsz, T = (64, 256) if not run.dry else (4, 17)
    dtypes = [torch.bfloat16, torch.float32] if not run.dry else [torch.float32]
    tri_ok = dev.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if tri_ok:
        from cctk.kernels import label_stats as kls
    for dtype in dtypes:
        dn = str(dtype).split(".")[-1]
        for d_in, d_out, act in ([(256, 512, "gelu"), (512, 256, "none")] if not run.dry else [(40, 72, "gelu")]):
            if time.perf_counter() > deadline:
                run.note(f"snp: FF {d_in}->{d_out} {dn} skipped (budget)")
                continue
            w = (torch.randn(d_out, d_in, device=dev) / d_in ** 0.5).to(dtype)
            b = torch.randn(d_out, device=dev, dtype=dtype)
            sets = input_sets(lambda: (torch.randn(Bsz, T, d_in, device=dev, dtype=dtype),
                                       torch.randint(0, K, (Bsz,), device=dev)),
                              Bsz * T * (d_in + d_out) * dtype.itemsize, dev)
            fns = {"plain": lambda s: F.gelu(F.linear(s[0], w, b)) if act == "gelu" else F.linear(s[0], w, b)}
            for mode in ("pooled", "token"):
                fns[f"torch_{mode}"] = (lambda s, m=mode: linear_label_stats(s[0], w, b, s[1], K, activation=act,
                                                                             mode=m, backend="torch"))
                if tri_ok:
                    fns[f"kernel_{mode}"] = (lambda s, m=mode: kls.linear_label_stats_forward(
                        s[0], w, b, s[1], K, act, m))
                    fns[f"op_{mode}"] = (lambda s, m=mode: linear_label_stats(
                        s[0], w, b, s[1], K, activation=act, mode=m, backend="triton"))
            _snp_rows(run, f"ff_{d_in}x{d_out}_{act}", dn, fns, sets)
        H, dh = (4, 64) if not run.dry else (2, 16)
        if time.perf_counter() > deadline:
            run.note(f"snp: attention {dn} skipped (budget)")
            continue
        sets = input_sets(lambda: tuple(torch.randn(Bsz, H, T, dh, device=dev, dtype=dtype) for _ in range(3))
                          + (torch.randint(0, K, (Bsz,), device=dev),), 4 * Bsz * H * T * dh * dtype.itemsize, dev)
        fns = {"plain": lambda s: F.scaled_dot_product_attention(*s[:3])}
        for mode in ("pooled", "token"):
            fns[f"torch_{mode}"] = (lambda s, m=mode: attention_label_stats(*s, K, mode=m, backend="torch"))
            if tri_ok:
                fns[f"kernel_{mode}"] = (lambda s, m=mode: kls.attention_label_stats_forward(*s, K, m))
                fns[f"op_{mode}"] = (lambda s, m=mode: attention_label_stats(*s, K, mode=m, backend="triton"))
        _snp_rows(run, f"attn_H{H}_T{T}_dh{dh}", dn, fns, sets)


def _snp_rows(run: Run, op: str, dn: str, fns: dict, sets: list):
    res = {}
    for name, fn in fns.items():
        try:
            with torch.no_grad():
                # the torch twins are timed eagerly (what a user runs); the rest from a graph on a GPU
                ms, timing, eager_ms = timed(run, fn, sets, graph=not name.startswith("torch_"))
            res[name] = ms
            run.add("snp", op=op, provider=name, dtype=dn, ms=ms, timing=timing, eager_ms=eager_ms)
            if name.startswith("op_") and timing == "graph":
                run.add("snp_op_overhead", op=op, provider=name, dtype=dn,
                        python_overhead_us=round((eager_ms - ms) * 1e3, 1))
        except Exception as e:
            run.error("snp", f"{op} {name} {dn}", e)
    for name, ms in res.items():
        if name != "plain" and "plain" in res:
            run.add("snp_ratio", op=op, provider=name, dtype=dn, ratio_vs_plain=round(ms / res["plain"], 3))


# ---------------------------------------------------------------------------------------------
# CCT-7/3x1 dense vs pruned

ENCODER_LINEARS = ("self_attn.qkv", "self_attn.proj", "linear1", "linear2")


def _get(mod, path):
    for p in path.split("."):
        mod = getattr(mod, p)
    return mod


def _set(mod, path, new):
    *parents, last = path.split(".")
    for p in parents:
        mod = getattr(mod, p)
    setattr(mod, last, new)


def section_cct(run: Run, share: float):
    import copy

    from cctk.models import create_model
    from cctk.nn import ANDCLinear
    dev = run.dev
    deadline = time.perf_counter() + share
    dtype = torch.bfloat16 if not run.dry else torch.float32
    B, density = 64, 0.25
    batches = [1, 256] if not run.dry else [1, 2]
    gen = torch.Generator().manual_seed(2)
    model_name = "cct_7_3x1_32" if not run.dry else "cct_2_3x2_32"  # dry run: the smallest config
    model = create_model(model_name, num_classes=100).to(dev, dtype).eval()
    masks = {}
    with torch.no_grad():
        for bi, blk in enumerate(model.blocks):
            for path in ENCODER_LINEARS:
                lin = _get(blk, path)
                m = exact_block_mask(math.ceil(lin.out_features / B), math.ceil(lin.in_features / B), density, gen)
                masks[(bi, path)] = m.to(dev)
                lin.weight.mul_(expand(m, B, lin.out_features, lin.in_features).to(dev, dtype))
    variants = {"dense_masked": model}
    backends = [b for b in (["ext", "triton"] if not run.dry else ["ext"])  # the interpreter is far too slow
                if run.wants(b)]
    for backend in backends:
        pruned = copy.deepcopy(model)
        try:
            for bi, blk in enumerate(pruned.blocks):
                for path in ENCODER_LINEARS:
                    new = ANDCLinear.from_dense(_get(blk, path), masks[(bi, path)], B)
                    new.backend = backend
                    _set(blk, path, new)
            variants[f"andc_{backend}"] = pruned.eval()
        except Exception as e:
            run.error("cct", f"build pruned model ({backend})", e)
    try:  # the way a user runs a model: cctk.optimize (channels-last tokenizer, SDPA, frozen weights)
        import cctk
        variants["dense_optimized"] = cctk.optimize(model, dtype=dtype)
        if "andc_ext" in variants:
            variants["andc_ext_optimized"] = cctk.optimize(variants["andc_ext"], dtype=dtype)
    except Exception as e:
        run.error("cct", "cctk.optimize", e)
    for bs in batches:
        if time.perf_counter() > deadline:
            run.note(f"cct: batch {bs} skipped (budget)")
            continue
        imgs = [torch.randn(bs, 3, 32, 32, device=dev, dtype=dtype) for _ in range(3)]
        with torch.no_grad():
            ref = model(imgs[0]).double()
        res = {}
        for name, mdl in variants.items():
            try:
                with torch.no_grad():
                    err = rel_err(mdl(imgs[0]), ref)
                    # the whole forward captured in a CUDA graph (as torch.compile's
                    # "reduce-overhead" would run it), dense and pruned alike
                    ms, timing, eager_ms = timed(run, mdl, imgs, graph=True, target_s=0.3)
                res[name] = ms
                run.add("cct", model=model_name, variant=name, batch=bs, density=density, B=B,
                        dtype=str(dtype).split(".")[-1], ms=ms, timing=timing, eager_ms=eager_ms,
                        images_per_s=round(bs / (ms * 1e-3), 1), logits_rel_err_vs_dense=err)
            except Exception as e:
                run.error("cct", f"{name} batch {bs}", e)
        for name, ms in res.items():
            if name != "dense_masked" and "dense_masked" in res:
                run.add("cct_speedup", variant=name, batch=bs, speedup=round(res["dense_masked"] / ms, 3))


# ---------------------------------------------------------------------------------------------
# Table

def _find(all_rows, section, **kw):
    return [r for r in all_rows if r.get("section") == section and "error" not in r
            and all(r.get(k) == v for k, v in kw.items())]


def make_table(rows: list, notes: list, env: dict) -> str:
    L = []
    gpu = env.get("gpu", "CPU (dry run: numbers mean nothing)")
    L.append(f"== cctk GPU check: {gpu} | torch {env.get('torch')} | triton {env.get('triton')} | "
             f"ext cuda kernels: {(env.get('cctk_ext') or {}).get('cuda_kernels') if isinstance(env.get('cctk_ext'), dict) else env.get('cctk_ext')}")
    for r in _find(rows, "ceilings"):
        if "GBps" in r:
            L.append(f"ceiling: copy {r['GBps']} GB/s")
        elif "TFLOPs" in r:
            L.append(f"ceiling: {r['name']} {r['TFLOPs']} TFLOP/s")
    sp = _find(rows, "linear_speedup")
    if sp:
        rows_set = sorted({r["rows"] for r in sp})
        show = [m for m in (256, 8192, 16384, 262144) if m in rows_set] or rows_set[:4]
        L.append("ANDCLinear fwd speedup vs dense F.linear (ext/triton/torch_bsr; '-' = no figure; "
                 "g = timed from a CUDA graph)")
        L.append(f"{'in->out':>11} {'B':>3} {'dens':>5} " + " ".join(f"{'rows=' + str(m):>17}" for m in show))
        keys = sorted({(r["in_f"], r["out_f"], r["B"], r["density"]) for r in sp}, key=lambda k: (k[2], -k[3], k[0]))
        for in_f, out_f, B, d in keys:
            cells = []
            for m in show:
                vals = []
                for p in ("ext", "triton", "torch_bsr"):
                    hit = _find(rows, "linear_speedup", in_f=in_f, out_f=out_f, B=B, density=d, rows=m, provider=p)
                    vals.append(f"{hit[-1]['speedup']:.2f}{'g' if hit[-1].get('timing') == 'graph' else ''}"
                                if hit else "-")
                cells.append("/".join(vals))
            L.append(f"{str(in_f) + '->' + str(out_f):>11} {B:>3} {d:>5} " + " ".join(f"{c:>17}" for c in cells))
    bad = [r for r in _find(rows, "linear") if r.get("check_err") is not None and r["check_err"] > 2e-2]
    if bad:
        L.append(f"!! {len(bad)} linear rows with check_err > 2e-2 (wrong results): see results.json")
    for r in _find(rows, "backward"):
        L.append(f"fwd+bwd {r['provider']:>5} {r['in_f']}->{r['out_f']} rows {r['rows']} B{r['B']} d{r['density']}: "
                 f"{r['ms_fwd_bwd']:.3f} ms ({r.get('timing', 'eager')})")
    for r in _find(rows, "snp_ratio"):
        L.append(f"SNP {r['op']} {r['dtype']} {r['provider']}: {r['ratio_vs_plain']:.3f}x plain time")
    for r in _find(rows, "snp_op_overhead"):
        L.append(f"SNP {r['op']} {r['dtype']} {r['provider']}: Python overhead of the op {r['python_overhead_us']} us/call")
    for r in _find(rows, "cct"):
        L.append(f"{r['model']} {r['variant']:>13} batch {r['batch']:>3}: {r['images_per_s']:>10.1f} img/s "
                 f"(logits rel err {r['logits_rel_err_vs_dense']:.2e})")
    for r in _find(rows, "cct_speedup"):
        L.append(f"CCT {r['variant']} batch {r['batch']}: {r['speedup']:.2f}x dense")
    L.extend(_targets(rows))
    errs = [r for r in rows if "error" in r]
    if errs:
        L.append(f"errors: {len(errs)} rows (first: {errs[0]['name']}: {errs[0]['error'][:150]})")
    for n in notes:
        L.append("note: " + n)
    return "\n".join(L)


def _targets(rows):
    out = []

    def best(provider, density, min_rows=None, rows_eq=None):
        hits = [r for r in _find(rows, "linear_speedup", provider=provider, B=64, density=density)
                if (min_rows is None or r["rows"] >= min_rows) and (rows_eq is None or r["rows"] == rows_eq)]
        return hits

    for d, goal in ((0.25, 2.5), (0.125, 3.0)):
        hits = best("ext", d, min_rows=16384)
        if hits:
            worst = min(h["speedup"] for h in hits)
            out.append(f"TARGET ext bf16 B64 d{d} rows>=16384 >= {goal}x dense: min {worst:.2f}x over "
                       f"{len(hits)} points -> {'MET' if worst >= goal else 'NOT MET'}")
    for prov in ("ext", "triton"):
        hits = best(prov, 0.25, rows_eq=256)
        if hits:
            out.append(f"TARGET batch-1 (256 rows) ~ 1/density = 4x at d0.25, {prov}: " +
                       ", ".join(f"{h['in_f']}->{h['out_f']} {h['speedup']:.2f}x" for h in hits))
    tr = [r for r in _find(rows, "snp_ratio") if r["provider"].startswith("kernel_")]
    if tr:
        worst = max(r["ratio_vs_plain"] for r in tr)
        out.append(f"TARGET fused SNP within 5% of plain: worst {worst:.3f}x -> {'MET' if worst <= 1.05 else 'NOT MET'}")
    cs = [r for r in _find(rows, "cct_speedup") if r["batch"] == 256]
    for r in cs:
        out.append(f"TARGET CCT pruned 25% batch 256 >= 1.8x dense ({r['variant']}): {r['speedup']:.2f}x -> "
                   f"{'MET' if r['speedup'] >= 1.8 else 'NOT MET'}")
    return out


# ---------------------------------------------------------------------------------------------

SECTIONS = [  # (name, function, share of the budget)
    ("ceilings", section_ceilings, 0.03),
    ("linear", section_linear, 0.45),
    ("backward", section_backward, 0.07),
    ("snp", section_snp, 0.15),
    ("cct", section_cct, 0.30),
]


def load_results(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="directory for results.json, bench.log, table.txt")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for all sections (default 300)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script, not the GPU")
    ap.add_argument("--sections", default=",".join(s[0] for s in SECTIONS),
                    help="comma-separated subset of: " + ", ".join(s[0] for s in SECTIONS))
    ap.add_argument("--providers", default=None,
                    help="comma-separated subset of dense, ext, triton, torch_bsr (default all; dense is "
                         "always timed as the baseline)")
    ap.add_argument("--append", action="store_true", help="add to the rows of an existing results.json")
    ap.add_argument("--table-only", action="store_true", help="print the table of an existing results.json")
    args = ap.parse_args(argv)
    if args.table_only:
        data = load_results(os.path.join(args.out_dir, "results.json"))
        table = make_table(data.get("rows", []), data.get("notes", []), data.get("environment", {}))
        with open(os.path.join(args.out_dir, "table.txt"), "w") as f:
            f.write(table + "\n")
        print(table, flush=True)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; use --dry-run for a CPU smoke run", file=sys.stderr)
        return 2
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - {s[0] for s in SECTIONS}
    if unknown:
        ap.error(f"unknown sections: {sorted(unknown)}")
    providers = None
    if args.providers:
        providers = {p.strip() for p in args.providers.split(",") if p.strip()}
        bad = providers - {"dense", "ext", "triton", "torch_bsr"}
        if bad:
            ap.error(f"unknown providers: {sorted(bad)}")
    run = Run(args.out_dir, args.budget, args.dry_run, providers=providers, append=args.append)
    torch.manual_seed(0)
    run.env = environment(run)
    run.log("environment: " + json.dumps(run.env, default=str))
    todo = [s for s in SECTIONS if s[0] in wanted]
    for i, (name, fn, share) in enumerate(todo):
        left = run.left()
        if left <= 5:
            run.note(f"section {name} skipped: time budget used up")
            continue
        rest = sum(s[2] for s in todo[i:])
        alloc = left * share / rest if rest else left  # unused time carries to later sections
        run.log(f"== section {name} (providers {args.providers or 'all'}): {alloc:.0f}s of {left:.0f}s left")
        try:
            fn(run, alloc)
        except Exception as e:
            run.error(name, f"section {name}", e)
            run.log(traceback.format_exc())
        finally:
            if run.dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            run.save()  # after every section: a later crash or timeout loses nothing
    run.save()
    try:
        table = make_table(run.all_rows(), run.all_notes(), run.env)
    except Exception:  # the table must never lose the results: they are on disk already
        table = "table failed (results.json holds every row):\n" + traceback.format_exc()
    with open(os.path.join(args.out_dir, "table.txt"), "w") as f:
        f.write(table + "\n")
    run.log_f.close()
    print("\n" + table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
