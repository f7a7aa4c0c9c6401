"""Triton block-sparse (BSR) linear kernels: the ``"triton"`` backend of ``cctk.ANDCLinear``.

Layout (canonical, see ``cctk/ops/bsr_linear.py``): the weight W (out_features, in_features) is
cut into square B x B blocks; only kept blocks are stored:

* ``values``  (nnz, B, B): ``values[i][a, b] = W[r*B + a, c*B + b]`` for the i-th kept block at
  block-row r (``crow[r] <= i < crow[r+1]``) and block-col ``c = col[i]``; blocks at the right /
  bottom edge are zero-padded beyond in_features / out_features.
* ``crow`` int32 (n_block_rows + 1), ``col`` int32 (nnz), ascending within a block-row.
* transposed index for the input gradient: ``ccol`` int32 (n_block_cols + 1), ``row`` int32 (nnz)
  and ``perm`` int32 (nnz), the index into ``values`` of each entry of the block-col list.

The three kernels (tokens on the M dimension of the tile, fp32 accumulation, ``tl.dot``):

* forward          ``out[m, r*B + a]  = bias[r*B + a] + sum_{i in row r} sum_b x[m, col[i]*B + b] * values[i][a, b]``
* input gradient   ``gin[m, c*B + b]  = sum_{j in col c} sum_a gout[m, row[j]*B + a] * values[perm[j]][a, b]``
* weight gradient  ``gval[i][a, b]    = sum_m gout[m, r*B + a] * x[m, col[i]*B + b]``   (kept blocks only)

Each forward / input-gradient program owns a BLOCK_M x B output tile (BLOCK_M tokens, one
block-row / block-col) and loops over that row's kept blocks; programs are numbered so that the
block-row index varies fastest, which keeps one token tile of x in L2 while every block-row that
reads it runs. The weight gradient splits the token dimension over several programs per kept block
(fp32 partial sums, added afterwards: deterministic, no atomics).

fp32 inputs: ``tl.dot`` in IEEE fp32 unless ``allow_tf32`` (default: follows
``torch.backends.cuda.matmul.allow_tf32``, as ``F.linear`` does). bf16 / fp16: tensor cores,
fp32 accumulation, output rounded once.

Triton is imported lazily: importing this module never needs Triton; calling a kernel without it
raises a RuntimeError saying so. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors.
"""
from __future__ import annotations

import functools

import torch

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SUPPORTED_BLOCKS = (16, 32, 64)


def _triton():
    try:
        import triton
        import triton.language as tl
    except Exception as e:  # ImportError, or a broken install
        raise RuntimeError(
            "cctk's Triton block-sparse kernels need the `triton` package "
            f"(import failed: {e}); install it (`pip install triton`) or use backend='ext'/'torch'"
        ) from e
    return triton, tl


