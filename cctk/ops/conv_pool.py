"""``conv_relu_maxpool``: one CCT tokenizer stage in one pass,

    y = MaxPool2d(ReLU(Conv2d(x, weight, stride, padding, bias=None)), pool_kernel, pool_stride, pool_padding)

returned as a channels-last (NHWC memory) tensor, so the tokenizer's flatten to (B, T, C)
tokens is a free view. The C++ kernel (``csrc/cpu/conv_pool_cpu.cpp``) computes each
convolution row once into a small ring of rows and pools it straight away: the full-resolution
feature map (16 MiB for a batch of 32 CCT-7 images) is never written. fp32 accumulation
(float32, bfloat16, float16). Reference twin ``conv_relu_maxpool_ref`` (torch's own ops).
Inference only: the CCT's tokenizer uses it under ``cctk.optimize`` when autograd is off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cctk import _ext
from cctk._library import define


def _out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def conv_relu_maxpool_ref(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding):
    """Plain PyTorch twin (float32 math), channels-last result."""
    acc = torch.promote_types(x.dtype, torch.float32)
    y = F.max_pool2d(F.relu(F.conv2d(x.to(acc), weight.to(acc), None, stride, padding)), pool_kernel,
                     pool_stride, pool_padding)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)


_op = define("conv_relu_maxpool(Tensor x, Tensor weight, int stride, int padding, int pool_kernel, "
             "int pool_stride, int pool_padding) -> Tensor", conv_relu_maxpool_ref)


@torch.library.register_fake("cctk::conv_relu_maxpool")
def _conv_relu_maxpool_fake(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding):
    hc, wc = _out(x.shape[2], weight.shape[2], stride, padding), _out(x.shape[3], weight.shape[3], stride, padding)
    hp, wp = _out(hc, pool_kernel, pool_stride, pool_padding), _out(wc, pool_kernel, pool_stride, pool_padding)
    return x.new_empty((x.shape[0], hp, wp, weight.shape[0])).permute(0, 3, 1, 2)


def _no_backward(ctx, grad_out):
    raise RuntimeError("cctk::conv_relu_maxpool is forward-only (inference); train with the tokenizer's "
                       "torch modules (the CCT uses them whenever autograd records)")


torch.library.register_autograd("cctk::conv_relu_maxpool", _no_backward, setup_context=lambda ctx, inputs, output: None)

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def conv_relu_maxpool(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0,
                      pool_kernel: int = 3, pool_stride: int = 2, pool_padding: int = 1,
                      backend: str = "auto") -> torch.Tensor:
    """One tokenizer stage (see the module doc); x (B, C_in, H, W), weight (C_out, C_in, k, k).

    ``backend``: ``"auto"`` (the C++ kernel for CPU tensors of float32/bfloat16/float16 when the
    extension is loaded, else the reference), ``"ext"``, ``"torch"``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be images (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[1] != x.shape[1] \
            or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be (C_out, {x.shape[1]}, k, k), got {tuple(getattr(weight, 'shape', ()))}")
    if not x.is_floating_point() or weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"x and weight must be floating point with one dtype and device, got {x.dtype} on "
                        f"{x.device} and {weight.dtype} on {weight.device}")
    geometry = dict(stride=stride, padding=padding, pool_kernel=pool_kernel, pool_stride=pool_stride,
                    pool_padding=pool_padding)
    for name, v in geometry.items():
        lo = 0 if name.endswith("padding") else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if 2 * pool_padding > pool_kernel:
        raise ValueError(f"pool_padding must be at most half of pool_kernel, got {pool_padding} and {pool_kernel}")
    hc = _out(x.shape[2], weight.shape[2], stride, padding)
    wc = _out(x.shape[3], weight.shape[3], stride, padding)
    if hc < 1 or wc < 1 or _out(hc, pool_kernel, pool_stride, pool_padding) < 1 \
            or _out(wc, pool_kernel, pool_stride, pool_padding) < 1:
        raise ValueError(f"images of {x.shape[2]}x{x.shape[3]} are too small for this convolution and pooling")
    if backend not in ("auto", "ext", "torch"):
        raise ValueError(f"backend must be 'auto', 'ext' or 'torch', got {backend!r}")
    ext_ok = x.device.type == "cpu" and _ext.available() and x.dtype in FUSED_DTYPES
    if backend == "ext" and not ext_ok:
        raise RuntimeError(f"cctk's conv_relu_maxpool kernel needs the compiled extension and a CPU tensor of "
                           f"{', '.join(str(d) for d in FUSED_DTYPES)}; {_ext.REINSTALL_HINT}, or use backend='torch'")
    if backend == "torch" or not ext_ok:
        return conv_relu_maxpool_ref(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding)
    return _op(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding)
