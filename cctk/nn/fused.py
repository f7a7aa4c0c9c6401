"""Linear layers with their epilogue: ``GELU(linear(x))`` and ``residual + linear(x)``.

One entry per epilogue for every linear the CCT holds: an :class:`~cctk.nn.ANDCLinear` runs it
inside its block-sparse kernel (``cctk::bsr_linear_epilogue``: the output tile is finished in
registers, one pass over memory), an ``nn.Linear`` through ``F.linear`` followed by ``F.gelu``
or the add. Inference paths: forward only for the
fused sparse kernel.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cctk.nn.andc_linear import ANDCLinear


def linear_gelu(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``GELU_erf(linear(x))``."""
    if isinstance(linear, ANDCLinear):
        return linear.forward_epilogue(x, activation="gelu")
    return F.gelu(linear(x))


def linear_residual(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x)``."""
    if isinstance(linear, ANDCLinear):
        return linear.forward_epilogue(x, residual=residual)
    return residual + linear(x)