@functools.lru_cache(maxsize=None)
def _kernels():
    """Define (once) and return the three @triton.jit kernels."""
    triton, tl = _triton()

    # Sizes that only enter masks and loop bounds are not specialised on (fewer compilations
    # across row counts); strides stay specialised (16-divisibility enables wide loads). A mask
    # on the contiguous dimension built from an unspecialised size has unknown divisibility, which
    # Triton's axis analysis turns into 2-byte loads: EVEN_K / EVEN_N (the feature size is a
    # multiple of B) drop those masks, so aligned shapes get 16-byte loads / cp.async.
    @triton.jit(do_not_specialize=["M", "k_features", "n_features", "n_block_out"])
    def _bsr_linear_forward_kernel(
        a_ptr, v_ptr, ptr_ptr, idx_ptr, perm_ptr, bias_ptr, out_ptr,
        M, k_features, n_features, n_block_out,
        stride_am, stride_ak, stride_om, stride_on,
        HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr, TRANS_V: tl.constexpr,
        B: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
        EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    ):
        """out[:, o*B:(o+1)*B] = sum_{e in ptr[o]:ptr[o+1]} a[:, idx[e]*B:...] @ op(values[p(e)]).

        Forward: a = x, ptr/idx = crow/col, p(e) = e, op = transpose (TRANS_V).
        Input gradient: a = grad_out, ptr/idx = ccol/row, p(e) = perm[e], op = identity.
        """
        pid = tl.program_id(0)
        o = pid % n_block_out          # output block index varies fastest (x tile reuse in L2)
        pid_m = pid // n_block_out
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_b = tl.arange(0, B)
        m_mask = offs_m < M
        start = tl.load(ptr_ptr + o).to(tl.int64)  # int64 loop counter: e * B * B cannot overflow
        end = tl.load(ptr_ptr + o + 1).to(tl.int64)
        acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
        for e in range(start, end):
            kb = tl.load(idx_ptr + e)
            if HAS_PERM:
                vi = tl.load(perm_ptr + e).to(tl.int64)
            else:
                vi = e
            k = kb * B + offs_b
            if EVEN_K:
                a_mask = m_mask[:, None]
            else:
                a_mask = m_mask[:, None] & (k[None, :] < k_features)
            a_tile = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
                             mask=a_mask, other=0.0)
            v_base = v_ptr + vi * (B * B)
            if TRANS_V:   # w[kk, n] = values[vi][n, kk]
                w_tile = tl.load(v_base + offs_b[None, :] * B + offs_b[:, None])
            else:         # w[kk, n] = values[vi][kk, n]
                w_tile = tl.load(v_base + offs_b[:, None] * B + offs_b[None, :])
            if DOT_F32:  # interpreter work-around only (see _dot_f32)
                a_tile = a_tile.to(tl.float32)
                w_tile = w_tile.to(tl.float32)
            acc = tl.dot(a_tile, w_tile, acc, input_precision=INPUT_PRECISION)
        n = o * B + offs_b
        if EVEN_N:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + n).to(tl.float32)[None, :]
            out_mask = m_mask[:, None]
        else:
            n_mask = n < n_features
            if HAS_BIAS:
                acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            out_mask = m_mask[:, None] & n_mask[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit(do_not_specialize=["M", "rows_per_split", "nnz", "out_features", "in_features"])
    def _bsr_linear_backward_weight_kernel(
        gout_ptr, x_ptr, brow_ptr, col_ptr, part_ptr,
        M, rows_per_split, nnz,
        stride_gm, stride_gn, stride_xm, stride_xk, out_features, in_features,
        B: tl.constexpr, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
        EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        """part[s, i] = gout[m_s, r*B:(r+1)*B]^T @ x[m_s, c*B:(c+1)*B] over this split's tokens m_s."""
        i = tl.program_id(0)
        s = tl.program_id(1)
        r = tl.load(brow_ptr + i)
        c = tl.load(col_ptr + i)
        offs_b = tl.arange(0, B)
        na = r * B + offs_b
        kb = c * B + offs_b
        na_mask = na < out_features
        kb_mask = kb < in_features
        m_lo = s * rows_per_split
        m_hi = tl.minimum(m_lo + rows_per_split, M)
        acc = tl.zeros((B, B), dtype=tl.float32)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            m_mask = offs_m < m_hi
            if EVEN_N:  # out_features % B == 0: no mask on gout's contiguous dimension
                g_mask = m_mask[:, None]
            else:
                g_mask = m_mask[:, None] & na_mask[None, :]
            if EVEN_K:
                x_mask = m_mask[:, None]
            else:
                x_mask = m_mask[:, None] & kb_mask[None, :]
            g = tl.load(gout_ptr + offs_m[:, None] * stride_gm + na[None, :] * stride_gn,
                        mask=g_mask, other=0.0)
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + kb[None, :] * stride_xk,
                         mask=x_mask, other=0.0)
            if DOT_F32:
                g = g.to(tl.float32)
                xt = xt.to(tl.float32)
            acc = tl.dot(tl.trans(g), xt, acc, input_precision=INPUT_PRECISION)
        base = part_ptr + (s.to(tl.int64) * nnz + i) * (B * B)
        tl.store(base + offs_b[:, None] * B + offs_b[None, :], acc)

    return _bsr_linear_forward_kernel, _bsr_linear_backward_weight_kernel


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_f32(dtype: torch.dtype) -> bool:
    """Upcast bf16 operands to fp32 before ``tl.dot``: under the interpreter only.

    Triton 3.8's interpreter returns garbage (~1e10) for a bf16 x bf16 ``tl.dot`` (fp16 is fine).
    The upcast is exact (a bf16 x bf16 product fits in fp32) and the sum is fp32, as on the tensor
    cores, so the interpreter still checks the indexing, masks and bf16 rounding of the output.
    Compiled kernels never take this path.
    """
    return dtype == torch.bfloat16 and _interpreting()


def _input_precision(dtype: torch.dtype, allow_tf32: bool | None) -> str:
    if dtype != torch.float32:
        # no effect on 16-bit operands (and exact for the interpreter's upcast bf16: 8-bit
        # mantissas fit tf32); Triton's own default, so the compiled path sees nothing unusual
        return "tf32"
    if _interpreting():
        return "ieee"
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    return "tf32" if allow_tf32 else "ieee"


def _block_m(M: int, B: int) -> int:
    """Token tile: 64 rows for B = 64, 128 for smaller blocks; shrunk (>= 16) for few rows."""
    cap = 64 if B >= 64 else 128
    bm = 16
    while bm < cap and bm < M:
        bm *= 2
    return bm


def _launch_opts(dev: torch.device) -> dict:
    if dev.type == "cuda":
        return {"num_warps": 4, "num_stages": 3}
    return {}


def _check_device(dev: torch.device, what: str):
    if dev.type == "cuda":
        return
    if dev.type == "cpu" and _interpreting():
        return
    raise RuntimeError(
        f"cctk Triton {what}: tensors are on {dev}; the Triton kernels run on CUDA devices "
        "(or on CPU tensors under TRITON_INTERPRET=1, for testing). Use backend='ext' or 'torch'")


def _check_index(t: torch.Tensor, name: str, dev: torch.device, length: int | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {t.shape[0]}")
    if t.device != dev:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {dev}")


def _check_values(values: torch.Tensor, dtype: torch.dtype, dev: torch.device) -> int:
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"values must be (nnz, B, B), got shape {tuple(values.shape)}")
    B = values.shape[1]
    if B not in _SUPPORTED_BLOCKS:
        raise ValueError(f"block size must be one of {_SUPPORTED_BLOCKS}, got {B}")
    if values.dtype != dtype:
        raise TypeError(f"values dtype {values.dtype} differs from the input dtype {dtype}")
    if values.device != dev:
        raise ValueError(f"values is on {values.device} but the inputs are on {dev}")
    return B


def _check_2d(t: torch.Tensor, name: str):
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (rows, features), got "
                         f"{getattr(t, 'shape', type(t).__name__)}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} dtype must be one of float32/bfloat16/float16, got {t.dtype}")


