"""``cctk.optimize``: turn a trained (dense or pruned) model into its fastest inference form.

Modelled on ``ipex.optimize``::

    fast = cctk.optimize(model, dtype=torch.bfloat16)        # a new model; `model` is untouched
    with torch.no_grad():
        logits = fast(images)                                 # fp32 images are cast on entry

What it does (each step keeps the function; outputs equal the input model's within the dtype's
rounding):

* eval mode, parameters frozen (``requires_grad=False``: no autograd bookkeeping), weights and
  buffers in ``dtype``, inputs cast to ``dtype`` by a forward pre-hook;
* the convolutional tokenizer in channels-last memory: conv -> ReLU -> max-pool run on NHWC,
  where torch's CPU max-pool is ~10x faster than on NCHW, and the flatten to (B, T, d) tokens
  becomes a free view; each stage's ReLU moves after its max-pool (exact: max commutes with a
  non-decreasing function, and the pool's padding is -inf), so it touches 4x fewer values; on
  the CPU each stage runs as one ``cctk::conv_relu_maxpool`` pass that never writes the
  full-resolution feature map (``fuse_tokenizer``);
* attention through ``cctk.ops.attention`` (the fused CPU kernel; SDPA where it has none) -- the
  model's inference path does this by itself when autograd is off;
* in every CCT encoder layer, the GELU and both residual adds as epilogues of the linears
  (``ANDCLinear``: inside the block-sparse kernel; ``nn.Linear``: the plain ops);
* every last-dimension ``nn.LayerNorm`` as ``cctk.nn.LayerNorm`` (same parameters; inference runs
  the ``cctk::layer_norm`` kernel);
* every ``ANDCLinear`` calls its compiled op directly and keeps its weights pre-packed in the
  kernel's layout (``ANDCLinear.prepack``: no packing per call);
* ``compile=True``: ``torch.compile`` of the result (cctk's ops are torch.library ops with fake
  kernels, so the graph has no breaks).

Works on a dense CCT, on a pruned one (``cctk prune`` / ``cctk.prune`` output) and on any
``nn.Module`` (only the parts it recognises are changed; ``ANDCLinear`` everywhere is cast).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from cctk.models.cct import CCT, Tokenizer, TransformerEncoderLayer
from cctk.nn.andc_linear import ANDCLinear
from cctk.nn.layer_norm import LayerNorm

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class _CastInput:
    """Forward pre-hook: cast the first positional input to ``dtype`` (channels-last for images)."""

    def __init__(self, dtype: torch.dtype, channels_last: bool):
        self.dtype = dtype
        self.channels_last = channels_last

    def __call__(self, module, args):
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None
        x = args[0]
        if self.channels_last and x.dim() == 4:
            x = x.to(dtype=self.dtype, memory_format=torch.channels_last)
        else:
            x = x.to(self.dtype)
        return (x,) + tuple(args[1:])


def _relu_after_pool(tokenizer: Tokenizer) -> None:
    """conv -> ReLU -> MaxPool  becomes  conv -> MaxPool -> ReLU in every tokenizer stage (same values)."""
    for stage in tokenizer.conv_layers:
        if (isinstance(stage, nn.Sequential) and len(stage) == 3 and isinstance(stage[1], nn.ReLU)
                and isinstance(stage[2], nn.MaxPool2d)):
            relu, pool = stage[1], stage[2]
            stage[1], stage[2] = pool, relu


def optimize(model: nn.Module, dtype: torch.dtype = torch.bfloat16, *, compile: bool = False,
             channels_last: bool = True, fuse_epilogues: bool = True, fuse_tokenizer: bool = True,
             inplace: bool = False) -> nn.Module:
    """Return ``model`` prepared for fast inference in ``dtype`` (see the module doc).

    ``inplace=False`` (default) works on a deep copy. ``compile=True`` returns
    ``torch.compile(model)`` (the optimized module stays reachable as ``._orig_mod``). The result
    is a frozen inference model: to change its weights, change the original and optimize again
    (eager results notice an in-place change of pre-packed weights and repack on the fly; a
    compiled graph keeps the pack it was traced with).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"cctk.optimize expects an nn.Module, got {type(model).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(str(d) for d in FLOAT_DTYPES)}, got {dtype!r}")
    if getattr(model, "_cctk_optimized", None) is not None:
        raise ValueError("this model was already returned by cctk.optimize; optimize the original model "
                         "(or pass inplace=False on the original) instead of optimizing twice")
    m = model if inplace else copy.deepcopy(model)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    m.to(dtype)
    is_cct = isinstance(m, CCT)
    for sub in m.modules():
        if isinstance(sub, Tokenizer):
            _relu_after_pool(sub)
            sub.fused = fuse_tokenizer
            if channels_last:
                sub.to(memory_format=torch.channels_last)
        if isinstance(sub, TransformerEncoderLayer):
            sub.fused_epilogues = fuse_epilogues
        if isinstance(sub, ANDCLinear):
            sub.inference_fast = True
            sub.prepack()
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm and len(child.normalized_shape) == 1:
                setattr(parent, name, LayerNorm.from_torch(child))
    m.register_forward_pre_hook(_CastInput(dtype, channels_last and is_cct))
    m._cctk_optimized = dict(dtype=str(dtype).replace("torch.", ""), channels_last=channels_last,
                             fuse_epilogues=fuse_epilogues, fuse_tokenizer=fuse_tokenizer, compile=compile)
    if compile:
        return torch.compile(m, dynamic=False, fullgraph=True)
    return m
