"""ANDCLinear and the cctk::bsr_linear ops against the masked dense layer F.linear(x, W*mask, b)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cctk
from cctk import _ext
from cctk.nn import ANDCLinear
from cctk.ops.block_sparse import (bsr_linear, bsr_linear_backward_weight_ref, bsr_to_dense, bsr_transpose_index,
                                 dense_to_bsr)

HAS_EXT = _ext.supports("cpu")


def _triton_ok():
    try:
        import triton  # noqa: F401
        from cctk.kernels.bsr_linear import bsr_linear_triton  # noqa: F401
    except Exception:
        return False
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or torch.cuda.is_available()


BACKENDS = [pytest.param("ext", marks=pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")),
            "torch",
            pytest.param("triton", marks=pytest.mark.skipif(not _triton_ok(), reason="triton not installed"))]

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
       torch.float64: dict(atol=1e-12, rtol=1e-12)}


def _mask(out_f, in_f, B, density, seed=0, ensure_edge=True):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(math.ceil(out_f / B), math.ceil(in_f / B), generator=g) < density
    if ensure_edge:  # keep the bottom-right (partial) block so edge handling is exercised
        m[-1, -1] = True
    return m


def _expand(mask, B, out_f, in_f):
    return mask.repeat_interleave(B, 0).repeat_interleave(B, 1)[:out_f, :in_f]


def _pair(in_f, out_f, B, density=0.5, dtype=torch.float32, seed=0, bias=True):
    """A dense nn.Linear with the pruned weights zeroed, and its ANDCLinear twin."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    mask = _mask(out_f, in_f, B, density, seed)
    with torch.no_grad():
        lin.weight.mul_(_expand(mask, B, out_f, in_f).to(dtype))
    return lin, ANDCLinear.from_dense(lin, mask, B), mask


def _check_against_dense(lin, mod, x, dtype):
    xd = x.detach().clone().requires_grad_(True)
    xs = x.detach().clone().requires_grad_(True)
    # reference in fp32 (bf16 inputs are exact in fp32), rounded like the layer output
    ref = F.linear(xd.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
    y = mod(xs)
    assert y.dtype == dtype and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref, **TOL[dtype])
    g = torch.randn_like(ref)
    ref.backward(g)
    y.backward(g.to(dtype))
    torch.testing.assert_close(xs.grad.float(), xd.grad.float(), **TOL[dtype])
    w_grad = xd.detach().float().reshape(-1, lin.in_features).t() @ g.reshape(-1, lin.out_features)
    kept = dense_to_bsr(w_grad.t().contiguous(), mod.block_mask, mod.block_size)[0]
    torch.testing.assert_close(mod.values.grad.float(), kept, **{k: 4 * v for k, v in TOL[dtype].items()})
    if lin.bias is not None:
        torch.testing.assert_close(mod.bias.grad.float(), g.reshape(-1, lin.out_features).sum(0),
                                   **{k: 4 * v for k, v in TOL[dtype].items()})


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_f,out_f,B,rows", [(50, 70, 16, 97), (50, 70, 32, 7), (64, 128, 32, 1),
                                               (130, 70, 64, 33), (96, 48, 16, 40)])