def bsr_linear_triton(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                      bias: torch.Tensor | None, out_features: int,
                      allow_tf32: bool | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` with W in the BSR layout: x (M, in_features) -> (M, out_features)."""
    _check_2d(x, "x")
    dev = x.device
    _check_device(dev, "bsr_linear")
    B = _check_values(values, x.dtype, dev)
    n_rows = -(-out_features // B)
    _check_index(crow, "crow_indices", dev, n_rows + 1)
    _check_index(col, "col_indices", dev, values.shape[0])
    in_features = x.shape[1]
    if bias is not None:
        if bias.shape != (out_features,) or bias.device != dev:
            raise ValueError(f"bias must be ({out_features},) on {dev}, got {tuple(bias.shape)} on {bias.device}")
        bias = bias.contiguous()
    M = x.shape[0]
    out = torch.empty((M, out_features), dtype=x.dtype, device=dev)
    if M == 0 or out_features == 0:
        return out
    values = values.contiguous()
    fwd, _ = _kernels()
    BM = _block_m(M, B)
    grid = (triton_cdiv(M, BM) * n_rows,)
    fwd[grid](
        x, values, crow, col, crow, bias if bias is not None else out, out,
        M, in_features, out_features, n_rows,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, HAS_PERM=False, TRANS_V=True,
        B=B, BLOCK_M=BM, INPUT_PRECISION=_input_precision(x.dtype, allow_tf32), DOT_F32=_dot_f32(x.dtype),
        EVEN_K=in_features % B == 0, EVEN_N=out_features % B == 0, **_launch_opts(dev))
    return out


def bsr_linear_backward_input_triton(grad_out: torch.Tensor, values: torch.Tensor, ccol: torch.Tensor,
                                     row: torch.Tensor, perm: torch.Tensor, in_features: int,
                                     allow_tf32: bool | None = None) -> torch.Tensor:
    """``grad_out @ W``: grad_out (M, out_features) -> (M, in_features), via the transposed index."""
    _check_2d(grad_out, "grad_out")
    dev = grad_out.device
    _check_device(dev, "bsr_linear_backward_input")
    B = _check_values(values, grad_out.dtype, dev)
    n_cols = -(-in_features // B)
    nnz = values.shape[0]
    _check_index(ccol, "ccol_indices", dev, n_cols + 1)
    _check_index(row, "row_indices", dev, nnz)
    _check_index(perm, "block_perm", dev, nnz)
    M, out_features = grad_out.shape
    gin = torch.empty((M, in_features), dtype=grad_out.dtype, device=dev)
    if M == 0 or in_features == 0:
        return gin
    values = values.contiguous()
    fwd, _ = _kernels()
    BM = _block_m(M, B)
    grid = (triton_cdiv(M, BM) * n_cols,)
    fwd[grid](
        grad_out, values, ccol, row, perm, gin, gin,
        M, out_features, in_features, n_cols,
        grad_out.stride(0), grad_out.stride(1), gin.stride(0), gin.stride(1),
        HAS_BIAS=False, HAS_PERM=True, TRANS_V=False,
        B=B, BLOCK_M=BM, INPUT_PRECISION=_input_precision(grad_out.dtype, allow_tf32),
        DOT_F32=_dot_f32(grad_out.dtype), EVEN_K=out_features % B == 0, EVEN_N=in_features % B == 0,
        **_launch_opts(dev))
    return gin


def _weight_grad_splits(M: int, nnz: int, dev: torch.device, block_m: int) -> int:
    """Token splits per kept block: enough programs to fill the GPU, >= 4 token tiles each."""
    if dev.type != "cuda":  # interpreter: small shapes, but still exercise the split path
        return max(1, min(4, triton_cdiv(M, 2 * block_m)))
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    want = triton_cdiv(4 * sms, max(nnz, 1))
    return max(1, min(want, triton_cdiv(M, 4 * block_m)))


def bsr_linear_backward_weight_triton(grad_out: torch.Tensor, x: torch.Tensor, crow: torch.Tensor,
                                      col: torch.Tensor, block_size: int,
                                      allow_tf32: bool | None = None) -> torch.Tensor:
    """Gradient of the kept blocks: ``(grad_out^T @ x)`` restricted to them, shape (nnz, B, B)."""
    _check_2d(grad_out, "grad_out")
    _check_2d(x, "x")
    dev = x.device
    _check_device(dev, "bsr_linear_backward_weight")
    if grad_out.dtype != x.dtype or grad_out.device != dev:
        raise TypeError(f"grad_out ({grad_out.dtype}, {grad_out.device}) and x ({x.dtype}, {dev}) must match")
    if grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"grad_out has {grad_out.shape[0]} rows but x has {x.shape[0]}")
    B = int(block_size)
    if B not in _SUPPORTED_BLOCKS:
        raise ValueError(f"block size must be one of {_SUPPORTED_BLOCKS}, got {B}")
    M, in_features = x.shape
    out_features = grad_out.shape[1]
    n_rows = -(-out_features // B)
    _check_index(crow, "crow_indices", dev, n_rows + 1)
    _check_index(col, "col_indices", dev)
    nnz = col.shape[0]
    if nnz == 0:
        return torch.empty((0, B, B), dtype=x.dtype, device=dev)
    if M == 0:
        return torch.zeros((nnz, B, B), dtype=x.dtype, device=dev)
    # block-row of each kept block (the kernel needs it; crow alone would need a search)
    brow = torch.repeat_interleave(torch.arange(n_rows, device=dev, dtype=torch.int32),
                                   (crow[1:] - crow[:-1]).long(), output_size=nnz)
    BM = _block_m(M, B) if B < 64 else 64
    splits = _weight_grad_splits(M, nnz, dev, BM)
    rows_per_split = triton_cdiv(triton_cdiv(M, splits), BM) * BM
    splits = triton_cdiv(M, rows_per_split)
    part = torch.empty((splits, nnz, B, B), dtype=torch.float32, device=dev)
    _, bwd_w = _kernels()
    bwd_w[(nnz, splits)](
        grad_out, x, brow, col, part,
        M, rows_per_split, nnz,
        grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), out_features, in_features,
        B=B, BLOCK_M=BM, INPUT_PRECISION=_input_precision(x.dtype, allow_tf32), DOT_F32=_dot_f32(x.dtype),
        EVEN_N=out_features % B == 0, EVEN_K=in_features % B == 0, **_launch_opts(dev))
    gval = part[0] if splits == 1 else part.sum(0)
    return gval.to(x.dtype)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
