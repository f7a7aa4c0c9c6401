"""Function-preserving permutations of a CCT, and how cctk chooses them (SCIENCE.md section 5).

Three kinds, each leaves model(x) unchanged (up to float rounding):

* FF hidden units of block b, permutation p over d_ff:
      W1 <- W1[p, :],  b1 <- b1[p],  W2 <- W2[:, p]
  (GELU acts per unit, so y = W2 GELU(W1 x + b1) + b2 is a sum over units in any order).
* Dims within head h of block b, permutations p_qk and p_v over d_h:
      q rows h*d_h + j and k rows d + h*d_h + j take p_qk (q.k^T = sum_j q_j k_j is unchanged),
      v rows 2d + h*d_h + j take p_v, and so do the proj's input columns h*d_h + j.
* The stream channels, one global permutation p over d applied to every tensor touching the
  residual stream: the tokenizer's last conv output channels (conv, ReLU and max-pool act per
  channel), the positional (and class) embedding's last dim, every LayerNorm's weight and bias
  (mean and variance over channels are order-free), the input columns of qkv, linear1,
  attention_pool and fc, the output rows (and bias) of proj and linear2.

Only dense ``nn.Linear`` layers (or :class:`cctk.nn.MaskedLinear`, whose mask moves
along) are permuted: permute first, then convert to ANDCLinear.

Choosing permutations: :func:`label_order` sorts nodes so that nodes speaking about the same
labels sit next to each other (see its docstring); the stream uses one order built from the
stream nodes' label sets at every place the stream is measured.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from cctk.nn import MaskedLinear

__all__ = [
    "permute_ff",
    "permute_head_dims",
    "permute_stream",
    "label_order",
    "check_permutation",
]


def check_permutation(perm, n: int, name: str = "perm") -> torch.Tensor:
    perm = torch.as_tensor(perm, dtype=torch.long).cpu()
    if perm.dim() != 1 or perm.numel() != n or not torch.equal(torch.sort(perm).values, torch.arange(n)):
        raise ValueError(f"{name} must be a permutation of range({n}), got shape {tuple(perm.shape)}")
    return perm


def _permute_param(p: Optional[torch.Tensor], perm: torch.Tensor, dim: int) -> None:
    if p is None:
        return
    idx = perm.to(p.device)
    p.data = p.data.index_select(dim, idx).contiguous()


def _linear_like(module: nn.Module, where: str) -> nn.Module:
    if isinstance(module, (nn.Linear, MaskedLinear)):
        return module
    raise TypeError(
        f"{where} is a {type(module).__name__}; permutations apply to dense nn.Linear / MaskedLinear "
        "layers: permute the model before converting it to ANDCLinear"
    )


@torch.no_grad()
def _permute_linear(module: nn.Module, where: str, out_perm: Optional[torch.Tensor] = None,
                    in_perm: Optional[torch.Tensor] = None, out_index: Optional[torch.Tensor] = None) -> None:
    """Permute rows (out_perm, or a full row index ``out_index``) and/or columns (in_perm) of a linear."""
    lin = _linear_like(module, where)
    rows = out_index if out_index is not None else out_perm
    if rows is not None:
        _permute_param(lin.weight, rows, 0)
        _permute_param(lin.bias, rows, 0)
    if in_perm is not None:
        _permute_param(lin.weight, in_perm, 1)
    if isinstance(lin, MaskedLinear):
        m = lin.mask
        if rows is not None:
            m = m.index_select(0, rows.to(m.device))
        if in_perm is not None:
            m = m.index_select(1, in_perm.to(m.device))
        lin.mask = m.contiguous()
        if lin.block_mask is not None and (rows is not None or in_perm is not None):
            # a permuted block-masked layer is no longer block structured in general
            lin.block_mask = None
            lin.block_size = None


def permute_ff(model: nn.Module, block: int, perm) -> None:
    """Permute the FF hidden units of ``model.blocks[block]`` in place (W1 rows, b1, W2 columns)."""
    layer = model.blocks[block]
    perm = check_permutation(perm, layer.linear1.out_features, "ff perm")
    _permute_linear(layer.linear1, f"blocks[{block}].linear1", out_perm=perm)
    _permute_linear(layer.linear2, f"blocks[{block}].linear2", in_perm=perm)


def permute_head_dims(model: nn.Module, block: int, head: int, perm_qk=None, perm_v=None) -> None:
    """Permute the dims of one head in place: ``perm_qk`` on its q and k rows of qkv, ``perm_v``
    on its v rows of qkv and on the proj's input columns."""
    layer = model.blocks[block]
    H = model.num_heads
    d = layer.self_attn.qkv.out_features // 3   # the inner width H * d_h (narrower after node removal)
    dh = d // H
    if not (0 <= head < H):
        raise ValueError(f"head must be in [0, {H}), got {head}")
    base = head * dh
    rows = torch.arange(3 * d)
    cols = torch.arange(d)
    if perm_qk is not None:
        p = check_permutation(perm_qk, dh, "perm_qk")
        rows[base:base + dh] = base + p
        rows[d + base:d + base + dh] = d + base + p
    if perm_v is not None:
        p = check_permutation(perm_v, dh, "perm_v")
        rows[2 * d + base:2 * d + base + dh] = 2 * d + base + p
        cols[base:base + dh] = base + p
        _permute_linear(layer.self_attn.proj, f"blocks[{block}].self_attn.proj", in_perm=cols)
    _permute_linear(layer.self_attn.qkv, f"blocks[{block}].self_attn.qkv", out_index=rows)