def test_matches_masked_dense(backend, dtype, in_f, out_f, B, rows):
    if backend == "triton" and rows > 40:
        rows = 40  # the interpreter is slow
    lin, mod, _ = _pair(in_f, out_f, B, dtype=dtype)
    mod.backend = backend
    _check_against_dense(lin, mod, torch.randn(rows, in_f).to(dtype), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shape_and_noncontiguous(backend):
    lin, mod, _ = _pair(48, 80, 16)
    mod.backend = backend
    x = torch.randn(2, 5, 48)
    _check_against_dense(lin, mod, x, torch.float32)
    xt = torch.randn(48, 2, 7).permute(1, 2, 0)  # (2, 7, 48), not contiguous
    assert not xt.is_contiguous()
    torch.testing.assert_close(mod(xt), lin(xt), **TOL[torch.float32])
    xs = torch.randn(9, 96)[:, ::2]  # strided last dim
    torch.testing.assert_close(mod(xs), lin(xs), **TOL[torch.float32])


@pytest.mark.parametrize("B", [16, 32, 64])
@pytest.mark.parametrize("rows", [1, 7, 97])
def test_block_sizes_and_row_counts_fp32(B, rows):
    lin, mod, _ = _pair(100, 75, B, density=0.4, seed=B + rows)
    _check_against_dense(lin, mod, torch.randn(rows, 100), torch.float32)


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_store_path(monkeypatch, dtype):
    """Outputs above CCTK_BSR_STREAM bytes are written with non-temporal stores (here: all)."""
    monkeypatch.setenv("CCTK_BSR_STREAM", "0")
    for in_f, out_f, B in ((64, 128, 32), (50, 70, 16)):  # aligned rows, and ragged ones (plain stores)
        lin, mod, _ = _pair(in_f, out_f, B, dtype=dtype)
        _check_against_dense(lin, mod, torch.randn(37, in_f).to(dtype), dtype)


def test_no_bias_and_all_false_mask():
    lin, mod, _ = _pair(40, 36, 16, bias=False)
    _check_against_dense(lin, mod, torch.randn(11, 40), torch.float32)
    empty = ANDCLinear(40, 36, 16, torch.zeros(3, 3, dtype=torch.bool))
    assert empty.nnz == 0 and empty.density == 0.0
    x = torch.randn(5, 40, requires_grad=True)
    y = empty(x)
    torch.testing.assert_close(y, empty.bias.detach().expand(5, 36))
    y.sum().backward()
    assert torch.count_nonzero(x.grad) == 0 and empty.values.grad.shape == (0, 16, 16)
    torch.testing.assert_close(empty.bias.grad, torch.full((36,), 5.0))
    nobias = ANDCLinear(40, 36, 16, torch.zeros(3, 3, dtype=torch.bool), bias=False)
    assert torch.count_nonzero(nobias(x)) == 0


@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_gradcheck_float64(backend):
    if backend == "ext" and not HAS_EXT:
        pytest.skip("compiled extension not built")
    mod = ANDCLinear(20, 24, 16, torch.tensor([[True, False], [True, True]]), dtype=torch.float64)
    mod.backend = backend
    x = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    f = lambda x_, v, b: bsr_linear(x_, v, mod.crow_indices, mod.col_indices, b, 24, backend=backend)  # noqa: E731
    # the reference path is slow per call: check it through random projections (fast_mode)
    assert torch.autograd.gradcheck(f, (x, mod.values, mod.bias), fast_mode=backend == "torch")


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_pruned_weights_stay_pruned(backend):
    lin, mod, mask = _pair(64, 48, 16, density=0.5)
    mod.backend = backend
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        mod(torch.randn(8, 64)).pow(2).mean().backward()
        opt.step()
    W = mod.to_dense().detach()
    pruned = ~_expand(mask, 16, 48, 64)
    assert torch.count_nonzero(W[pruned]) == 0
    assert not torch.equal(W, lin.weight.detach())  # the kept blocks did move
    assert [n for n, _ in mod.named_parameters()] == ["values", "bias"]


def test_state_dict_round_trip_and_other_mask():
    _, mod, mask = _pair(50, 70, 16, density=0.5)
    sd = mod.state_dict()
    assert {"values", "bias", "mask", "crow_indices", "col_indices", "ccol_indices", "row_indices",
            "block_perm"} <= set(sd)
    # same mask
    other = ANDCLinear(50, 70, 16, mask.clone())
    other.load_state_dict(sd)
    x = torch.randn(4, 50)
    torch.testing.assert_close(other(x), mod(x))
    # from scratch with a different mask (different nnz): the layout follows the state dict
    fresh = ANDCLinear(50, 70, 16, torch.ones_like(mask))
    assert fresh.nnz != mod.nnz
    fresh.load_state_dict(sd)
    assert fresh.nnz == mod.nnz and torch.equal(fresh.block_mask, mask)
    for name in ("crow_indices", "col_indices", "ccol_indices", "row_indices", "block_perm"):
        assert torch.equal(getattr(fresh, name), getattr(mod, name)) and getattr(fresh, name).dtype == torch.int32
    torch.testing.assert_close(fresh(x), mod(x))
    # bad state dicts fail clearly and change nothing
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    bad = dict(sd)
    bad["mask"] = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="block_mask must have shape"):
        fresh.load_state_dict(bad)
    bad = dict(sd)
    bad["values"] = sd["values"][:-1]
    with pytest.raises(RuntimeError, match="does not match"):
        fresh.load_state_dict(bad)
    after = fresh.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_to_dtype_keeps_int32_indices():
    lin, mod, _ = _pair(64, 64, 32)
    m16 = mod.to(torch.bfloat16)
    assert m16.values.dtype == torch.bfloat16 and m16.bias.dtype == torch.bfloat16
    for name in ("crow_indices", "col_indices", "ccol_indices", "row_indices", "block_perm"):
        assert getattr(m16, name).dtype == torch.int32
    assert m16.block_mask.dtype == torch.bool
    x = torch.randn(5, 64)
    torch.testing.assert_close(m16(x.bfloat16()).float(), lin(x), atol=0.05, rtol=0.05)
    assert m16.double().values.dtype == torch.float64


