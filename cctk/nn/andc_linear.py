"""``ANDCLinear``: a drop-in block-sparse ``nn.Linear`` (ANDC pruning keeps whole B x B blocks).

    y = F.linear(x, W * expand(block_mask), b)        for x of any leading shape (..., in_features)

Only the kept blocks are stored (``values`` (nnz, B, B), BSR layout of ``cctk/ops/bsr_linear.py``
with int32 index buffers), so pruned weights cost neither memory nor time and stay pruned while
fine-tuning (they have no parameter to receive a gradient).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from cctk import _ext
from cctk._library import exporting
from cctk.ops.block_sparse import (BACKENDS, _apply_epilogue, _check_mask, bsr_linear, bsr_linear_epilogue,
                                 bsr_to_dense, bsr_transpose_index, check_block_size, dense_to_bsr)

_INDEX_BUFFERS = ("crow_indices", "col_indices", "ccol_indices", "row_indices", "block_perm")


def _layout_from_mask(mask: torch.Tensor):
    """int32 index buffers (crow, col, ccol, row, perm) of the kept blocks of a bool block mask."""
    nbr, nbc = mask.shape
    counts = mask.sum(dim=1, dtype=torch.int64)
    crow = torch.zeros(nbr + 1, dtype=torch.int32, device=mask.device)
    crow[1:] = torch.cumsum(counts, 0).to(torch.int32)
    col = mask.nonzero()[:, 1].to(torch.int32).contiguous()
    ccol, row, perm = bsr_transpose_index(crow, col, nbc)
    return {"crow_indices": crow, "col_indices": col, "ccol_indices": ccol, "row_indices": row, "block_perm": perm}


class ANDCLinear(nn.Module):
    """Block-sparse linear layer: ``y = x @ (W * expand(block_mask))^T + b``.

    Args:
        in_features, out_features: as ``nn.Linear`` (any sizes; edge blocks may be partial).
        block_size: B, one of 16, 32, 64.
        block_mask: bool tensor (ceil(out/B), ceil(in/B)); True keeps a block. All False is
            allowed (the output is the bias).
        bias: learn an additive bias.
        dtype, device: of the parameters (index buffers are always int32).

    Attributes:
        values: Parameter (nnz, B, B), the kept blocks (zero-padded beyond the features).
        bias: Parameter (out_features,) or None.
        mask: bool buffer (the block mask, saved in the state dict; ``block_mask`` returns it).
        crow_indices, col_indices, ccol_indices, row_indices, block_perm: int32 index buffers.
        backend: "auto" | "ext" | "triton" | "torch" (see :func:`cctk.ops.bsr_linear`).

    Loading a state dict whose mask differs (another nnz) re-derives the layout from that mask
    and replaces ``values`` with a Parameter of the new size (rebuild optimizers afterwards).
    """

    def __init__(self, in_features: int, out_features: int, block_size: int, block_mask: torch.Tensor,
                 bias: bool = True, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        check_block_size(block_size)
        _check_mask(block_mask, out_features, in_features, block_size)
        factory = {"dtype": dtype, "device": device}
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self._backend = "auto"
        # set by cctk.optimize: CPU inference calls the compiled op directly (the layout was
        # validated when the layer was built or loaded; shapes are checked by the kernel)
        self.inference_fast = False
        self._packed = None  # (packed weights, weakref to the values they came from, its version): prepack()
        mask = block_mask.detach().to(device=device, dtype=torch.bool).clone()
        self.register_buffer("mask", mask)
        for name, t in _layout_from_mask(mask).items():
            self.register_buffer(name, t)
        # nn.Linear's initialisation (kaiming_uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))),
        # drawn for the dense weight so a masked model starts where the dense one would.
        weight = torch.empty(out_features, in_features, **factory)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.values = nn.Parameter(dense_to_bsr(weight, mask, block_size)[0])
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features, **factory).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    # -----------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, linear: nn.Linear, block_mask: torch.Tensor, block_size: int) -> "ANDCLinear":
        """The block-sparse copy of ``linear`` keeping the blocks where ``block_mask`` is True."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, block_size, block_mask, bias=linear.bias is not None,
                  dtype=w.dtype, device=w.device)
        with torch.no_grad():
            mod.values.copy_(dense_to_bsr(w.detach(), mod.mask, block_size)[0])
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        return mod

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str):
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    @property
    def block_mask(self) -> torch.Tensor:
        """bool (ceil(out/B), ceil(in/B)): True where a block is kept."""
        return self.mask

    @property
    def nnz(self) -> int:
        """Number of kept blocks."""
        return self.values.shape[0]

    @property
    def density(self) -> float:
        """Fraction of blocks kept."""
        return self.nnz / max(self.mask.numel(), 1)

    def to_dense(self) -> torch.Tensor:
        """The dense weight W * expand(block_mask), (out_features, in_features)."""
        return bsr_to_dense(self.values, self.crow_indices, self.col_indices, self.out_features, self.in_features)

    def dense_weight_for_export(self) -> torch.Tensor:
        """:meth:`to_dense` in ops every exporter and runtime has (a gather of the kept blocks
        and one zero block by a position computed from the mask, then reshapes; no
        ``searchsorted`` or ``index_put``): the weight an exported ANDCLinear multiplies by."""
        B = self.block_size
        nbr, nbc = self.mask.shape
        flat = self.mask.reshape(-1)
        # block (r, c) is values[number of kept blocks before it in row-major order], or the zero block
        position = torch.where(flat, torch.cumsum(flat.to(torch.int64), 0) - 1, self.values.shape[0])
        blocks = torch.cat([self.values, self.values.new_zeros(1, B, B)])[position]
        dense = blocks.reshape(nbr, nbc, B, B).permute(0, 2, 1, 3).reshape(nbr * B, nbc * B)
        return dense[:self.out_features, :self.in_features]

    def transposed_index(self):
        """(ccol_indices, row_indices, block_perm): the block-col compressed index of W."""
        return self.ccol_indices, self.row_indices, self.block_perm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if exporting():
            # traced for export (ONNX, torch.export, OpenVINO): the dense weight with its pruned
            # blocks as zeros and a standard linear, the one form every runtime runs (it does
            # not skip the zero blocks)
            return F.linear(x, self.dense_weight_for_export(), self.bias)
        if isinstance(x, torch.Tensor) and self._direct(x):
            return self.forward_epilogue(x)
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"ANDCLinear expects x of shape (..., {self.in_features}), got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        return bsr_linear(x, self.values, self.crow_indices, self.col_indices, self.bias, self.out_features,
                          backend=self._backend, transposed_index=self.transposed_index())

    def prepack(self) -> bool:
        """Pack the forward weights into the CPU kernel's layout once (``cctk::bsr_pack``), for
        inference: later forwards skip the per-call packing (most of a batch-1 call's overhead).
        The pack is used only while ``values`` is the same tensor at the same version (any
        update, ``.to()`` or ``load_state_dict`` retires it). Returns whether a pack was made."""
        if self.values.device.type != "cpu" or not _ext.available() or self.values.dtype not in (torch.float32,
                                                                                                 torch.bfloat16):
            self._packed = None
            return False
        with torch.no_grad():
            packed = torch.ops.cctk.bsr_pack(self.values.detach())
        self._packed = (packed, weakref.ref(self.values), self.values._version)
        return True

    def __getstate__(self):
        # pickle / torch.save(model) / deepcopy: the pre-packed weights hold a weakref (not
        # picklable) and are derived data; they are left out and made again on load
        state = super().__getstate__()
        state = dict(state)
        state["_packed"] = state.get("_packed") is not None
        return state

    def __setstate__(self, state):
        repack = state.get("_packed") is True
        super().__setstate__(dict(state, _packed=None))
        if repack:
            self.prepack()

    def _packed_weights(self):
        if self._packed is None:
            return None
        packed, ref, version = self._packed
        if torch.compiler.is_compiling():
            # a compiled graph takes the pack as it is: cctk.optimize(compile=True) models are frozen
            # (change their weights in place and the graph keeps the old pack; optimize again)
            return packed if ref() is self.values else None
        if ref() is not self.values or self.values._version != version:
            self._packed = None  # stale: the weights changed since prepack()
            return None
        return packed

    def _direct(self, x: torch.Tensor) -> bool:
        return (self.inference_fast and not torch.is_grad_enabled() and x.device.type == "cpu"
                and self._backend in ("auto", "ext") and x.dtype == self.values.dtype and x.dim() >= 1
                and x.shape[-1] == self.in_features and _ext.available())

    def forward_epilogue(self, x: torch.Tensor, activation: str = "none",
                         residual: torch.Tensor | None = None) -> torch.Tensor:
        """``activation(self(x)) + residual`` in one kernel where the backend has the fused
        epilogue (``cctk.ops.bsr_linear_epilogue``); activation ``"none"`` or ``"gelu"``."""
        if exporting():
            return _apply_epilogue(self(x), activation, residual)
        if self._direct(x) and (residual is None or residual.shape == x.shape[:-1] + (self.out_features,)):
            r2 = None if residual is None else residual.reshape(-1, self.out_features)
            y = torch.ops.cctk.bsr_linear_epilogue(x.reshape(-1, self.in_features).contiguous(), self.values,
                                                   self.crow_indices, self.col_indices, self.bias,
                                                   self.out_features, activation, r2, self._packed_weights())
            return y.reshape(x.shape[:-1] + (self.out_features,))
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"ANDCLinear expects x of shape (..., {self.in_features}), got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        return bsr_linear_epilogue(x, self.values, self.crow_indices, self.col_indices, self.bias,
                                   self.out_features, activation=activation, residual=residual,
                                   backend=self._backend, transposed_index=self.transposed_index())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"density={self.density:.3f} ({self.nnz}/{self.mask.numel()} blocks), bias={self.bias is not None}, "
                f"backend={self._backend!r}")

    # -----------------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Accept a state dict saved with another block mask. The whole state of this module is
        validated first and nothing changes on any error: the mask (its own, or this module's
        when the state has none) must fit the layer, ``values`` must hold exactly the blocks it
        keeps, ``bias`` must fit, and every index buffer given must equal the layout derived from
        the mask (index buffers are never trusted on their own). Then the index buffers are
        re-derived from the mask and ``values`` is resized."""
        key = prefix + "mask"
        B = self.block_size
        errors = []
        mask = state_dict.get(key, self.mask)
        try:
            _check_mask(mask, self.out_features, self.in_features, B)
        except (TypeError, ValueError) as e:
            error_msgs.append(f"{key}: {e}")
            return
        mask = mask.to(device=self.mask.device, dtype=torch.bool)
        nnz = int(mask.sum())
        vkey = prefix + "values"
        v = state_dict.get(vkey)
        if v is not None and (not isinstance(v, torch.Tensor) or tuple(v.shape) != (nnz, B, B)):
            errors.append(f"{vkey}: shape {tuple(getattr(v, 'shape', ()))} does not match the {nnz} "
                          f"blocks its mask keeps (expected {(nnz, B, B)})")
        bkey = prefix + "bias"
        b = state_dict.get(bkey)
        if b is not None and self.bias is not None and (
                not isinstance(b, torch.Tensor) or tuple(b.shape) != (self.out_features,)):
            errors.append(f"{bkey}: shape {tuple(getattr(b, 'shape', ()))}, expected ({self.out_features},)")
        layout = _layout_from_mask(mask)
        for name, t in layout.items():
            k = prefix + name
            if k in state_dict:
                given = state_dict[k]
                if (not isinstance(given, torch.Tensor) or given.shape != t.shape
                        or not torch.equal(given.to(device=t.device, dtype=t.dtype), t)):
                    errors.append(f"{k}: does not match the layout of {key} (corrupt state dict?)")
        if errors:
            error_msgs.extend(errors)
            return
        if not torch.equal(mask, self.mask):
            self.mask = mask.clone()
            for name, t in layout.items():
                setattr(self, name, t)
            if nnz != self.values.shape[0]:
                self.values = nn.Parameter(self.values.detach().new_zeros(nnz, B, B),
                                           requires_grad=self.values.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
