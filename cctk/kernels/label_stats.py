"""Triton kernels: node outputs plus per-label statistics, fused (SCIENCE.md section 6).

Two kernels, each computing a sub-block's node outputs and, in its epilogue, adding those
outputs into per-label sums (fp32 ``tl.atomic_add``), so the activations are never read again:

* ``_linear_label_stats_forward_kernel`` (FF node):
      out[b, t, n] = act( sum_i x[b, t, i] * W[n, i] + bias[n] ),  act = exact-erf GELU or identity
* ``_attention_label_stats_forward_kernel`` (MHA node), flash style (online softmax over key
  tiles, no T x T matrix in memory):
      out[b, h, t, :] = sum_s softmax_s( q[b, h, t, :] . k[b, h, s, :] * scale ) v[b, h, s, :]
  node index of head h, dim j: n = h * d_h + j.

Statistics, with label k = labels[b] and T tokens per sample:
      pooled:  sums[k, n]    += (1 / T) * sum_t out[b, t, n]       (the token mean)
      token:   sums[k, t, n] += out[b, t, n]
The sums are taken from the outputs as stored (rounded to the output dtype) and accumulated in
fp32; the atomics are ``sem="relaxed"`` (plain sums: no other memory is ordered by them, and
the default ``acq_rel`` would add fences to every one); they make the order of the additions (hence the last bits of the sums) vary from run
to run on a GPU. Each program owns one sample's row tile (a tile never straddles two samples), so the label
of a tile is the scalar ``labels[b]``. The per-label counts (an O(B) bincount) are the caller's
(``cctk.ops.label_stats``). The launchers here do no validation: ``cctk.ops.label_stats`` validates first.

This module imports Triton at import time; import it lazily (``cctk.ops.label_stats`` does).
"""
import math
import os

import torch
import triton
import triton.language as tl

# sums layout codes (tl.constexpr)
MODE_POOLED = 0
MODE_TOKEN = 1
MODES = {"pooled": MODE_POOLED, "token": MODE_TOKEN}
ACTIVATIONS = {"none": 0, "gelu": 1}
MAX_HEAD_DIM = 256          # the attention kernel keeps a whole head (d_h columns) in one tile

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED_DTYPES = tuple(_TL_DTYPE)


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _dot_options(dtype: torch.dtype):
    """(DOT_PRECISION, DOT_UPCAST) for the kernels' tl.dot calls.

    fp32 inputs: full-precision products ("ieee"; tf32 would miss the 1e-4 agreement of
    SCIENCE.md section 6). Half inputs: native half dot with fp32 accumulation on a GPU; under
    the interpreter (Triton 3.8) a bf16/fp16 tl.dot returns garbage, so the tiles are upcast to
    fp32 first, which gives the same exact products (a half times a half fits in fp32).
    """
    upcast = dtype != torch.float32 and interpreting()
    return ("ieee" if dtype == torch.float32 or upcast else None), upcast