def test_repr_density_to_dense():
    _, mod, mask = _pair(50, 70, 16, density=0.5)
    assert mod.density == pytest.approx(mask.float().mean().item())
    r = repr(mod)
    assert "block_size=16" in r and "density=" in r and "backend='auto'" in r
    W = mod.to_dense()
    assert W.shape == (70, 50)
    assert torch.count_nonzero(W[~_expand(mask, 16, 70, 50)]) == 0


def test_layout_helpers():
    W = torch.randn(70, 50)
    mask = _mask(70, 50, 16, 0.5)
    v, crow, col = dense_to_bsr(W, mask, 16)
    assert crow.dtype == col.dtype == torch.int32 and v.shape == (int(mask.sum()), 16, 16)
    torch.testing.assert_close(bsr_to_dense(v, crow, col, 70, 50), W * _expand(mask, 16, 70, 50))
    ccol, row, perm = bsr_transpose_index(crow, col, mask.shape[1])
    # brute force: entries of block-col c, by ascending block-row
    rows_of = torch.repeat_interleave(torch.arange(mask.shape[0]), torch.diff(crow.long()))
    for c in range(mask.shape[1]):
        want_rows = mask[:, c].nonzero()[:, 0]
        got = slice(int(ccol[c]), int(ccol[c + 1]))
        assert torch.equal(row[got].long(), want_rows)
        assert torch.equal(rows_of[perm[got].long()], want_rows)
        assert torch.equal(col[perm[got].long()].long(), torch.full_like(want_rows, c))


# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(dtype):
    _, mod, _ = _pair(50, 70, 16, dtype=dtype)
    x = torch.randn(9, 50, dtype=dtype, requires_grad=dtype != torch.bfloat16)
    v = mod.values.detach().requires_grad_(dtype != torch.bfloat16)
    b = mod.bias.detach().requires_grad_(dtype != torch.bfloat16)
    g = torch.randn(9, 70, dtype=dtype)
    ops = torch.ops.cctk
    torch.library.opcheck(ops.bsr_linear, (x, v, mod.crow_indices, mod.col_indices, b, 70))
    torch.library.opcheck(ops.bsr_linear, (x, v, mod.crow_indices, mod.col_indices, None, 70))
    torch.library.opcheck(ops.bsr_linear_backward_input,
                          (g, mod.values.detach(), mod.ccol_indices, mod.row_indices, mod.block_perm, 50))
    torch.library.opcheck(ops.bsr_linear_backward_weight, (g, x.detach(), mod.crow_indices, mod.col_indices, 16))


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    m1 = ANDCLinear(48, 64, 16, _mask(64, 48, 16, 0.5))
    m2 = ANDCLinear(64, 40, 16, _mask(40, 64, 16, 0.5, seed=1))
    m1.backend = m2.backend = backend
    model = nn.Sequential(m1, nn.GELU(), m2)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, 48)
    y_eager = model(x)
    y_eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, y_eager)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
