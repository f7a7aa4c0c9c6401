"""``layer_norm``: ``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dimension.

The same function as ``torch.nn.functional.layer_norm(x, (d,), weight, bias, eps)`` (biased
variance), as a cctk op for inference: the C++ kernel (``csrc/cpu/layer_norm_cpu.cpp``: one
row in L1 across a two-pass mean / variance and the affine store, AVX-512 fp32 and bf16, a
scalar path for every dtype) runs where torch's CPU LayerNorm is slow (fp32 here: ~40x a copy
of the same tensor). Reference twin: ``layer_norm_ref`` (F.layer_norm in fp32). Differentiable
(the backward is the standard formula in fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cctk import _ext
from cctk._library import define


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    """Plain PyTorch twin: F.layer_norm in float32 (float64 for float64), cast back."""
    acc = torch.promote_types(x.dtype, torch.float32)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    return F.layer_norm(x.to(acc), (x.shape[-1],), w, b, eps).to(x.dtype)


_op = define("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor", layer_norm_ref)


@torch.library.register_fake("cctk::layer_norm")
def _layer_norm_fake(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    # xhat = (x - mu) rstd;  dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy * w
    x, weight = ctx.saved_tensors
    acc = torch.promote_types(x.dtype, torch.float32)
    x32, dy = x.to(acc), grad_out.to(acc)
    mu = x32.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x32.var(-1, unbiased=False, keepdim=True) + ctx.eps)
    xhat = (x32 - mu) * rstd
    g = dy if weight is None else dy * weight.to(acc)
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    lead = tuple(range(x.dim() - 1))
    dw = (dy * xhat).sum(lead).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    db = dy.sum(lead).to(x.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx.to(x.dtype) if ctx.needs_input_grad[0] else None, dw, db, None


torch.library.register_autograd("cctk::layer_norm", _backward, setup_context=_setup_context)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """LayerNorm over the last dimension. ``backend``: ``"auto"`` (the cctk CPU kernel when the
    extension is loaded and x is on the CPU, else ``F.layer_norm``), ``"ext"``, ``"torch"``."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be a tensor with a non-empty last dimension, got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    d = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (d,):
            raise ValueError(f"{name} must have shape ({d},), got {tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name} must be {x.dtype} on {x.device}, got {t.dtype} on {t.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if backend not in ("auto", "ext", "torch"):
        raise ValueError(f"backend must be 'auto', 'ext' or 'torch', got {backend!r}")
    ext_ok = x.device.type == "cpu" and _ext.available()
    if backend == "ext" and not ext_ok:
        raise RuntimeError(f"cctk's layer_norm kernel needs the compiled extension and a CPU tensor (got {x.device}); "
                           f"{_ext.REINSTALL_HINT}, or use backend='torch'")
    if backend == "torch" or not ext_ok:
        return F.layer_norm(x, (d,), weight, bias, eps)
    return _op(x, weight, bias, float(eps))
