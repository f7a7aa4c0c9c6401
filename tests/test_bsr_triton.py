"""The Triton block-sparse linear kernels (``cctk.kernels.bsr_linear``) against the masked dense layer.

Without a GPU these run under ``TRITON_INTERPRET=1`` on CPU tensors (set by conftest.py); with one
they run compiled on CUDA. References are computed in float64 from the same (rounded) operands.
"""
import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (in, out, B): 40 / 72 with B = 16 leaves partial blocks on both edges (40 = 2*16 + 8,
# 72 = 4*16 + 8); with B = 32 too (40 = 32 + 8, 72 = 2*32 + 8).
SHAPES = [(40, 72, 16), (40, 72, 32), (64, 48, 16), (96, 64, 64)]
ROWS = [1, 5, 33]
# bf16 / fp16 operands, fp32 accumulation: tolerance relative to the output's scale.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def pack_bsr(weight: torch.Tensor, block_mask: torch.Tensor, B: int):
    """Dense W (out, in) + block mask -> (values, crow, col, ccol, row, perm), the canonical layout."""
    out_f, in_f = weight.shape
    nr, nc = block_mask.shape
    assert nr == -(-out_f // B) and nc == -(-in_f // B)
    wp = torch.zeros(nr * B, nc * B, dtype=weight.dtype, device=weight.device)
    wp[:out_f, :in_f] = weight
    blocks = wp.reshape(nr, B, nc, B).permute(0, 2, 1, 3)  # (nr, nc, B, B)
    rr, cc = block_mask.nonzero(as_tuple=True)  # row-major order: rows ascending, cols ascending
    values = blocks[rr, cc].contiguous()
    crow = torch.zeros(nr + 1, dtype=torch.int32)
    crow[1:] = torch.cumsum(block_mask.sum(1), 0).to(torch.int32)
    col = cc.to(torch.int32)
    order = torch.argsort(cc * nr + rr)  # column-major order of the kept blocks
    ccol = torch.zeros(nc + 1, dtype=torch.int32)
    ccol[1:] = torch.cumsum(block_mask.sum(0), 0).to(torch.int32)
    row = rr[order].to(torch.int32)
    perm = order.to(torch.int32)
    dev = weight.device
    return values, crow.to(dev), col.to(dev), ccol.to(dev), row.to(dev), perm.to(dev)


def expand_mask(block_mask, B, out_f, in_f):
    return block_mask.repeat_interleave(B, 0).repeat_interleave(B, 1)[:out_f, :in_f]


def make_case(M, in_f, out_f, B, dtype, density=0.5, mask=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    nr, nc = -(-out_f // B), -(-in_f // B)
    if mask is None:
        mask = torch.rand(nr, nc, generator=g) < density
    w = torch.randn(out_f, in_f, generator=g)
    w = (w * expand_mask(mask, B, out_f, in_f)).to(dtype)
    x = torch.randn(M, in_f, generator=g).to(dtype)
    bias = torch.randn(out_f, generator=g).to(dtype)
    return x.to(DEV), w.to(DEV), bias.to(DEV), mask.to(DEV)


def rel_err(a, ref):
    a, ref = a.double().cpu(), ref.double().cpu()
    assert torch.isfinite(a).all()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(out, ref, dtype):
    assert out.dtype == dtype
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


def _kernels():
    from cctk.kernels import bsr_linear as k
    return k


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("in_f,out_f,B", SHAPES)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_masked_dense(in_f, out_f, B, M, dtype):
    k = _kernels()
    x, w, bias, mask = make_case(M, in_f, out_f, B, dtype)
    values, crow, col, *_ = pack_bsr(w, mask, B)
    out = k.bsr_linear_triton(x, values, crow, col, bias, out_f, allow_tf32=False)
    ref = x.double() @ w.double().T + bias.double()
    check(out, ref, dtype)


@pytest.mark.parametrize("in_f,out_f,B", SHAPES)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_input_matches_masked_dense(in_f, out_f, B, M, dtype):
    k = _kernels()
    _, w, _, mask = make_case(M, in_f, out_f, B, dtype, seed=1)
    gout = torch.randn(M, out_f).to(dtype).to(DEV)
    values, _, _, ccol, row, perm = pack_bsr(w, mask, B)
    gin = k.bsr_linear_backward_input_triton(gout, values, ccol, row, perm, in_f, allow_tf32=False)
    check(gin, gout.double() @ w.double(), dtype)


@pytest.mark.parametrize("in_f,out_f,B", SHAPES)
@pytest.mark.parametrize("M", ROWS + [300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_weight_matches_masked_dense(in_f, out_f, B, M, dtype):
    k = _kernels()
    x, w, _, mask = make_case(M, in_f, out_f, B, dtype, seed=2)
    gout = torch.randn(M, out_f).to(dtype).to(DEV)
    values, crow, col, *_ = pack_bsr(w, mask, B)
    gval = k.bsr_linear_backward_weight_triton(gout, x, crow, col, B, allow_tf32=False)
    assert gval.shape == values.shape
    gw = (gout.double().T @ x.double())  # (out, in): the dense gradient
    ref_vals, *_ = pack_bsr(gw, mask, B)  # restricted to kept blocks, zero in the padding
    check(gval, ref_vals, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_block_rows_and_columns_give_bias_and_zeros(dtype):
    """Block-rows with no kept block output exactly the bias; empty block-cols get zero gradient."""
    k = _kernels()
    in_f, out_f, B, M = 40, 72, 16, 5
    mask = torch.zeros(5, 3, dtype=torch.bool)
    mask[1, 0] = mask[1, 2] = mask[3, 1] = True  # block-rows 0, 2, 4 empty
    x, w, bias, mask = make_case(M, in_f, out_f, B, dtype, mask=mask)
    values, crow, col, ccol, row, perm = pack_bsr(w, mask, B)
    out = k.bsr_linear_triton(x, values, crow, col, bias, out_f, allow_tf32=False)
    check(out, x.double() @ w.double().T + bias.double(), dtype)
    for r in (0, 2, 4):
        sl = slice(r * B, min((r + 1) * B, out_f))
        assert torch.equal(out[:, sl], bias[sl].expand(M, -1))
    # all-False mask: output is the bias, input gradient zero, weight gradient empty
    empty = torch.zeros(5, 3, dtype=torch.bool, device=DEV)
    v0, crow0, col0, ccol0, row0, perm0 = pack_bsr(w, empty, B)
    assert v0.shape == (0, B, B)
    out0 = k.bsr_linear_triton(x, v0, crow0, col0, bias, out_f)
    assert torch.equal(out0, bias.expand(M, -1))
    gin0 = k.bsr_linear_backward_input_triton(torch.randn(M, out_f, device=DEV).to(dtype), v0, ccol0,
                                              row0, perm0, in_f)
    assert torch.equal(gin0, torch.zeros_like(gin0))
    # a block-col with no kept block gets an exactly zero input gradient
    mask_c = mask.clone()
    mask_c[:, 1] = False
    v1, _, _, ccol1, row1, perm1 = pack_bsr(w * expand_mask(mask_c, B, out_f, in_f).to(dtype), mask_c, B)
    gout = torch.randn(M, out_f, device=DEV).to(dtype)
    gin1 = k.bsr_linear_backward_input_triton(gout, v1, ccol1, row1, perm1, in_f, allow_tf32=False)
    assert torch.equal(gin1[:, B:2 * B], torch.zeros_like(gin1[:, B:2 * B]))
    assert k.bsr_linear_backward_weight_triton(torch.randn(M, out_f, device=DEV).to(dtype), x, crow0,
                                               col0, B).shape == (0, B, B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_dense_mask_equals_dense_linear(dtype):
    k = _kernels()
    in_f, out_f, B, M = 40, 72, 16, 33
    mask = torch.ones(5, 3, dtype=torch.bool)
    x, w, bias, mask = make_case(M, in_f, out_f, B, dtype, mask=mask)
    values, crow, col, ccol, row, perm = pack_bsr(w, mask, B)
    out = k.bsr_linear_triton(x, values, crow, col, None, out_f, allow_tf32=False)
    check(out, x.double() @ w.double().T, dtype)
    gout = torch.randn(M, out_f).to(dtype).to(DEV)
    check(k.bsr_linear_backward_input_triton(gout, values, ccol, row, perm, in_f, allow_tf32=False),
          gout.double() @ w.double(), dtype)


def test_non_contiguous_input_and_no_bias():
    k = _kernels()
    in_f, out_f, B, M = 40, 72, 16, 7
    x, w, _, mask = make_case(M, in_f, out_f, B, torch.float32)
    xt = torch.randn(in_f, 2 * M, device=DEV)[:, ::2].T  # (M, in) strided view
    assert not xt.is_contiguous()
    values, crow, col, *_ = pack_bsr(w, mask, B)
    out = k.bsr_linear_triton(xt, values, crow, col, None, out_f, allow_tf32=False)
    check(out, xt.double() @ w.double().T, torch.float32)


def test_every_output_element_written():
    """Poison the output allocator's memory: a stale value must never leak through."""
    k = _kernels()
    in_f, out_f, B, M = 40, 72, 32, 33
    x, w, bias, mask = make_case(M, in_f, out_f, B, torch.float32, density=0.3, seed=5)
    values, crow, col, *_ = pack_bsr(w, mask, B)
    for _ in range(2):
        torch.full((M * out_f * 4,), float("nan"), device=DEV)  # dirty the caching allocator
        out = k.bsr_linear_triton(x, values, crow, col, bias, out_f, allow_tf32=False)
        assert torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors():
    k = _kernels()
    in_f, out_f, B, M = 40, 72, 16, 5
    x, w, bias, mask = make_case(M, in_f, out_f, B, torch.float32)
    values, crow, col, ccol, row, perm = pack_bsr(w, mask, B)
    with pytest.raises(TypeError, match="int32"):
        k.bsr_linear_triton(x, values, crow.long(), col, bias, out_f)
    with pytest.raises(TypeError, match="dtype"):
        k.bsr_linear_triton(x.double(), values.double(), crow, col, bias, out_f)
    with pytest.raises(TypeError, match="values dtype"):
        k.bsr_linear_triton(x.bfloat16(), values, crow, col, bias, out_f)
    with pytest.raises(ValueError, match="crow_indices"):
        k.bsr_linear_triton(x, values, crow[:-1], col, bias, out_f)
    with pytest.raises(ValueError, match="block size"):
        k.bsr_linear_triton(x, values[:, :8, :8], crow, col, bias, out_f)
    with pytest.raises(ValueError, match="bias"):
        k.bsr_linear_triton(x, values, crow, col, bias[:-1], out_f)
    with pytest.raises(ValueError, match="2-D"):
        k.bsr_linear_triton(x[None], values, crow, col, bias, out_f)
    with pytest.raises(ValueError, match="rows"):
        k.bsr_linear_backward_weight_triton(torch.randn(M + 1, out_f, device=DEV), x, crow, col, B)


def test_import_without_triton_is_lazy():
    """The module imports without touching triton; a missing triton raises only when called."""
    import importlib
    import sys
    k = _kernels()
    src = open(k.__file__).read()
    assert "\nimport triton" not in src and "\nfrom triton" not in src
    saved = {n: m for n, m in sys.modules.items() if n == "triton" or n.startswith("triton.")}
    try:
        for n in saved:
            sys.modules[n] = None  # makes `import triton` raise ImportError
        fresh = importlib.reload(k)
        fresh._kernels.cache_clear()
        x, w, bias, mask = make_case(3, 40, 72, 16, torch.float32)
        values, crow, col, *_ = pack_bsr(w, mask, 16)
        with pytest.raises(RuntimeError, match="triton"):
            fresh.bsr_linear_triton(x, values, crow, col, bias, 72)
    finally:
        sys.modules.update(saved)
        importlib.reload(k)


def run_compile_check(tmp_path, *args):
    """``python -m cctk.kernels.compile_check --out tmp_path ARGS`` in a fresh process without
    TRITON_INTERPRET (which swaps @triton.jit for the interpreter); returns its output lines."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "cctk.kernels.compile_check", "--out", str(tmp_path), *args],
                       env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout.splitlines()


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_ahead_of_time_for_ampere_and_hopper(arch, tmp_path):
    """Compile without a GPU what the interpreter cannot check: the three kernels lower to PTX
    and cubin for sm_80 / sm_90, with tensor-core (mma) instructions for bf16 and none for IEEE
    fp32 (B = 32, aligned and masked edges; ``python -m cctk.kernels.compile_check`` does all)."""
    lines = run_compile_check(tmp_path, "--arch", str(arch), "--kernel", "bsr_forward", "--kernel",
                              "bsr_backward_input", "--kernel", "bsr_backward_weight", "--dtype", "bf16",
                              "--dtype", "fp32", "--block", "32")
    assert len(lines) == 3 * 2 * 2, lines            # kernels x dtypes x (even, odd)
    for line in lines:
        assert ("tensor cores yes" in line) == ("_bf16_" in line), line
    assert len(list(tmp_path.glob("bsr_*.ptx"))) == len(lines)


def test_bf16_forward_of_aligned_shapes_loads_16_bytes(tmp_path):
    """Feature sizes a multiple of B (EVEN_K / EVEN_N): x is read with 16-byte global loads
    (cp.async / ld.global.v4); with masked edges the loads fall to 2 bytes, which shows the check
    can fail. Read off the sm_90 PTX written by ``compile_check``."""
    from cctk.kernels.compile_check import global_load_widths
    run_compile_check(tmp_path, "--arch", "90", "--kernel", "bsr_forward", "--dtype", "bf16", "--block", "64")
    even = global_load_widths((tmp_path / "bsr_forward_bf16_B64_even.ptx").read_text())
    odd = global_load_widths((tmp_path / "bsr_forward_bf16_B64_odd.ptx").read_text())
    assert 16 in even and 2 not in even, even
    assert 2 in odd, odd


def test_global_load_widths_reads_ptx():
    from cctk.kernels.compile_check import global_load_widths
    ptx = ("ld.global.nc.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n"
           "ld.global.L1::evict_last.b16 %rs1, [%rd2];\n"
           "cp.async.cg.shared.global [ %r5 + 0 ], [ %rd3 + 0 ], 0x10, %r6;\n"
           "cp.async.ca.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x4, %r8;\n")
    assert global_load_widths(ptx) == [2, 4, 16]