def test_torch_compile_inductor():
    torch._dynamo.reset()
    model = nn.Sequential(ANDCLinear(32, 32, 16, _mask(32, 32, 16, 0.5)), nn.GELU())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 32, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(y, model(x2))


# --------------------------------------------------------------------------------------------
_CAP_SCRIPT = r"""
import json, sys, torch, cctk
from cctk.nn import ANDCLinear


def capability_results():
    out = {"cap": cctk._ext.cpu_capabilities()}
    for dtype in (torch.float32, torch.bfloat16):
        for B in (16, 32, 64):
            torch.manual_seed(B)
            mask = torch.rand(-(-70 // B), -(-130 // B)) < 0.6
            mask[-1, -1] = True
            m = ANDCLinear(130, 70, B, mask, dtype=dtype)
            x = torch.randn(29, 130).to(dtype).requires_grad_(True)
            y = m(x)
            y.backward(torch.ones_like(y))
            out[f"{dtype}-{B}"] = [y.float().tolist(), x.grad.float().tolist(), m.values.grad.float().tolist()]
    return out


if __name__ == "__main__":
    json.dump(capability_results(), sys.stdout)
"""


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
def test_cpu_capability_paths_agree():
    """CCTK_CPU_CAPABILITY=scalar / avx2 give the same results as the best path (fp32 tight, bf16 tolerance)."""
    scope = {"__name__": "cap_script"}
    exec(_CAP_SCRIPT, scope)
    results = {"best": scope["capability_results"]()}  # this process: the best path the CPU has
    for cap in ("scalar", "avx2"):
        env = dict(os.environ, CCTK_CPU_CAPABILITY=cap)
        proc = subprocess.run([sys.executable, "-c", _CAP_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        results[cap] = json.loads(proc.stdout)
    assert results["scalar"]["cap"] == "scalar"
    for cap in ("scalar", "avx2"):
        for key, tensors in results["best"].items():
            if key == "cap":
                continue
            tol = TOL[torch.float32] if key.startswith("torch.float32") else dict(atol=6e-2, rtol=2e-2)
            for got, want in zip(results[cap][key], tensors):
                torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **tol)


# --------------------------------------------------------------------------------------------
def test_bad_construction():
    good = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="block_mask must have shape"):
        ANDCLinear(50, 40, 16, torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_size must be one of"):
        ANDCLinear(64, 48, 8, good)
    with pytest.raises(TypeError, match="bool"):
        ANDCLinear(64, 48, 16, good.float())
    with pytest.raises(ValueError, match="positive int"):
        ANDCLinear(0, 48, 16, good)
    with pytest.raises(TypeError, match="nn.Linear"):
        ANDCLinear.from_dense(nn.Conv1d(3, 3, 1), good, 16)


def test_bad_inputs_leave_module_unchanged():
    _, mod, _ = _pair(64, 48, 16)
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    with pytest.raises(TypeError, match="dtype"):
        mod(torch.randn(3, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"\(\.\.\., 64\)"):
        mod(torch.randn(3, 63))
    with pytest.raises(ValueError, match="device"):
        bsr_linear(torch.randn(3, 64, device="meta"), mod.values, mod.crow_indices, mod.col_indices, None, 48)
    with pytest.raises(TypeError, match="int32"):
        bsr_linear(torch.randn(3, 64), mod.values, mod.crow_indices.long(), mod.col_indices, None, 48)
    with pytest.raises(ValueError, match="backend"):
        mod.backend = "cuda"
    with pytest.raises(ValueError, match="bias"):
        bsr_linear(torch.randn(3, 64), mod.values, mod.crow_indices, mod.col_indices, torch.zeros(47), 48)
    assert mod.backend == "auto"
    after = mod.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
def test_kernel_rejects_bad_index():
    _, mod, _ = _pair(64, 48, 16)
    bad_col = mod.col_indices.clone()
    bad_col[0] = 99
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.cctk.bsr_linear(torch.randn(3, 64), mod.values.detach(), mod.crow_indices, bad_col, None, 48)
    bad_crow = mod.crow_indices.clone()
    bad_crow[-1] += 1
    with pytest.raises(RuntimeError, match="nnz"):
        torch.ops.cctk.bsr_linear_backward_weight(torch.randn(3, 48), torch.randn(3, 64), bad_crow,
                                                  mod.col_indices, 16)


def test_weight_grad_ref_matches_dense():
    go, x = torch.randn(13, 70, dtype=torch.float64), torch.randn(13, 50, dtype=torch.float64)
    mask = _mask(70, 50, 16, 0.5)
    _, crow, col = dense_to_bsr(torch.zeros(70, 50), mask, 16)
    dense = (go.t() @ x)
    torch.testing.assert_close(bsr_linear_backward_weight_ref(go, x, crow, col, 16),
                               dense_to_bsr(dense, mask, 16)[0])


def test_package_exports():
    assert cctk.ANDCLinear is ANDCLinear


def test_state_dict_without_mask_cannot_smuggle_indices():
    """A state dict lacking ``mask`` is checked against this module's own mask: tampered index
    buffers are refused (strict or not) and nothing changes; a later error in the same state
    dict (bad bias) also leaves a mask change undone."""
    _, mod, mask = _pair(50, 70, 16, density=0.5)
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    bad = {k: v for k, v in mod.state_dict().items() if k != "mask"}
    bad["col_indices"] = bad["col_indices"].flip(0).contiguous()
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="col_indices: does not match"):
            mod.load_state_dict(bad, strict=strict)
    fresh = ANDCLinear(50, 70, 16, torch.ones_like(mask))
    fresh_before = {k: v.clone() for k, v in fresh.state_dict().items()}
    other = dict(mod.state_dict())
    other["bias"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="bias"):
        fresh.load_state_dict(other)
    for m, b in ((mod, before), (fresh, fresh_before)):
        after = m.state_dict()
        assert b.keys() == after.keys() and all(torch.equal(b[k], after[k]) for k in b)


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_double_backward_is_exact_or_refused(backend):
    """create_graph=True: the torch backend differentiates twice (same as the masked dense layer);
    the compiled / Triton backends, whose backward kernels have no autograd, refuse it instead of
    returning zero second-order gradients."""
    lin, mod, _ = _pair(32, 48, 16, density=0.5, dtype=torch.float64)
    mod.backend = backend
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    if backend != "torch":
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(mod(x).pow(2).sum(), x, create_graph=True)
        mod(x).pow(2).sum().backward()      # first order is unaffected
        assert x.grad is not None and mod.values.grad is not None
        return
    (g,) = torch.autograd.grad(mod(x).pow(2).sum(), x, create_graph=True)
    g.pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    w = mod.to_dense().detach()
    (g2,) = torch.autograd.grad(F.linear(x2, w, mod.bias.detach()).pow(2).sum(), x2, create_graph=True)
    g2.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_malformed_index_is_refused_by_every_backend(backend):
    """One rule for every backend: negative / out-of-range block columns and a non-monotone or
    misanchored crow are an error, never a silent out-of-range gather."""
    if backend == "ext" and not HAS_EXT:
        pytest.skip("compiled extension not built")
    mod = ANDCLinear(64, 64, 32, torch.ones(2, 2, dtype=torch.bool))
    x = torch.randn(3, 64)
    v, crow, col = mod.values.detach(), mod.crow_indices, mod.col_indices
    bad = {
        "negative col": (crow, torch.tensor([0, -1, 0, 1], dtype=torch.int32)),
        "col too large": (crow, torch.tensor([0, 1, 0, 2], dtype=torch.int32)),
        "non-monotone crow": (torch.tensor([0, 5, 4], dtype=torch.int32), col),
        "crow not ending at nnz": (torch.tensor([0, 2, 3], dtype=torch.int32), col),
    }
    for name, (c, k) in bad.items():
        with pytest.raises((ValueError, RuntimeError), match="index|outside|monotone|must start"):
            bsr_linear(x, v, c, k, None, 64, backend=backend)
