"""MaskedLinear: a dense nn.Linear whose weight is multiplied by a fixed 0/1 mask.

    y = x (W * M)^T + b

Used for the pruned classifier (an element mask: the paper's ANDC keeps fc.W[c, n] iff
c ∈ D_n; the layer is tiny, so it stays dense) and for fine-tuning with fixed masks
(the gradient of W is dL/dy^T x * M, so pruned weights never move). A MaskedLinear made from a
block mask remembers ``block_mask`` and ``block_size`` so it converts to ``cctk.nn.ANDCLinear``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MaskedLinear", "expand_block_mask"]


def expand_block_mask(block_mask: torch.Tensor, block_size: int, shape) -> torch.Tensor:
    """Element mask (out, in) of a block mask: mask[j, i] = block_mask[j // B, i // B]."""
    out_f, in_f = shape
    full = block_mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    return full[:out_f, :in_f].contiguous()


class MaskedLinear(nn.Module):
    """nn.Linear with a fixed bool mask on the weight: y = F.linear(x, W * mask, b)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, bias: bool = True,
                 block_mask: Optional[torch.Tensor] = None, block_size: Optional[int] = None,
                 device=None, dtype=None):
        super().__init__()
        if tuple(mask.shape) != (out_features, in_features):
            raise ValueError(
                f"mask must have shape (out_features, in_features) = {(out_features, in_features)}, "
                f"got {tuple(mask.shape)}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("mask", mask.to(device=device, dtype=torch.bool).clone())
        self.block_size = block_size
        if block_mask is not None:
            if block_size is None:
                raise ValueError("block_mask needs block_size")
            if not torch.equal(expand_block_mask(block_mask.cpu(), block_size, mask.shape), mask.cpu().bool()):
                raise ValueError("mask is not the expansion of block_mask")
            self.register_buffer("block_mask", block_mask.to(device=device, dtype=torch.bool).clone())
        else:
            self.block_mask = None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Optional[torch.Tensor] = None,
                    block_mask: Optional[torch.Tensor] = None, block_size: Optional[int] = None) -> "MaskedLinear":
        """Wrap a dense linear (weights copied). Give an element ``mask`` or ``block_mask`` + ``block_size``."""
        if mask is None:
            if block_mask is None or block_size is None:
                raise ValueError("give mask, or block_mask and block_size")
            mask = expand_block_mask(block_mask.cpu(), block_size, linear.weight.shape)
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, mask, bias=linear.bias is not None,
                block_mask=block_mask, block_size=block_size, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w * m.mask)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        m.train(linear.training)
        return m

    @property
    def density(self) -> float:
        """Kept fraction of the weight's elements."""
        return float(self.mask.float().mean())

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W * mask (same outputs, dense cost)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.masked_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, density={self.density:.3f}"
        if self.block_size is not None:
            s += f", block_size={self.block_size}"
        return s