@triton.jit
def _linear_label_stats_forward_kernel(
    X_ptr, X_batch_stride, X_token_stride, X_col_stride,
    W_ptr, W_row_stride, W_col_stride,
    Bias_ptr, Bias_stride,
    Labels_ptr, Labels_stride,
    Out_ptr, Out_batch_stride, Out_token_stride,
    Sums_ptr,
    T, D_in, D_out, inv_T,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, MODE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[b, t, n] = act(sum_i x[b, t, i] W[n, i] + bias[n]); act = 0.5 y (1 + erf(y / sqrt 2))
    (ACTIVATION=1) or y (ACTIVATION=0); then, with k = labels[b],
    MODE=0: sums[k, n] += (1/T) sum_t out[b, t, n];  MODE=1: sums[k, t, n] += out[b, t, n].

    Grid: (B * cdiv(T, BLOCK_T), cdiv(D_out, BLOCK_N)); program (p, q) owns tokens
    [tb*BLOCK_T, (tb+1)*BLOCK_T) of sample b = p // cdiv(T, BLOCK_T) and columns
    [q*BLOCK_N, (q+1)*BLOCK_N). Sums are contiguous fp32, (K, D_out) or (K, T, D_out).
    """
    pid_row = tl.program_id(0)
    pid_col = tl.program_id(1)
    num_t_blocks = tl.cdiv(T, BLOCK_T)
    b = pid_row // num_t_blocks
    t_block = pid_row % num_t_blocks

    t_offs = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
    n_offs = pid_col * BLOCK_N + tl.arange(0, BLOCK_N)
    k_offs = tl.arange(0, BLOCK_K)
    t_mask = t_offs < T
    n_mask = n_offs < D_out

    x_rows = X_ptr + b.to(tl.int64) * X_batch_stride + t_offs[:, None] * X_token_stride
    w_cols = W_ptr + n_offs[None, :] * W_row_stride

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D_in, BLOCK_K):
        k_idx = k0 + k_offs
        k_mask = k_idx < D_in
        x_tile = tl.load(x_rows + k_idx[None, :] * X_col_stride,
                         mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        w_tile = tl.load(w_cols + k_idx[:, None] * W_col_stride,
                         mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_UPCAST:
            x_tile = x_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(Bias_ptr + n_offs * Bias_stride, mask=n_mask, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    if ACTIVATION == 1:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))

    tile_mask = t_mask[:, None] & n_mask[None, :]
    out_tile = acc.to(Out_ptr.dtype.element_ty)
    tl.store(Out_ptr + b.to(tl.int64) * Out_batch_stride + t_offs[:, None] * Out_token_stride
             + n_offs[None, :], out_tile, mask=tile_mask)

    # epilogue: the statistics, from the stored (rounded) outputs, in fp32
    stat = tl.where(tile_mask, out_tile.to(tl.float32), 0.0)
    label = tl.load(Labels_ptr + b * Labels_stride)
    if MODE == 0:
        tl.atomic_add(Sums_ptr + label * D_out + n_offs, tl.sum(stat, axis=0) * inv_T, mask=n_mask,
                      sem="relaxed")
    else:
        tl.atomic_add(Sums_ptr + label * T * D_out + t_offs[:, None] * D_out + n_offs[None, :],
                      stat, mask=tile_mask, sem="relaxed")


@triton.jit
def _attention_label_stats_forward_kernel(
    Q_ptr, Q_batch_stride, Q_head_stride, Q_token_stride, Q_col_stride,
    K_ptr, K_batch_stride, K_head_stride, K_token_stride, K_col_stride,
    V_ptr, V_batch_stride, V_head_stride, V_token_stride, V_col_stride,
    Labels_ptr, Labels_stride,
    Out_ptr,
    Sums_ptr,
    H, T, D_head, sm_scale, inv_T,
    MODE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, h, t, :] = sum_s p[t, s] v[b, h, s, :], p = softmax_s(q[b,h,t,:] . k[b,h,s,:] * sm_scale),
    by the online softmax over key tiles (running max m, running denominator l, rescaled
    accumulator); then with k = labels[b] and node n = h * D_head + j,
    MODE=0: sums[k, n] += (1/T) sum_t out[b, h, t, j];  MODE=1: sums[k, t, n] += out[b, h, t, j].

    Grid: (B * H, cdiv(T, BLOCK_M)) (B * H on the axis without the 65535 limit). Out is contiguous (B, H, T, D_head); sums contiguous fp32.
    """
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    m_offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_range = tl.arange(0, BLOCK_N)
    d_offs = tl.arange(0, BLOCK_D)
    m_mask = m_offs < T
    d_mask = d_offs < D_head

    b64 = b.to(tl.int64)
    q = tl.load(Q_ptr + b64 * Q_batch_stride + h * Q_head_stride
                + m_offs[:, None] * Q_token_stride + d_offs[None, :] * Q_col_stride,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_UPCAST:
        q = q.to(tl.float32)
    k_base = K_ptr + b64 * K_batch_stride + h * K_head_stride
    v_base = V_ptr + b64 * V_batch_stride + h * V_head_stride

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, T, BLOCK_N):
        n_offs = start_n + n_range
        n_mask = n_offs < T
        k_tile = tl.load(k_base + n_offs[None, :] * K_token_stride + d_offs[:, None] * K_col_stride,
                         mask=d_mask[:, None] & n_mask[None, :], other=0.0)      # (BLOCK_D, BLOCK_N)
        if DOT_UPCAST:
            k_tile = k_tile.to(tl.float32)
        scores = tl.dot(q, k_tile, input_precision=DOT_PRECISION) * sm_scale
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))   # finite: every key tile has a valid key
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_tile = tl.load(v_base + n_offs[:, None] * V_token_stride + d_offs[None, :] * V_col_stride,
                         mask=n_mask[:, None] & d_mask[None, :], other=0.0)      # (BLOCK_N, BLOCK_D)
        p = p.to(V_ptr.dtype.element_ty)             # the probabilities as the GPU's half dot sees them
        if DOT_UPCAST:
            p = p.to(tl.float32)
            v_tile = v_tile.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p, v_tile, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tile_mask = m_mask[:, None] & d_mask[None, :]
    out_tile = acc.to(Out_ptr.dtype.element_ty)
    tl.store(Out_ptr + (b64 * H + h) * T * D_head + m_offs[:, None] * D_head + d_offs[None, :],
             out_tile, mask=tile_mask)

    # epilogue: the statistics over nodes n = h * D_head + j, from the stored outputs, in fp32
    stat = tl.where(tile_mask, out_tile.to(tl.float32), 0.0)
    label = tl.load(Labels_ptr + b * Labels_stride)
    nodes = H * D_head
    node_offs = h * D_head + d_offs
    if MODE == 0:
        tl.atomic_add(Sums_ptr + label * nodes + node_offs, tl.sum(stat, axis=0) * inv_T, mask=d_mask,
                      sem="relaxed")
    else:
        tl.atomic_add(Sums_ptr + label * T * nodes + m_offs[:, None] * nodes + node_offs[None, :],
                      stat, mask=tile_mask, sem="relaxed")


