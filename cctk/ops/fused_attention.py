"""``attention``: fused multi-head attention ``o = softmax(q k^T * scale) v`` (no mask, no dropout).

    q (B, H, Tq, D), k and v (B, H, Tk, D)  ->  o (B, H, Tq, D),  scale defaults to D**-0.5

The output has the memory layout of a contiguous ``(B, Tq, H, D)`` tensor (a permuted view), so
the CCT's ``o.transpose(1, 2).reshape(B, Tq, H * D)`` costs nothing. q/k/v may be any strided
views with a unit last stride (others are made contiguous first).

Kernels: C++ (``csrc/cpu/attention_cpu.cpp``: flash-style online softmax in key blocks of 256,
AVX-512 fp32, AVX512-BF16 ``vdpbf16ps`` for bf16, a scalar path for every dtype; OpenMP over
batch x head x query tiles) and the PyTorch reference ``attention_ref`` (explicit fp32 math).
On CUDA (no cctk kernel) :func:`attention` uses ``F.scaled_dot_product_attention``.
Differentiable: the backward recomputes the probabilities in fp32 (inference is what the fused
kernel is for; training in the CCT uses torch's SDPA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cctk import _ext
from cctk._library import define

BACKENDS = ("auto", "ext", "sdpa", "torch")
MAX_EXT_HEAD_DIM = 256


def _out_like(q: torch.Tensor, Tq: int, dtype=None) -> torch.Tensor:
    B, H, _, D = q.shape
    return q.new_empty((B, Tq, H, D), dtype=dtype or q.dtype).permute(0, 2, 1, 3)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch twin: softmax(q k^T * scale) v in float32 (float64 for float64 inputs)."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    p = ((q.to(acc) @ k.to(acc).transpose(-2, -1)) * s).softmax(dim=-1)
    out = _out_like(q, q.shape[2])
    out.copy_(p @ v.to(acc))
    return out


_op = define("attention(Tensor q, Tensor k, Tensor v, float? scale=None) -> Tensor", attention_ref)


@torch.library.register_fake("cctk::attention")
def _attention_fake(q, k, v, scale=None):
    torch._check(q.dim() == 4, lambda: "cctk::attention: q must be 4-D (B, H, T, D)")
    return _out_like(q, q.shape[2])


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx, grad_out):
    # P = softmax(S), S = q k^T s:  dV = P^T dO,  dS = P * (dO V^T - rowsum(dO * O)),
    # dQ = dS K s,  dK = dS^T Q s   (fp32, recomputed; rowsum(dO * O) = rowsum(dP * P))
    q, k, v = ctx.saved_tensors
    s = q.shape[-1] ** -0.5 if ctx.scale is None else ctx.scale
    acc = torch.promote_types(q.dtype, torch.float32)
    q32, k32, v32, go = q.to(acc), k.to(acc), v.to(acc), grad_out.to(acc)
    p = ((q32 @ k32.transpose(-2, -1)) * s).softmax(dim=-1)
    dp = go @ v32.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq = (ds @ k32) * s if ctx.needs_input_grad[0] else None
    dk = (ds.transpose(-2, -1) @ q32) * s if ctx.needs_input_grad[1] else None
    dv = p.transpose(-2, -1) @ go if ctx.needs_input_grad[2] else None
    cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
    return cast(dq, q), cast(dk, k), cast(dv, v), None


torch.library.register_autograd("cctk::attention", _backward, setup_context=_setup_context)


def check_attention_inputs(q, k, v, scale=None):
    """Validate q (B, H, Tq, D), k and v (B, H, Tk, D): shapes, dtypes, devices, scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q (B, H, Tq, D) and k (B, H, Tk, D) disagree: {tuple(q.shape)} vs {tuple(k.shape)}")
    if q.shape[3] < 1:
        raise ValueError("head_dim must be positive")
    if k.shape[2] < 1 and q.shape[2] > 0:
        raise ValueError("k and v need at least one token")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    ext_ok = q.device.type == "cpu" and _ext.available() and q.shape[-1] <= MAX_EXT_HEAD_DIM
    if backend == "auto":
        # the kernel's vector paths need AVX-512; below it (an AVX2-only CPU) it is scalar and
        # several times slower than torch's SDPA, so "auto" takes SDPA there
        return "ext" if ext_ok and _ext.avx512_kernels() else "sdpa"
    if backend == "ext" and not ext_ok:
        if q.device.type != "cpu":
            raise RuntimeError(f"cctk's attention kernel runs on the CPU only (got {q.device}); "
                               "use backend='sdpa' or 'auto'")
        if q.shape[-1] > MAX_EXT_HEAD_DIM:
            raise ValueError(f"cctk's attention kernel takes head_dim <= {MAX_EXT_HEAD_DIM}, got {q.shape[-1]}; "
                             "use backend='sdpa'")
        raise RuntimeError(f"cctk's compiled extension is not loaded; {_ext.REINSTALL_HINT}, or use backend='sdpa'")
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """``softmax(q k^T * scale) v`` for q (B, H, Tq, D), k/v (B, H, Tk, D); scale defaults to D**-0.5.

    ``backend``: ``"auto"`` (the cctk CPU kernel where the extension is loaded and the tensors
    are on the CPU, else ``F.scaled_dot_product_attention``), ``"ext"`` (the ``cctk::attention``
    op; error if unavailable), ``"sdpa"``, ``"torch"`` (the reference ``attention_ref``).
    """
    check_attention_inputs(q, k, v, scale)
    backend = _resolve_backend(backend, q)
    scale = None if scale is None else float(scale)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend == "torch":
        return attention_ref(q, k, v, scale)
    return _op(q, k, v, scale)
