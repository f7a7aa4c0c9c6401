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
* attention through ``cctk.ops.attention`` (the fused CPU kernel; SDPA where it has none): the
  ``fused_attention`` switch of every CCT attention (a model as built runs stock SDPA, so it
  exports and converts as it is);
* in every CCT encoder layer, the GELU and both residual adds as epilogues of the linears
  (``ANDCLinear``: inside the block-sparse kernel; ``nn.Linear``: the plain ops);
* every last-dimension ``nn.LayerNorm`` as ``cctk.nn.LayerNorm`` (same parameters; inference runs
  the ``cctk::layer_norm`` kernel);
* every ``ANDCLinear`` calls its compiled op directly and keeps its weights pre-packed in the
  kernel's layout (``ANDCLinear.prepack``: no packing per call);
* ``compile=True``: ``torch.compile`` of the result (cctk's ops are torch.library ops with fake
  kernels, so the graph has no breaks);
* ``tune=True`` (default, CCT models on the CPU): never a slower path than the best one this CPU has. Every
  part that has equivalent implementations is timed on a sample batch (``sample_input``, default
  32 random images of the model's size) and the fastest kept, once per machine (``cctk.tune``
  caches the choice): per encoder layer, cctk's fused attention or torch's SDPA, and its linears
  through cctk's block-sparse kernel (fused epilogues), as dense GEMMs, or as oneDNN GEMMs with the
  GELU and residual adds as post-ops (``OneDNNLinear``), whichever the layer can hold; the tokenizer fused or not; and for ``dtype`` bfloat16/float16 the whole model in
  that dtype or in fp32 arithmetic on the dtype-rounded weights (outputs cast to ``dtype`` by a
  forward hook; ``_cctk_optimized["tuned"]["compute_dtype"]`` says which): on a
  CPU without bf16 units (AVX2 only) torch's bf16 GEMMs run ~500x slower than fp32. The choices
  are in ``result._cctk_optimized["tuned"]``.

Works on a dense CCT, on a pruned one (``cctk prune`` / ``cctk.prune`` output) and on any
``nn.Module`` (only the parts it recognises are changed; ``ANDCLinear`` everywhere is cast).
"""
from __future__ import annotations

import copy
import hashlib

import torch
import torch.nn as nn

from cctk import _ext
from cctk import tune as tune_mod

from cctk.models.cct import CCT, Attention, Tokenizer, TransformerEncoderLayer
from cctk.nn.andc_linear import ANDCLinear
from cctk.nn.fused import OneDNNLinear
from cctk.nn.fused import onednn_fusion_available as fuse_ok
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


def _prepare(m: nn.Module, dtype: torch.dtype, channels_last: bool, fuse_epilogues: bool,
             fuse_tokenizer: bool) -> nn.Module:
    """The in-place preparation of ``m`` for inference in ``dtype`` (no tuning, no compile)."""
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
        if isinstance(sub, Attention):
            sub.fused_attention = True
        if isinstance(sub, ANDCLinear):
            sub.inference_fast = True
            sub.prepack()
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm and len(child.normalized_shape) == 1:
                setattr(parent, name, LayerNorm.from_torch(child))
    m.register_forward_pre_hook(_CastInput(dtype, channels_last and is_cct))
    m._cctk_optimized = dict(dtype=str(dtype).replace("torch.", ""), channels_last=channels_last,
                             fuse_epilogues=fuse_epilogues, fuse_tokenizer=fuse_tokenizer)
    return m


class _CastOutput:
    """Forward hook: the output in ``dtype``. A model that ``cctk.optimize`` runs in fp32 arithmetic
    on ``dtype``-rounded weights (faster than ``dtype`` arithmetic on this CPU) still answers in
    ``dtype``."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, module, args, output):
        return output.to(self.dtype) if isinstance(output, torch.Tensor) else output


def _sample_for(model: CCT, batch: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, model.in_channels, model.img_size, model.img_size, generator=g)


def _layer_linears(layer: TransformerEncoderLayer):
    """(owner module, attribute name) of the layer's four linears: qkv, proj, linear1, linear2."""
    return [(layer.self_attn, "qkv"), (layer.self_attn, "proj"), (layer, "linear1"), (layer, "linear2")]


def _describe_linear(lin: nn.Module) -> str:
    if isinstance(lin, ANDCLinear):
        digest = hashlib.sha1(lin.mask.cpu().numpy().tobytes()).hexdigest()[:10]
        return f"bsr{lin.block_size}:{lin.in_features}x{lin.out_features}:{lin.nnz}:{digest}"
    return f"dense:{lin.in_features}x{lin.out_features}"


