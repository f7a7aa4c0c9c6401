"""Linear layers with their epilogue: ``GELU(linear(x))`` and ``residual + linear(x)``.

One entry per epilogue for every linear the CCT holds: an :class:`~cctk.nn.ANDCLinear` runs it
inside its block-sparse kernel (``cctk::bsr_linear_epilogue``: the output tile is finished in
registers, one pass over memory), a :class:`OneDNNLinear` as oneDNN post-ops of its GEMM (bias,
GELU or the residual add inside the GEMM's output pass: what OpenVINO does), an ``nn.Linear``
through ``F.linear`` followed by ``F.gelu`` or the add. Inference paths: forward only for the
fused kernels.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cctk.nn.andc_linear import ANDCLinear


def onednn_fusion_available(dtype: torch.dtype = torch.float32) -> bool:
    """True when torch has oneDNN's linear with post-ops (``torch.ops.mkldnn._linear_pointwise``,
    the op Inductor's CPU fusions use) and it runs here in ``dtype`` (oneDNN has no bf16 linear on
    a CPU without bf16 units)."""
    state = _ONEDNN.get(dtype)
    if state is None:
        try:
            lp = torch.ops.mkldnn._linear_pointwise
            x, w, one = torch.ones(2, 4, dtype=dtype), torch.ones(3, 4, dtype=dtype), torch.ones(2, 3, dtype=dtype)
            ok = torch.backends.mkldnn.is_available() and torch.equal(lp(x, w, None, "none", [], ""), x @ w.t())
            ok = ok and torch.equal(lp.binary(x, one, w, None, "add"), x @ w.t() + 1)
        except (AttributeError, RuntimeError, NotImplementedError):
            ok = False
        state = _ONEDNN[dtype] = bool(ok)
    return state


_ONEDNN: dict = {}


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose inference epilogues (GELU, residual add) run as oneDNN post-ops of the
    GEMM (one pass over the output, the bias folded in): same parameters and state dict; the plain
    ``forward`` and anything with autograd are ``nn.Linear``'s. ``cctk.optimize`` offers it where
    ``onednn_fusion_available()``; its tuning keeps it only where it is faster."""

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "OneDNNLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight, new.bias = lin.weight, lin.bias
        return new

    def _fusable(self, x: torch.Tensor) -> bool:
        # under torch.compile the plain ops: the mkldnn op has no fake kernel, and Inductor makes its
        # own oneDNN fusions of them
        return (x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype == self.weight.dtype
                and x.dim() >= 2 and not torch.compiler.is_compiling() and onednn_fusion_available(x.dtype))

    def forward_epilogue(self, x: torch.Tensor, activation: str = "none",
                         residual: torch.Tensor | None = None) -> torch.Tensor:
        if not self._fusable(x):
            y = F.linear(x, self.weight, self.bias)
            y = F.gelu(y) if activation == "gelu" else y
            return y if residual is None else residual + y
        x2 = x.reshape(-1, self.in_features)
        lp = torch.ops.mkldnn._linear_pointwise
        if residual is None:
            y = lp(x2, self.weight, self.bias, "gelu" if activation == "gelu" else "none", [],
                   "none" if activation == "gelu" else "")
        else:
            if activation != "none":
                raise ValueError("OneDNNLinear fuses either the GELU or the residual add, not both")
            y = lp.binary(x2, residual.reshape(-1, self.out_features).contiguous(), self.weight, self.bias, "add")
        return y.reshape(x.shape[:-1] + (self.out_features,))


def linear_gelu(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``GELU_erf(linear(x))``."""
    if isinstance(linear, (ANDCLinear, OneDNNLinear)):
        return linear.forward_epilogue(x, activation="gelu")
    return F.gelu(linear(x))


def linear_residual(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x)``."""
    if isinstance(linear, (ANDCLinear, OneDNNLinear)):
        return linear.forward_epilogue(x, residual=residual)
    return residual + linear(x)
