"""A finished study's models against the best dense runtimes (the product question behind
``cctk study``'s images/s, which are measured against the same model dense through
``cctk.optimize`` only).

    pytest bench/bench_study_peers.py --benchmark-only                 # docs/study_fmnist, seed 0, density 0.25
    CCTK_STUDY_DIR=runs/study_fmnist CCTK_STUDY_DENSITY=0.125 pytest bench/bench_study_peers.py --benchmark-only
    CCTK_BENCH_DTYPE=bfloat16 pytest bench/bench_study_peers.py --benchmark-only    # every provider in bf16

One group, every provider in one process, **interleaved round by round** in a fresh order each
round (CCTK_BENCH_ROUNDS, default 60), each provider's **fastest round** (cctk.timing); the study's bench batch (32) and
CCTK_BENCH_DTYPE (default float32, as in the study; bfloat16: every provider in bf16, ONNX
Runtime skipped). Providers:

* ``dense`` (the study's trained model of seed CCTK_STUDY_SEED, default 0): ``torch eager``
  (stock PyTorch), ``OpenVINO``, ``ONNX Runtime`` (bench/runtimes.py), ``cctk.optimize``;
* every method of the study at CCTK_STUDY_DENSITY (default 0.25): the cell's pruned structure
  (:func:`cctk.experiments.study.study_cell_models`: same seed, same masks and widths as the
  cell; block-masked layers as ANDCLinear) through ``cctk.optimize``; the node-removal methods
  (a smaller dense model) also through ``OpenVINO``.

``ratio_vs_best_dense``: images/s over the fastest dense provider's in the same run. Every
provider's logits are checked against the fp32 output of the model it runs first. Without the
study directory (the default one is committed, docs/study_fmnist) or Debian's Fashion-MNIST the
test skips with the reason; without openvino / onnxruntime (``pip install cctk[bench]``) those
providers skip.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from runtimes import cctk_runner, checked_runs, onnxruntime_runner, openvino_runner, torch_runner
from cctk.data.formats import DataError
from cctk.errors import ConfigError
from cctk.nn import ANDCLinear
from cctk.timing import images_per_s, interleaved_times

STUDY_DIR = os.environ.get("CCTK_STUDY_DIR", os.path.join(os.path.dirname(__file__), "..", "docs", "study_fmnist"))
SEED = int(os.environ.get("CCTK_STUDY_SEED", "0"))
DENSITY = float(os.environ.get("CCTK_STUDY_DENSITY", "0.25"))
# 15 providers of a few ms each: many rounds are cheap, and with the order shuffled every round
# (cctk.timing) a provider's fastest round needs a round where no spinning runtime ran just before it
ROUNDS = int(os.environ.get("CCTK_BENCH_ROUNDS", "60"))
DTYPE = getattr(torch, os.environ.get("CCTK_BENCH_DTYPE", "float32"))
DENSE_KINDS = ("torch eager", "OpenVINO", "ONNX Runtime", "cctk.optimize")
_RUN: dict = {}


@functools.lru_cache(maxsize=None)
def _study_methods():
    """The methods of the study's cells at SEED and DENSITY (read once: collection, build and
    summary all ask)."""
    import csv
    path = os.path.join(STUDY_DIR, "results.csv")
    if not os.path.isfile(path):
        return ()
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return tuple(sorted({r["method"] for r in rows if int(r["seed"]) == SEED and abs(float(r["density"]) - DENSITY) < 1e-9}))


def _providers():
    out = [("dense", k) for k in DENSE_KINDS]
    for m in _study_methods():
        out.append((m, "cctk.optimize"))
        if m.startswith("structured") and m != "structured-andc":
            out.append((m, "OpenVINO"))
    return out


def pytest_generate_tests(metafunc):
    if "provider" in metafunc.fixturenames:
        ps = _providers() or [("dense", k) for k in DENSE_KINDS]
        metafunc.parametrize("provider", ps, ids=[f"{p[0]}-{p[1]}" for p in ps])


def _build(model, runtime, x):
    if runtime == "torch eager":
        return torch_runner(model, DTYPE), None
    if runtime == "cctk.optimize":
        return cctk_runner(model, DTYPE, x), None
    if runtime == "OpenVINO":
        return openvino_runner(model, DTYPE, x)
    if runtime == "ONNX Runtime":
        return onnxruntime_runner(model, DTYPE, x)
    raise ValueError(runtime)


def _run_all():
    """Build every provider, check its logits, time all interleaved (cached for the session)."""
    if _RUN:
        return _RUN
    from cctk.experiments.study import study_cell_models
    methods = _study_methods()
    try:
        got = study_cell_models(STUDY_DIR, SEED, methods, DENSITY)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        _RUN["error"] = f"{STUDY_DIR}: {exc}"
        return _RUN
    x = got["example"].float()
    models = {"dense": got["dense"], **got["pruned"]}
    for p in _providers():   # OpenVINO runs the node-removal models (dense) only, never ANDCLinear
        assert p[0] == "dense" or p[1] != "OpenVINO" or not any(isinstance(m, ANDCLinear) for m in models[p[0]].modules())
    runs, skipped = checked_runs({p: (models[p[0]], *_build(models[p[0]], p[1], x)) for p in _providers()}, x, DTYPE)
    times = interleaved_times({p: (lambda run=run: run(x)) for p, run in runs.items()}, rounds=ROUNDS, warmup=0)
    best = {p: images_per_s(ts, int(x.shape[0])) for p, ts in times.items()}
    dense = {p: v for p, v in best.items() if p[0] == "dense"}
    _RUN.update(runs=runs, skipped=skipped, images_per_s=best, best_dense=max(dense, key=dense.get), x=x,
                model=getattr(got["dense"], "config", {}).get("name"))
    return _RUN


def test_study_model_throughput(benchmark, provider):
    res = _run_all()
    if "error" in res:
        pytest.skip(res["error"])
    if provider in res["skipped"]:
        pytest.skip(res["skipped"][provider])
    ips, bd = res["images_per_s"][provider], res["best_dense"]
    ov = res["images_per_s"].get(("dense", "OpenVINO"))
    dt = str(DTYPE).replace("torch.", "")
    benchmark.group = f"study {os.path.basename(os.path.normpath(STUDY_DIR))} seed {SEED} density {DENSITY:g} {dt}"
    benchmark.extra_info.update(
        provider=f"{provider[0]} {provider[1]}", model=res["model"], study=os.path.abspath(STUDY_DIR), seed=SEED,
        density=DENSITY, dtype=dt, batch=int(res["x"].shape[0]), threads=torch.get_num_threads(), rounds=ROUNDS,
        images_per_s=ips, best_dense_provider=f"{bd[0]} {bd[1]}", ratio_vs_best_dense=ips / res["images_per_s"][bd],
        ratio_vs_openvino=ips / ov if ov else None)
    benchmark.pedantic(res["runs"][provider], args=(res["x"],), rounds=3, warmup_rounds=0)


def summary_lines() -> list[str]:
    """The table of this run (images/s of each provider's fastest round, ratio to the best dense)."""
    if not _RUN or "error" in _RUN:
        return []
    bd = _RUN["best_dense"]
    best = _RUN["images_per_s"][bd]
    lines = [f"study {STUDY_DIR} seed {SEED}, density {DENSITY:g}, {_RUN['model']} {str(DTYPE).replace('torch.', '')} batch {int(_RUN['x'].shape[0])} "
             f"(fastest of {ROUNDS} interleaved rounds; best dense: {bd[0]} {bd[1]})"]
    for p in _providers():
        if p in _RUN["images_per_s"]:
            ips = _RUN["images_per_s"][p]
            lines.append(f"    {p[0]:<22} {p[1]:<14} {ips:8.1f} img/s  {ips / best:5.2f}x")
        elif p in _RUN["skipped"]:
            lines.append(f"    {p[0]:<22} {p[1]:<14}  skipped: {_RUN['skipped'][p]}")
    return lines