def _swap_linears(layer: TransformerEncoderLayer) -> bool:
    """In place: every ANDCLinear of ``layer`` as a dense nn.Linear (its zero blocks included), or
    every nn.Linear as an all-blocks ANDCLinear (cctk's kernel with the fused epilogues). False
    when the layer has nothing to swap (mixed kinds, or dims that fit no block size)."""
    lins = _layer_linears(layer)
    kinds = {type(getattr(o, n)) for o, n in lins}
    if kinds == {ANDCLinear}:
        for owner, name in lins:
            a = getattr(owner, name)
            dense = nn.Linear(a.in_features, a.out_features, bias=a.bias is not None, dtype=a.values.dtype)
            with torch.no_grad():
                dense.weight.copy_(a.to_dense())
                if a.bias is not None:
                    dense.bias.copy_(a.bias)
            dense.requires_grad_(False)
            setattr(owner, name, dense)
        return True
    if kinds == {nn.Linear} and _ext.available():
        sizes = []
        for owner, name in lins:
            lin = getattr(owner, name)
            B = next((b for b in (32, 16) if lin.in_features % b == 0 and lin.out_features % b == 0), None)
            if B is None or lin.weight.dtype not in (torch.float32, torch.bfloat16):
                return False
            sizes.append(B)
        for (owner, name), B in zip(lins, sizes):
            lin = getattr(owner, name)
            mask = torch.ones(-(-lin.out_features // B), -(-lin.in_features // B), dtype=torch.bool)
            a = ANDCLinear.from_dense(lin, mask, B)
            a.requires_grad_(False)
            a.inference_fast = True
            a.prepack()
            setattr(owner, name, a)
        return True
    return False


def _onednn_linears(layer: TransformerEncoderLayer, dtype: torch.dtype) -> bool:
    """In place: every nn.Linear of ``layer`` as a OneDNNLinear (GELU and residual adds as oneDNN
    post-ops of the GEMMs). False when the layer has none or oneDNN cannot run ``dtype`` here."""
    if not fuse_ok(dtype):
        return False
    lins = _layer_linears(layer)
    if not all(type(getattr(o, n)) is nn.Linear for o, n in lins):
        return False
    for owner, name in lins:
        setattr(owner, name, OneDNNLinear.from_linear(getattr(owner, name)))
    return True


def _time_candidates(kind: str, signature: str, modules: dict, arg: torch.Tensor) -> str:
    calls = {name: (lambda mod=mod: mod(arg)) for name, mod in modules.items()}
    return tune_mod.choose(kind, signature, calls)


def _tune_cct(m: CCT, sample: torch.Tensor) -> dict:
    """Per part of an optimized CCT, the fastest equivalent implementation on this machine (in place)."""
    blocks = m.classifier.blocks
    inputs: dict = {}
    hooks = [blk.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
             for i, blk in enumerate(blocks)]
    hooks.append(m.tokenizer.register_forward_pre_hook(lambda mod, args: inputs.__setitem__("tokenizer", args[0])))
    try:
        with torch.no_grad():
            m(sample)
    finally:
        for h in hooks:
            h.remove()
    chosen = {"blocks": []}
    dtype = next(m.parameters()).dtype
    for i, blk in enumerate(blocks):
        src = inputs[i]
        variants = {"as-built": blk}
        if blk.self_attn.fused_attention and _ext.avx512_kernels():
            v = copy.deepcopy(blk)
            v.self_attn.fused_attention = False
            variants["sdpa"] = v
        for change, suffix in ((_swap_linears, "swapped-linears"),
                               (lambda layer: _onednn_linears(layer, dtype), "onednn-epilogues")):
            for name in list(variants):
                v = copy.deepcopy(variants[name])
                if change(v):
                    variants[("" if name == "as-built" else name + "+") + suffix] = v
        sig = (f"encoder-layer d={blk.self_attn.qkv.in_features} heads={blk.self_attn.num_heads} "
               f"linears={','.join(_describe_linear(getattr(o, n)) for o, n in _layer_linears(blk))} "
               f"attention={'fused' if blk.self_attn.fused_attention else 'sdpa'} "
               f"epilogues={blk.fused_epilogues} {str(dtype).replace('torch.', '')} x={tuple(src.shape)}")
        pick = _time_candidates("encoder-layer", sig, variants, src)
        blocks[i] = variants[pick]
        chosen["blocks"].append(pick)
    tok = m.tokenizer
    if tok.fused and tok.fused_stages() is not None:
        plain = copy.deepcopy(tok)
        plain.fused = False
        x = inputs["tokenizer"]
        sig = f"tokenizer {tok._geometry} {tuple(tok.conv_layers[0][0].weight.shape)} {str(dtype)} x={tuple(x.shape)}"
        pick = _time_candidates("tokenizer", sig, {"fused": tok, "unfused": plain}, x)
        if pick == "unfused":
            m.tokenizer = plain
        chosen["tokenizer"] = pick
    return chosen


def optimize(model: nn.Module, dtype: torch.dtype = torch.bfloat16, *, compile: bool = False,
             channels_last: bool = True, fuse_epilogues: bool = True, fuse_tokenizer: bool = True,
             inplace: bool = False, tune: bool = True, sample_input: torch.Tensor | None = None) -> nn.Module:
    """Return ``model`` prepared for fast inference in ``dtype`` (see the module doc).

    ``inplace=False`` (default) works on a deep copy. ``compile=True`` returns
    ``torch.compile(model)`` (the optimized module stays reachable as ``._orig_mod``). The result
    is a frozen inference model: to change its weights, change the original and optimize again
    (eager results notice an in-place change of pre-packed weights and repack on the fly; a
    compiled graph keeps the pack it was traced with). ``tune`` (CCT models): time the equivalent
    implementations of each part on ``sample_input`` (give a batch of the size you serve; default
    32 random images) and keep the fastest, remembered per machine (``cctk.tune``; ``CCTK_TUNE=0``
    takes the defaults without measuring).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"cctk.optimize expects an nn.Module, got {type(model).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(str(d) for d in FLOAT_DTYPES)}, got {dtype!r}")
    if getattr(model, "_cctk_optimized", None) is not None:
        raise ValueError("this model was already returned by cctk.optimize; optimize the original model "
                         "(or pass inplace=False on the original) instead of optimizing twice")
    is_cct = isinstance(model, CCT)
    first = next(model.parameters(), None)
    # the choices are between CPU kernels (a model on a GPU keeps its defaults)
    on_cpu = first is None or first.device.type == "cpu"
    do_tune = bool(tune) and is_cct and on_cpu and tune_mod.enabled()
    if sample_input is not None:
        if not isinstance(sample_input, torch.Tensor) or not sample_input.is_floating_point():
            raise TypeError("sample_input must be a floating-point tensor batch of the model's input")
        if is_cct:
            model.check_input(sample_input)
    low_precision = dtype in (torch.bfloat16, torch.float16)
    # fp32 arithmetic on the dtype-rounded weights: a candidate where dtype arithmetic is slow
    rounded = None
    if do_tune and low_precision and first is not None:
        rounded = copy.deepcopy(model).to(dtype).to(torch.float32)
    m = _prepare(model if inplace else copy.deepcopy(model), dtype, channels_last, fuse_epilogues, fuse_tokenizer)
    if do_tune:
        sample = sample_input if sample_input is not None else _sample_for(model)
        tuned = {}
        if rounded is not None:
            alt = _prepare(rounded, torch.float32, channels_last, fuse_epilogues, fuse_tokenizer)
            alt.register_forward_hook(_CastOutput(dtype))
            sig = (f"model {model.name if is_cct else type(model).__name__} params={sum(p.numel() for p in model.parameters())} "
                   f"{_describe_model_linears(model)} {str(dtype)} x={tuple(sample.shape)}")
            small = sample[: max(1, sample.shape[0] // 8)]
            native = str(dtype).replace("torch.", "")
            pick = tune_mod.choose("compute-dtype", sig, {native: lambda: m(sample), "float32": lambda: alt(sample)},
                                   probes={native: lambda: m(small), "float32": lambda: alt(small)})
            tuned["compute_dtype"] = "float32" if pick == "float32" else str(dtype).replace("torch.", "")
            if pick == "float32":
                alt._cctk_optimized["dtype"] = str(dtype).replace("torch.", "")
                m = alt
        tuned.update(_tune_cct(m, sample))
        m._cctk_optimized["tuned"] = tuned
    m._cctk_optimized["compile"] = compile
    if compile:
        return torch.compile(m, dynamic=False, fullgraph=True)
    return m


def _describe_model_linears(model: nn.Module) -> str:
    return ";".join(_describe_linear(mod) for mod in model.modules() if isinstance(mod, (ANDCLinear, nn.Linear)))
