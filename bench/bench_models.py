"""Pruned-model inference: CCT-7/3x1 (100 classes, 32x32 images) with every encoder linear as an
ANDCLinear at 25% block density vs the same masked model run dense.

    pytest bench/bench_models.py --benchmark-only [--benchmark-json=models.json]

One group per (dtype, batch): ``masked-dense`` runs first (every encoder linear an ``nn.Linear``
holding W * mask: exactly the pruned model's function at dense cost), then ``andc`` (every
encoder linear a ``cctk.nn.ANDCLinear`` holding only the kept 32 x 32 blocks), which records
``extra_info["speedup_vs_dense"]`` = masked-dense median / its median (timed inline when a
filter skipped the dense case; ``dense_inline`` says so). Both models' outputs are asserted equal
(fp32: 1e-4; bf16: within bf16 rounding of the logits) before timing.

Masks: in every encoder linear exactly round(0.25 * blocks) blocks, chosen at random (seeded);
``--bench-full`` adds ANDC-structured masks (label-sorted, from random label sets with one
dominant label per node) and 12.5% / 50% density. Cases: fp32 and bf16, batch 32 and 1. The
Amdahl limit at 25% is about 2.5x: attention (T = 256 tokens), the tokenizer, the norms and the
pooling stay dense.
"""
from __future__ import annotations

import copy

import torch

from _timing import inline_times
from cctk.models import create_model
from cctk.prune import PrunePlan, apply_masks, convert_to_andc, encoder_linear_names, to_masked_dense
from cctk.prune.masks import block_grid

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODEL = "cct_7_3x1_32"
NUM_CLASSES = 100
BLOCK = 32
ROUNDS, WARMUP = 11, 2  # medians of 11 timed forwards after 2 warm-up ones
_DENSE = {}  # (dtype, batch, density, masks) -> masked-dense median (s)
_MODELS = {}


def _cases(full: bool):
    cases = []
    densities = (0.25, 0.125, 0.5) if full else (0.25,)
    mask_kinds = ("random", "andc") if full else ("random",)
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (32, 1):
            for d in densities:
                for kind in mask_kinds:
                    cases.append((dtype, batch, d, kind, "masked-dense"))
                    cases.append((dtype, batch, d, kind, "andc"))
    return cases


def _case_id(c):
    dtype, batch, d, kind, provider = c
    return f"{str(dtype).replace('torch.', '')}-batch{batch}-d{d:g}-{kind}-{provider}"


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config.getoption("--bench-full"))
        metafunc.parametrize("case", cases, ids=[_case_id(c) for c in cases])


def _random_masks(model, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name in encoder_linear_names(model):
        w = model.get_submodule(name).weight
        nbr, nbc = block_grid(w.shape, BLOCK)
        n = nbr * nbc
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=g)[:round(density * n)]] = True
        masks[name] = m.view(nbr, nbc)
    return masks


def _andc_masks(model, density, seed=0):
    from cctk.prune import prune_andc

    g = torch.Generator().manual_seed(seed)
    K = NUM_CLASSES

    def rs(n):
        s = torch.zeros(n, K, dtype=torch.bool)
        s[torch.arange(n), torch.randint(0, K, (n,), generator=g)] = True
        return s | (torch.rand(n, K, generator=g) < 0.02)

    d, H, dff = model.embed_dim, model.num_heads, model.ff_dim
    sets = {"final_recognized": rs(d)}
    for b in range(model.num_blocks):
        sets.update({f"b{b}_mha_recognized": rs(d), f"b{b}_ff_recognized": rs(dff),
                     f"b{b}_stream_mha_recognized": rs(d), f"b{b}_stream_ff_recognized": rs(d),
                     f"b{b}_heads_recognized": torch.rand(H, K, generator=g) < 0.3})
    pruned, plan = prune_andc(model, sets, block_size=BLOCK, density=density, order="dominant",
                              prune_classifier=False)
    return pruned, plan


def _models(density, kind):
    """(masked-dense model, ANDCLinear model) in fp32 on DEVICE, cached."""
    key = (density, kind)
    if key not in _MODELS:
        torch.manual_seed(0)
        base = create_model(MODEL, num_classes=NUM_CLASSES).eval()
        if kind == "random":
            pruned = copy.deepcopy(base)
            apply_masks(pruned, PrunePlan(method="random", block_size=BLOCK,
                                          block_masks=_random_masks(base, density), classifier_mask=None))
        else:
            pruned, _ = _andc_masks(base, density)
        andc = convert_to_andc(copy.deepcopy(pruned)).eval()
        dense = to_masked_dense(pruned).eval()
        _MODELS[key] = (dense.to(DEVICE), andc.to(DEVICE))
    return _MODELS[key]


def _fn(model, x):
    def run():
        with torch.no_grad():
            out = model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        return out
    return run


def test_pruned_model(benchmark, case):
    dtype, batch, density, kind, provider = case
    dt = str(dtype).replace("torch.", "")
    benchmark.group = f"cct_7_3x1_32 c100 {dt} batch {batch} density {density:g} {kind} masks"
    dense32, andc32 = _models(density, kind)
    dense = copy.deepcopy(dense32).to(dtype)
    andc = copy.deepcopy(andc32).to(dtype)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(DEVICE, dtype)
    benchmark.extra_info.update(provider=provider, model=MODEL, num_classes=NUM_CLASSES, dtype=dt, batch=batch,
                                density=density, block_size=BLOCK, masks=kind, device=str(DEVICE),
                                threads=torch.get_num_threads())
    with torch.no_grad():
        y_dense = dense(x).float()
        y_andc = andc(x).float()
    if dtype == torch.float32:
        torch.testing.assert_close(y_andc, y_dense, atol=1e-4, rtol=1e-4)
    else:
        scale = y_dense.abs().max().item()
        assert (y_andc - y_dense).abs().max().item() <= 0.05 * max(scale, 1.0), "bf16 outputs differ"
    benchmark.extra_info["max_abs_diff_vs_masked_dense"] = float((y_andc - y_dense).abs().max())
    key = (dtype, batch, density, kind)
    if provider == "masked-dense":
        benchmark.pedantic(_fn(dense, x), rounds=ROUNDS, warmup_rounds=WARMUP)
        if benchmark.stats:
            _DENSE[key] = benchmark.stats.stats.median
            benchmark.extra_info["images_per_s"] = batch / _DENSE[key]
        return
    benchmark.pedantic(_fn(andc, x), rounds=ROUNDS, warmup_rounds=WARMUP)
    if not benchmark.stats:
        return
    med = benchmark.stats.stats.median
    dense_med = _DENSE.get(key)
    if dense_med is None:
        dense_med = inline_times(_fn(dense, x), ROUNDS)[0]
        benchmark.extra_info["dense_inline"] = True
    benchmark.extra_info["images_per_s"] = batch / med
    benchmark.extra_info["dense_images_per_s"] = batch / dense_med
    benchmark.extra_info["speedup_vs_dense"] = dense_med / med
