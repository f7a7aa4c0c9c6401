"""Node outputs plus per-label statistics (SCIENCE.md section 6): the ops behind the SNP pass.

``linear_label_stats`` (FF node) and ``attention_label_stats`` (MHA node) return
``(out, sums, counts)``:

    FF:   out[b, t, n]    = act( x[b, t, :] . W[n, :] + bias[n] ),  act = exact-erf GELU or identity
    MHA:  out[b, h, t, :] = softmax_s( q[b, h, t, :] . k[b, h, s, :] / sqrt(d_h) ) v[b, h, s, :]
          (node n = h * d_h + j)
    pooled: sums[k, n]    = sum_{b : labels[b] = k} (1/T) sum_t out[b, t, n]    (K, N) float32
    token:  sums[k, t, n] = sum_{b : labels[b] = k} out[b, t, n]                (K, T, N) float32
    counts[k] = #{b : labels[b] = k}                                           (K,) int64

Backends: ``"triton"`` (``cctk.kernels.label_stats``: the sums are accumulated in the epilogue
of the kernel that computes ``out``; runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``),
``"torch"`` (the ``*_ref`` twins: the plain forward, then an accumulating index_put; pooled: the
token mean reduced to (B, N) first, so the sums cost O(B*N) beyond one extra read of the
outputs), ``"auto"`` (triton on CUDA tensors when Triton imports, torch otherwise).

Both are torch.library ops of namespace ``cctk`` (``cctk::linear_label_stats`` with the torch
twin as its fallback kernel, ``cctk::linear_label_stats_triton`` launching the kernel; the same
for attention) with fake implementations, so they trace under ``torch.compile``. Inputs are
validated before anything is allocated: bad shapes, dtypes, devices, names or labels outside
``[0, K)`` raise and write nothing. No autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cctk._library import define
from cctk.ops.labels import check_labels, label_counts

MODES = ("pooled", "token")
ACTIVATIONS = ("gelu", "none")
BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_MAX_HEAD_DIM = 256   # = cctk.kernels.label_stats.MAX_HEAD_DIM (a head is one tile)


# ----------------------------------------------------------------------------- torch twins

def _per_label_sums(values: torch.Tensor, labels: torch.Tensor, num_labels: int):
    """sums[k, ...] = sum_{b : labels[b] = k} values[b, ...] in fp32, and counts (K,).

    ``values`` may be any strided view (e.g. attention outputs transposed to (B, T, H, d_h)): it is
    read in place, without a contiguous copy. One accumulating ``index_put_`` rather than
    ``index_add_``: on CPU the latter runs one small op per sample, which costs far more than the
    sums themselves when the cores are shared.
    """
    sums = torch.zeros((num_labels,) + tuple(values.shape[1:]), dtype=torch.float32, device=values.device)
    sums.index_put_((labels,), values.to(torch.float32), accumulate=True)
    return sums, label_counts(labels, num_labels)


def linear_label_stats_ref(x, weight, bias, labels, num_labels: int, activation: str = "gelu",
                           mode: str = "pooled"):
    """Plain PyTorch twin of ``linear_label_stats``: ``F.linear`` (+ exact GELU), then the sums
    (pooled: the token mean reduced to (B, d_out) first, so the sums cost O(B*d_out)).

    The GELU is applied in place on the fresh linear output (bitwise the same as ``F.gelu``; no
    autograd here): it saves allocating and first-touching a second (B, T, d_out) buffer."""
    out = F.linear(x, weight, bias)
    if activation == "gelu":
        out = torch.ops.aten.gelu_(out)
    per_sample = out.mean(dim=1, dtype=torch.float32) if mode == "pooled" else out
    sums, counts = _per_label_sums(per_sample, labels, num_labels)
    return out, sums, counts


def attention_label_stats_ref(q, k, v, labels, num_labels: int, mode: str = "pooled"):
    """Plain PyTorch twin of ``attention_label_stats``: ``F.scaled_dot_product_attention`` (scale
    1/sqrt(d_h), no mask), then the sums over nodes n = h * d_h + j."""
    out = F.scaled_dot_product_attention(q, k, v)
    B, H, T, d_head = out.shape
    if mode == "pooled":
        sums, counts = _per_label_sums(out.mean(dim=2, dtype=torch.float32).reshape(B, H * d_head),
                                       labels, num_labels)
    else:
        sums, counts = _per_label_sums(out.transpose(1, 2), labels, num_labels)   # (K, T, H, d_h)
        sums = sums.view(num_labels, T, H * d_head)
    return out, sums, counts


# ----------------------------------------------------------------------------- triton impls

def _linear_label_stats_triton_impl(x, weight, bias, labels, num_labels, activation, mode):
    from cctk.kernels.label_stats import linear_label_stats_forward
    out, sums = linear_label_stats_forward(x, weight, bias, labels, num_labels, activation, mode)
    return out, sums, label_counts(labels, num_labels)


def _attention_label_stats_triton_impl(q, k, v, labels, num_labels, mode):
    from cctk.kernels.label_stats import attention_label_stats_forward
    out, sums = attention_label_stats_forward(q, k, v, labels, num_labels, mode)
    return out, sums, label_counts(labels, num_labels)


# ----------------------------------------------------------------------------- torch.library

_LINEAR_ARGS = ("(Tensor x, Tensor weight, Tensor? bias, Tensor labels, int num_labels, "
                "str activation, str mode) -> (Tensor, Tensor, Tensor)")
_ATTENTION_ARGS = ("(Tensor q, Tensor k, Tensor v, Tensor labels, int num_labels, str mode) "
                   "-> (Tensor, Tensor, Tensor)")

_linear_op = define("linear_label_stats" + _LINEAR_ARGS, linear_label_stats_ref)
_linear_triton_op = define("linear_label_stats_triton" + _LINEAR_ARGS, _linear_label_stats_triton_impl)
_attention_op = define("attention_label_stats" + _ATTENTION_ARGS, attention_label_stats_ref)
_attention_triton_op = define("attention_label_stats_triton" + _ATTENTION_ARGS,
                              _attention_label_stats_triton_impl)


def _stats_fakes(like, labels, num_labels, T, N, mode):
    sums_shape = (num_labels, N) if mode == "pooled" else (num_labels, T, N)
    return (like.new_empty(sums_shape, dtype=torch.float32),
            labels.new_empty((num_labels,), dtype=torch.int64))


def _linear_label_stats_fake(x, weight, bias, labels, num_labels, activation, mode):
    B, T, _ = x.shape
    d_out = weight.shape[0]
    return (x.new_empty((B, T, d_out)),) + _stats_fakes(x, labels, num_labels, T, d_out, mode)


def _attention_label_stats_fake(q, k, v, labels, num_labels, mode):
    B, H, T, d_head = q.shape
    return (q.new_empty((B, H, T, d_head)),) + _stats_fakes(q, labels, num_labels, T, H * d_head, mode)


for _name in ("linear_label_stats", "linear_label_stats_triton"):
    torch.library.register_fake(f"cctk::{_name}")(_linear_label_stats_fake)
for _name in ("attention_label_stats", "attention_label_stats_triton"):
    torch.library.register_fake(f"cctk::{_name}")(_attention_label_stats_fake)


# ----------------------------------------------------------------------------- validation

def _check_float(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point (float32, bfloat16 or float16), got {t.dtype}")


def _check_same(name, t, ref_name, ref):
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; cast them alike")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _resolve_backend(backend: str, like: torch.Tensor) -> str:
    """``"auto"`` -> triton on CUDA tensors of a Triton dtype when Triton imports, else torch;
    ``"triton"`` is checked (dtype, package, device) and refused with the way out."""
    _check_choice("backend", backend, BACKENDS)
    from cctk.kernels import triton_available
    if backend == "auto":
        use_triton = like.is_cuda and like.dtype in TRITON_DTYPES and triton_available()
        return "triton" if use_triton else "torch"
    if backend == "triton":
        if like.dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports float32, bfloat16 and float16; got {like.dtype}")
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton); "
                               "use backend='torch'")
        from cctk.kernels.label_stats import interpreting
        if not like.is_cuda and not interpreting():
            raise RuntimeError(f"backend='triton' runs on CUDA tensors (got {like.device}); on CPU "
                               "set TRITON_INTERPRET=1 before importing triton, or use backend='torch'")
    return backend


# ----------------------------------------------------------------------------- public ops

def linear_label_stats(x, weight, bias, labels, num_labels: int, activation: str = "gelu",
                       mode: str = "pooled", backend: str = "auto"):
    """FF node outputs and their per-label statistics, fused.

    ``x`` (B, T, d_in), ``weight`` (d_out, d_in), ``bias`` (d_out,) or None (same dtype/device),
    ``labels`` (B,) int64 in [0, num_labels). Returns ``(out, sums, counts)``:
    out = act(x W^T + b) (B, T, d_out) in x's dtype, act = exact-erf GELU (``"gelu"``) or identity
    (``"none"``); ``mode="pooled"``: sums[k, n] = sum_{b: labels[b]=k} mean_t out[b, t, n], (K, d_out);
    ``mode="token"``: sums[k, t, n] = sum_{b: labels[b]=k} out[b, t, n], (K, T, d_out); sums fp32;
    counts (K,) int64. ``backend``: ``"auto"``, ``"triton"`` or ``"torch"`` (see module doc).
    """
    _check_float("x", x, 3)
    _check_float("weight", weight, 2)
    B, T, d_in = x.shape
    if weight.shape[1] != d_in:
        raise ValueError(f"weight must be (d_out, d_in={d_in}), got {tuple(weight.shape)}")
    _check_same("weight", weight, "x", x)
    if bias is not None:
        _check_float("bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be (d_out={weight.shape[0]},), got {tuple(bias.shape)}")
        _check_same("bias", bias, "x", x)
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("mode", mode, MODES)
    check_labels(labels, num_labels, batch=B, device=x.device)
    op = _linear_triton_op if _resolve_backend(backend, x) == "triton" else _linear_op
    return op(x, weight, bias, labels, num_labels, activation, mode)


def attention_label_stats(q, k, v, labels, num_labels: int, mode: str = "pooled",
                          backend: str = "auto"):
    """MHA node outputs (flash-style attention) and their per-label statistics, fused.

    ``q``, ``k``, ``v`` (B, H, T, d_h), same dtype/device (Triton: d_h <= 256; ``"auto"`` takes
    the torch twin beyond); ``labels`` (B,) int64 in [0, num_labels). Returns ``(out, sums, counts)``: out = softmax(q k^T / sqrt(d_h)) v
    (B, H, T, d_h); nodes n = h * d_h + j; ``mode="pooled"``: sums (K, H*d_h) of token means,
    ``mode="token"``: sums (K, T, H*d_h); sums fp32; counts (K,) int64.
    """
    _check_float("q", q, 4)
    _check_float("k", k, 4)
    _check_float("v", v, 4)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)} (B, H, T, d_h), "
                             f"got {tuple(t.shape)}")
        _check_same(name, t, "q", q)
    _check_choice("mode", mode, MODES)
    check_labels(labels, num_labels, batch=q.shape[0], device=q.device)
    resolved = _resolve_backend(backend, q)
    if resolved == "triton" and q.shape[-1] > TRITON_MAX_HEAD_DIM:
        if backend == "triton":
            raise ValueError(f"backend='triton' supports head dims d_h <= {TRITON_MAX_HEAD_DIM}, got "
                             f"{q.shape[-1]}; use backend='torch'")
        resolved = "torch"
    op = _attention_triton_op if resolved == "triton" else _attention_op
    return op(q, k, v, labels, num_labels, mode)
