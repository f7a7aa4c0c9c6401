"""Structured pruning: remove whole nodes and get a smaller *dense* CCT.

A removed FF node deletes its row of ``linear1`` (and bias) and its column of ``linear2``; a
removed head dim (h, j) deletes the q, k and v rows (h, j) of ``qkv`` and the column (h, j) of
``proj``. Every head keeps the same number of dims (heads stay equal-sized) and the attention
keeps its trained scale ``d_h**-0.5``. The result computes exactly what the full model computes
with those nodes silenced (their weights zeroed): :func:`remove_nodes` is the structured twin
of a node mask, and runs at the speed of its smaller dense layers.
"""
from __future__ import annotations

import copy
from typing import Mapping, Optional

import torch
import torch.nn as nn


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _check_index(idx, n: int, what: str) -> torch.Tensor:
    idx = torch.as_tensor(idx, dtype=torch.long)
    if idx.numel() == 0:
        raise ValueError(f"{what}: keep at least one node")
    if idx.min() < 0 or idx.max() >= n or torch.unique(idx).numel() != idx.numel():
        raise ValueError(f"{what}: indices must be distinct and in [0, {n}), got {idx.tolist()}")
    return torch.sort(idx).values


def remove_nodes(model: nn.Module, ff_keep: Optional[Mapping[int, torch.Tensor]] = None,
                 head_dims_keep: Optional[Mapping[int, torch.Tensor]] = None) -> nn.Module:
    """A copy of a CCT keeping only the given nodes (blocks not named keep all of theirs).

    ``ff_keep[b]``: indices of the FF hidden units kept in block ``b``.
    ``head_dims_keep[b]``: (H, k) indices of the dims kept in each head of block ``b`` (the same
    k for every head; q, k and v keep the same dims).
    """
    for attr in ("blocks", "num_heads"):
        if not hasattr(model, attr):
            raise TypeError(f"remove_nodes expects a CCT (with .blocks and .num_heads), got {type(model).__name__}")
    out = copy.deepcopy(model)
    n_blocks = len(out.blocks)
    for name, keep in (("ff_keep", ff_keep or {}), ("head_dims_keep", head_dims_keep or {})):
        bad = [b for b in keep if not isinstance(b, int) or not 0 <= b < n_blocks]
        if bad:
            raise ValueError(f"{name}: blocks {bad} are not in [0, {n_blocks})")
    for b, keep in (ff_keep or {}).items():
        blk = out.blocks[b]
        keep = _check_index(keep, blk.linear1.out_features, f"ff_keep[{b}]")
        l1, l2 = blk.linear1, blk.linear2
        blk.linear1 = _linear(l1.weight[keep], None if l1.bias is None else l1.bias[keep])
        blk.linear2 = _linear(l2.weight[:, keep], l2.bias)
    for b, keep in (head_dims_keep or {}).items():
        attn = out.blocks[b].self_attn
        H, inner = attn.num_heads, attn.qkv.out_features // 3
        dh = inner // H
        keep = torch.as_tensor(keep, dtype=torch.long)
        if keep.dim() != 2 or keep.shape[0] != H:
            raise ValueError(f"head_dims_keep[{b}] must be (heads={H}, k), got shape {tuple(keep.shape)}")
        cols = torch.cat([h * dh + _check_index(keep[h], dh, f"head_dims_keep[{b}][{h}]") for h in range(H)])
        rows = torch.cat([part * inner + cols for part in range(3)])
        attn.qkv = _linear(attn.qkv.weight[rows], None if attn.qkv.bias is None else attn.qkv.bias[rows])
        attn.proj = _linear(attn.proj.weight[:, cols], attn.proj.bias)
        attn.head_dim = keep.shape[1]  # attn.scale keeps the trained d_h**-0.5
    if hasattr(out, "refresh_widths"):
        out.refresh_widths()
    return out


def node_fraction_keep(model: nn.Module, fraction: float, seed: int = 0):
    """Seeded random ``(ff_keep, head_dims_keep)`` keeping ``fraction`` of every block's FF units
    and of every head's dims (at least one each): a structured model of a given size, for
    throughput comparisons at a kept fraction."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    g = torch.Generator().manual_seed(seed)
    ff, heads = {}, {}
    for b, blk in enumerate(model.blocks):
        n_ff = blk.linear1.out_features
        ff[b] = torch.randperm(n_ff, generator=g)[:max(1, round(fraction * n_ff))]
        H = blk.self_attn.num_heads
        dh = blk.self_attn.qkv.out_features // 3 // H
        k = max(1, round(fraction * dh))
        heads[b] = torch.stack([torch.randperm(dh, generator=g)[:k] for _ in range(H)])
    return ff, heads