def _tokenizer_last_conv(model: nn.Module) -> nn.Module:
    last = None
    for m in model.tokenizer.modules():
        if len(list(m.parameters(recurse=False))) > 0:
            last = m
    if not isinstance(last, nn.Conv2d):
        raise TypeError(
            "the stream permutation needs the tokenizer to end with a Conv2d (followed only by "
            f"per-channel ops), found {type(last).__name__}"
        )
    return last


def _stream_embeddings(model: nn.Module):
    """The (name, tensor) pairs of embeddings added to the stream (positional, class token)."""
    found = []
    owners = [model, getattr(model, "classifier", None)]
    for owner in owners:
        if owner is None:
            continue
        for attr in ("positional_emb", "class_emb"):
            t = getattr(owner, attr, None)
            if isinstance(t, torch.Tensor) and all(t is not f for _, f in found):
                found.append((attr, t))
    return found


@torch.no_grad()
def permute_stream(model: nn.Module, perm) -> None:
    """Apply one permutation of the d stream channels to every tensor touching the stream (in place)."""
    d = model.embed_dim
    perm = check_permutation(perm, d, "stream perm")
    conv = _tokenizer_last_conv(model)
    _permute_param(conv.weight, perm, 0)
    _permute_param(conv.bias, perm, 0)
    for _, emb in _stream_embeddings(model):
        emb.data = emb.data.index_select(emb.dim() - 1, perm.to(emb.device)).contiguous()
    for b, layer in enumerate(model.blocks):
        for norm in (layer.pre_norm, layer.norm1):
            _permute_param(norm.weight, perm, 0)
            _permute_param(norm.bias, perm, 0)
        _permute_linear(layer.self_attn.qkv, f"blocks[{b}].self_attn.qkv", in_perm=perm)
        _permute_linear(layer.self_attn.proj, f"blocks[{b}].self_attn.proj", out_perm=perm)
        _permute_linear(layer.linear1, f"blocks[{b}].linear1", in_perm=perm)
        _permute_linear(layer.linear2, f"blocks[{b}].linear2", out_perm=perm)
    cls = model.classifier
    _permute_param(cls.norm.weight, perm, 0)
    _permute_param(cls.norm.bias, perm, 0)
    if getattr(cls, "attention_pool", None) is not None:
        _permute_linear(cls.attention_pool, "classifier.attention_pool", in_perm=perm)
    _permute_linear(cls.fc, "classifier.fc", in_perm=perm)


def label_order(label_counts: torch.Tensor, method: str = "dominant") -> torch.Tensor:
    """An order of nodes that puts nodes speaking about the same labels next to each other.

    ``label_counts`` (n, K): for a node group measured once, the recognised sets D (bool); for
    the stream, the number of places (after each sub-block, the final stream) at which channel
    n recognises label k. Methods:

    * ``"dominant"``: the dominant label of node n is argmax_k C[n, k] / sum_m C[m, k] (the label
      it is most specialised on relative to its layer; ties: smallest k); sort by dominant
      label, then by signature (the count vector, larger counts first, label 0 most
      significant). Nodes with no label go last.
    * ``"lexicographic"``: sort by the bit signature alone (nodes holding label 0 first, then
      label 1, ...), empty nodes last.
    * ``"identity"``: no reordering.
    """
    C = label_counts.to(torch.float64).cpu()
    n, K = C.shape
    if method == "identity":
        return torch.arange(n)
    empty = (C.sum(1) == 0)
    if method == "dominant":
        col = C.sum(0).clamp_min(1.0)
        spec = C / col
        dominant = torch.where(empty, torch.full((n,), K, dtype=torch.long), spec.argmax(1))
        keys = [(bool(empty[i]), int(dominant[i]), tuple((-C[i]).tolist()), i) for i in range(n)]
    elif method == "lexicographic":
        keys = [(bool(empty[i]), tuple((-(C[i] > 0).double()).tolist()), i) for i in range(n)]
    else:
        raise ValueError(f"unknown order method {method!r}; use 'dominant', 'lexicographic' or 'identity'")
    return torch.tensor([k[-1] for k in sorted(keys)], dtype=torch.long)