def _pow2_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def linear_label_stats_forward(x, weight, bias, labels, num_labels, activation, mode):
    """Launch ``_linear_label_stats_forward_kernel``; returns ``(out, sums)``.

    Inputs are assumed validated (same device and dtype, x (B, T, d_in), weight (d_out, d_in),
    bias (d_out,) or None, labels (B,) int64 in [0, num_labels)); any strides are fine.
    """
    B, T, d_in = x.shape
    d_out = weight.shape[0]
    out = torch.empty((B, T, d_out), dtype=x.dtype, device=x.device)
    sums_shape = (num_labels, d_out) if mode == "pooled" else (num_labels, T, d_out)
    sums = torch.zeros(sums_shape, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out, sums
    block_t = _pow2_block(T, 16, 64)
    block_n = _pow2_block(d_out, 16, 128)
    block_k = _pow2_block(d_in, 16, 32)
    grid = (B * triton.cdiv(T, block_t), triton.cdiv(d_out, block_n))
    has_bias = bias is not None
    dot_precision, dot_upcast = _dot_options(x.dtype)
    _linear_label_stats_forward_kernel[grid](
        x, x.stride(0), x.stride(1), x.stride(2),
        weight, weight.stride(0), weight.stride(1),
        bias if has_bias else weight, bias.stride(0) if has_bias else 0,
        labels, labels.stride(0),
        out, out.stride(0), out.stride(1),
        sums,
        T, d_in, d_out, 1.0 / T,
        HAS_BIAS=has_bias, ACTIVATION=ACTIVATIONS[activation], MODE=MODES[mode],
        DOT_PRECISION=dot_precision, DOT_UPCAST=dot_upcast,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4,
    )
    return out, sums


def attention_label_stats_forward(q, k, v, labels, num_labels, mode):
    """Launch ``_attention_label_stats_forward_kernel``; returns ``(out, sums)``.

    Inputs are assumed validated (q, k, v (B, H, T, d_h), same device and dtype, labels (B,)
    int64 in [0, num_labels)); any strides are fine. scale = 1 / sqrt(d_h).
    """
    B, H, T, d_head = q.shape
    if d_head > MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention kernel holds a head in one tile: d_h <= {MAX_HEAD_DIM}, "
                         f"got {d_head}")
    out = torch.empty((B, H, T, d_head), dtype=q.dtype, device=q.device)
    nodes = H * d_head
    sums_shape = (num_labels, nodes) if mode == "pooled" else (num_labels, T, nodes)
    sums = torch.zeros(sums_shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, sums
    block_m = _pow2_block(T, 16, 64)
    block_n = _pow2_block(T, 16, 64)
    block_d = _pow2_block(d_head, 16, MAX_HEAD_DIM)
    grid = (B * H, triton.cdiv(T, block_m))
    dot_precision, dot_upcast = _dot_options(q.dtype)
    _attention_label_stats_forward_kernel[grid](
        q, q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k, k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v, v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        labels, labels.stride(0),
        out,
        sums,
        H, T, d_head, 1.0 / math.sqrt(d_head), 1.0 / T,
        MODE=MODES[mode], DOT_PRECISION=dot_precision, DOT_UPCAST=dot_upcast,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=4 if block_d <= 64 else 8,
    )
    return out, sums

