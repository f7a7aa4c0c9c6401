"""``cctk.nn.LayerNorm``: ``nn.LayerNorm`` (last dimension) whose inference forward runs
``cctk.ops.layer_norm`` (the C++ kernel, where the CPU has its AVX-512 path; torch's kernel below
it, where cctk's would be a scalar loop); with autograd recording it is torch's own."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cctk import _ext
from cctk.ops.normalization import layer_norm


class LayerNorm(nn.LayerNorm):
    """Drop-in ``nn.LayerNorm`` over the last dimension (same parameters and state dict)."""

    @classmethod
    def from_torch(cls, ln: nn.LayerNorm) -> "LayerNorm":
        """The same layer (sharing its parameters) as a ``cctk.nn.LayerNorm``."""
        if len(ln.normalized_shape) != 1:
            raise ValueError(f"cctk.nn.LayerNorm normalises the last dimension only, got normalized_shape "
                             f"{tuple(ln.normalized_shape)}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape, new.eps, new.elementwise_affine = ln.normalized_shape, ln.eps, ln.elementwise_affine
        new.weight, new.bias = ln.weight, ln.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (self.weight is not None and self.weight.requires_grad)):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if x.device.type == "cpu" and not _ext.avx512_kernels():
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if (x.device.type == "cpu" and x.dim() >= 1 and x.shape[-1] == self.normalized_shape[0]
                and (self.weight is None or self.weight.dtype == x.dtype)):
            return torch.ops.cctk.layer_norm(x, self.weight, self.bias, self.eps)  # checked here; the kernel checks too
        return layer_norm(x, self.weight, self.bias, self.eps)
