"""Block-sparse linear layer ops (``cctk::bsr_linear`` and its two backward ops).

A weight ``W`` (out_features, in_features) is cut into square B x B blocks; only the kept blocks
are stored, in block-row compressed (BSR) layout:

* ``values`` (nnz, B, B): ``values[i][a, b] = W[r*B + a, c*B + b]`` for the i-th kept block at
  block-row ``r`` (``crow[r] <= i < crow[r+1]``) and block-col ``c = col[i]``; partial edge
  blocks are zero-padded beyond out_features / in_features.
* ``crow_indices`` int32 (n_block_rows + 1), ``col_indices`` int32 (nnz), ascending in a row.
* the transposed index for the input gradient (:func:`bsr_transpose_index`): ``ccol_indices``
  int32 (n_block_cols + 1), ``row_indices`` int32 (nnz, ascending within a block-col) and
  ``block_perm`` int32 (nnz, position in ``values`` of each entry).

Ops (schemas below; kernels: C++ ``csrc/cpu/bsr_linear_cpu.cpp``, CUDA
``csrc/cuda/bsr_linear_cuda.cu``, Triton ``cctk.kernels.bsr_linear``, reference ``*_ref``):

    bsr_linear(x, values, crow, col, bias, out_features)               = x @ W^T + bias
    bsr_linear_backward_input(grad_out, values, ccol, row, perm, in_f) = grad_out @ W
    bsr_linear_backward_weight(grad_out, x, crow, col, B)[i]          = (grad_out^T x) on block i

``cctk::bsr_linear`` is differentiable (``torch.library.register_autograd``): gradients flow to
x, to the kept blocks only (pruned weights stay pruned), and to the bias.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cctk import _ext
from cctk._library import define

SUPPORTED_BLOCK_SIZES = (16, 32, 64)
EPILOGUE_ACTIVATIONS = ("none", "gelu")
BACKENDS = ("auto", "ext", "triton", "torch")


# ---------------------------------------------------------------------------------------------
# Layout helpers (pure PyTorch, static output shapes so they also trace under torch.compile)

def _entry_block_rows(crow: torch.Tensor, nnz: int) -> torch.Tensor:
    """Block-row of each stored entry: r with crow[r] <= e < crow[r+1] (int64, (nnz,))."""
    e = torch.arange(nnz, device=crow.device, dtype=torch.int64)
    return torch.searchsorted(crow[1:].to(torch.int64).contiguous(), e, right=True)


def bsr_transpose_index(crow_indices: torch.Tensor, col_indices: torch.Tensor, n_block_cols: int):
    """Transposed (block-col compressed) index of a BSR layout.

    Returns ``(ccol_indices, row_indices, block_perm)``, all int32: the entries of block-col
    ``c`` are ``ccol[c] <= j < ccol[c+1]``, at block-row ``row[j]`` (ascending), stored at
    ``values[perm[j]]``.
    """
    nnz = col_indices.shape[0]
    n_block_rows = crow_indices.shape[0] - 1
    rows = _entry_block_rows(crow_indices, nnz)
    cols = col_indices.to(torch.int64)
    perm = torch.argsort(cols * max(n_block_rows, 1) + rows, stable=True)
    cols_sorted = cols[perm].contiguous()
    boundaries = torch.arange(n_block_cols + 1, device=cols.device, dtype=torch.int64)
    ccol = torch.searchsorted(cols_sorted, boundaries, right=False)
    return ccol.to(torch.int32), rows[perm].to(torch.int32), perm.to(torch.int32)


def _check_mask(block_mask: torch.Tensor, out_features: int, in_features: int, block_size: int):
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask must be a torch.Tensor of bools, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be a bool tensor, got {block_mask.dtype}")
    want = (math.ceil(out_features / block_size), math.ceil(in_features / block_size))
    if tuple(block_mask.shape) != want:
        raise ValueError(f"block_mask must have shape (ceil(out/B), ceil(in/B)) = {want} for a "
                         f"{out_features}x{in_features} weight with B={block_size}, got {tuple(block_mask.shape)}")


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    return block_size


def _pad_to_blocks(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def dense_to_bsr(weight: torch.Tensor, block_mask: torch.Tensor, block_size: int):
    """Keep the blocks of ``weight`` (out, in) where ``block_mask`` (ceil(out/B), ceil(in/B)) is
    True: returns ``(values (nnz, B, B), crow_indices int32, col_indices int32)``; partial edge
    blocks are zero-padded."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    B = block_size
    out_f, in_f = weight.shape
    _check_mask(block_mask, out_f, in_f, B)
    mask = block_mask.to(weight.device)
    nbr, nbc = mask.shape
    blocks = _pad_to_blocks(weight, nbr * B, nbc * B).reshape(nbr, B, nbc, B).permute(0, 2, 1, 3)
    values = blocks[mask].contiguous()
    counts = mask.sum(dim=1, dtype=torch.int64)
    crow = torch.zeros(nbr + 1, dtype=torch.int32, device=weight.device)
    crow[1:] = torch.cumsum(counts, 0).to(torch.int32)
    col = mask.nonzero()[:, 1].to(torch.int32).contiguous()
    return values, crow, col


def _blocks_to_dense(values, rows, cols, nbr, nbc, out_features, in_features):
    B = values.shape[-1]
    dense = values.new_zeros(nbr * nbc, B, B)
    dense = dense.index_put((rows * nbc + cols,), values)
    dense = dense.reshape(nbr, nbc, B, B).permute(0, 2, 1, 3).reshape(nbr * B, nbc * B)
    return dense[:out_features, :in_features]


def bsr_to_dense(values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                 out_features: int, in_features: int) -> torch.Tensor:
    """The dense weight (out_features, in_features) of a BSR layout (pruned blocks are zero)."""
    B = values.shape[-1]
    nbr, nbc = math.ceil(out_features / B), math.ceil(in_features / B)
    rows = _entry_block_rows(crow_indices, col_indices.shape[0])
    return _blocks_to_dense(values, rows, col_indices.to(torch.int64), nbr, nbc, out_features, in_features)


# ---------------------------------------------------------------------------------------------
# Reference twins (exact: dense expand + matmul)

def bsr_linear_ref(x, values, crow_indices, col_indices, bias, out_features):
    """``x @ W^T + bias`` with W expanded from the kept blocks (zero elsewhere)."""
    W = bsr_to_dense(values, crow_indices, col_indices, out_features, x.shape[-1])
    return F.linear(x, W, bias)


def bsr_linear_backward_input_ref(grad_out, values, ccol_indices, row_indices, block_perm, in_features):
    """``grad_out @ W`` with W rebuilt from the transposed index."""
    B = values.shape[-1]
    out_features = grad_out.shape[-1]
    nbr, nbc = math.ceil(out_features / B), math.ceil(in_features / B)
    nnz = row_indices.shape[0]
    cols = _entry_block_rows(ccol_indices, nnz)  # block-col of each transposed entry
    W = _blocks_to_dense(values[block_perm.to(torch.int64)], row_indices.to(torch.int64), cols, nbr, nbc,
                         out_features, in_features)
    return grad_out.matmul(W)


def bsr_linear_backward_weight_ref(grad_out, x, crow_indices, col_indices, block_size):
    """Per kept block i at (r, c): ``grad_out[:, rB:(r+1)B]^T @ x[:, cB:(c+1)B]`` (zero-padded)."""
    B = block_size
    nbr, nbc = math.ceil(grad_out.shape[1] / B), math.ceil(x.shape[1] / B)
    acc = torch.promote_types(x.dtype, torch.float32)
    G = _pad_to_blocks(grad_out.to(acc), grad_out.shape[0], nbr * B).t() @ _pad_to_blocks(x.to(acc), x.shape[0], nbc * B)
    G = G.reshape(nbr, B, nbc, B).permute(0, 2, 1, 3)
    rows = _entry_block_rows(crow_indices, col_indices.shape[0])
    return G[rows, col_indices.to(torch.int64)].to(x.dtype).contiguous()


_op_forward = define("bsr_linear(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
                     "Tensor? bias, int out_features) -> Tensor", bsr_linear_ref)
_op_backward_input = define("bsr_linear_backward_input(Tensor grad_out, Tensor values, Tensor ccol_indices, "
                            "Tensor row_indices, Tensor block_perm, int in_features) -> Tensor",
                            bsr_linear_backward_input_ref)
_op_backward_weight = define("bsr_linear_backward_weight(Tensor grad_out, Tensor x, Tensor crow_indices, "
                             "Tensor col_indices, int block_size) -> Tensor", bsr_linear_backward_weight_ref)


def bsr_linear_epilogue_ref(x, values, crow_indices, col_indices, bias, out_features, activation, residual,
                            packed=None):
    """``GELU?(x @ W^T + bias) (+ residual)``: the reference of the fused-epilogue forward
    (``packed``, the kernel's own copy of the weights, is not needed here)."""
    if activation not in EPILOGUE_ACTIVATIONS:
        raise ValueError(f"activation must be one of {EPILOGUE_ACTIVATIONS}, got {activation!r}")
    return _apply_epilogue(bsr_linear_ref(x, values, crow_indices, col_indices, bias, out_features), activation,
                           residual)


def _apply_epilogue(y: torch.Tensor, activation: str, residual: torch.Tensor | None) -> torch.Tensor:
    """The epilogue as separate (differentiable) ops: GELU if asked, then + residual."""
    if activation == "gelu":
        y = F.gelu(y)
    return y if residual is None else y + residual


_op_epilogue = define("bsr_linear_epilogue(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
                      "Tensor? bias, int out_features, str activation, Tensor? residual, Tensor? packed=None) -> Tensor",
                      bsr_linear_epilogue_ref)


@torch.library.register_fake("cctk::bsr_linear_epilogue")
def _bsr_linear_epilogue_fake(x, values, crow_indices, col_indices, bias, out_features, activation, residual,
                              packed=None):
    torch._check(x.dim() == 2, lambda: "cctk::bsr_linear_epilogue: x must be 2-D")
    return x.new_empty((x.shape[0], out_features))


def bsr_pack_ref(values: torch.Tensor) -> torch.Tensor:
    """The forward weights in the CPU kernel's layout: bf16 -> int32 (nnz, B/2, B), entry
    [e, p, o] = (W^T[2p, o] low half, W^T[2p+1, o] high half) of block e; fp32 -> (nnz, B, B)
    holding W^T of each block; other dtypes -> empty (the kernels pack on the fly)."""
    if values.dtype == torch.bfloat16:
        wt = values.transpose(1, 2).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF  # (nnz, k, o)
        return (wt[:, 0::2] | (wt[:, 1::2] << 16)).contiguous()
    if values.dtype == torch.float32:
        return values.transpose(1, 2).contiguous()
    return values.new_empty(0, dtype=torch.float32)


_op_pack = define("bsr_pack(Tensor values) -> Tensor", bsr_pack_ref)


@torch.library.register_fake("cctk::bsr_pack")
def _bsr_pack_fake(values):
    n, B = values.shape[0], values.shape[-1]
    if values.dtype == torch.bfloat16:
        return values.new_empty((n, B // 2, B), dtype=torch.int32)
    if values.dtype == torch.float32:
        return values.new_empty((n, B, B))
    return values.new_empty(0, dtype=torch.float32)


@torch.library.register_fake("cctk::bsr_linear")
def _bsr_linear_fake(x, values, crow_indices, col_indices, bias, out_features):
    torch._check(x.dim() == 2, lambda: "cctk::bsr_linear: x must be 2-D")
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("cctk::bsr_linear_backward_input")
def _bsr_linear_backward_input_fake(grad_out, values, ccol_indices, row_indices, block_perm, in_features):
    return grad_out.new_empty((grad_out.shape[0], in_features))


@torch.library.register_fake("cctk::bsr_linear_backward_weight")
def _bsr_linear_backward_weight_fake(grad_out, x, crow_indices, col_indices, block_size):
    return x.new_empty((col_indices.shape[0], block_size, block_size))


def _setup_context(ctx, inputs, output):
    x, values, crow_indices, col_indices, bias, out_features = inputs
    ctx.save_for_backward(x, values, crow_indices, col_indices)
    ctx.has_bias = bias is not None


def _refuse_double_backward(where: str):
    # The backward kernels have no autograd of their own: differentiating them again would give
    # silent zeros (gradient penalties, Hessian-vector products). With create_graph=True grad
    # mode is on inside backward.
    if torch.is_grad_enabled():
        raise RuntimeError(f"{where}: double backward (create_graph=True) is not supported by the compiled and "
                           "Triton kernels; use backend='torch' (ANDCLinear: layer.backend = 'torch') for "
                           "higher-order gradients")


def _backward(ctx, grad_out):
    _refuse_double_backward("cctk::bsr_linear")
    x, values, crow_indices, col_indices = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    B = values.shape[-1]
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        n_block_cols = (x.shape[1] + B - 1) // B
        ccol, row, perm = bsr_transpose_index(crow_indices, col_indices, n_block_cols)
        grad_x = _op_backward_input(grad_out, values, ccol, row, perm, x.shape[1])
    if ctx.needs_input_grad[1]:
        grad_values = _op_backward_weight(grad_out, x, crow_indices, col_indices, B)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad_out.sum(0)
    return grad_x, grad_values, None, None, grad_bias, None


torch.library.register_autograd("cctk::bsr_linear", _backward, setup_context=_setup_context)


def _epilogue_backward(ctx, grad_out):
    raise RuntimeError("cctk::bsr_linear_epilogue is forward-only (inference); call "
                       "cctk.ops.bsr_linear_epilogue, which runs the differentiable ops when gradients are needed")


torch.library.register_autograd("cctk::bsr_linear_epilogue", _epilogue_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------------------------
# Python entry point

def check_bsr_inputs(x, values, crow_indices, col_indices, bias, out_features):
    """Validate the operands of :func:`bsr_linear` (shapes, dtypes, devices); raises before any work."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor (..., in_features), got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if not isinstance(values, torch.Tensor) or values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"values must be (nnz, B, B), got {getattr(values, 'shape', type(values))}")
    if values.dtype != x.dtype:
        raise TypeError(f"x dtype {x.dtype} differs from the weight dtype {values.dtype}; cast one of them "
                        f"(e.g. module.to({x.dtype}))")
    for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int32 tensor, got "
                            f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    tensors = [("values", values), ("crow_indices", crow_indices), ("col_indices", col_indices)]
    if bias is not None:
        tensors.append(("bias", bias))
    for name, t in tensors:
        if t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}; move them to one device")
    if not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"out_features must be a positive int, got {out_features!r}")
    B = values.shape[1]
    nbr = math.ceil(out_features / B)
    if crow_indices.shape[0] != nbr + 1:
        raise ValueError(f"crow_indices must have ceil(out_features/B)+1 = {nbr + 1} entries, got "
                         f"{crow_indices.shape[0]}")
    if col_indices.shape[0] != values.shape[0]:
        raise ValueError(f"col_indices has {col_indices.shape[0]} entries but values holds {values.shape[0]} blocks")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != out_features:
            raise ValueError(f"bias must be ({out_features},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")


def check_bsr_index(crow_indices: torch.Tensor, col_indices: torch.Tensor, n_block_cols: int) -> None:
    """The compressed index is well formed: crow starts at 0, ends at nnz and never decreases;
    every col is in [0, n_block_cols). The compiled kernels check the same before any work;
    this is the check of the other backends (on a GPU an asynchronous device-side assert, so
    it never waits for the device)."""
    nnz = col_indices.shape[0]
    if crow_indices.numel() == 0:
        return
    ok_ends = (crow_indices[0] == 0) & (crow_indices[-1] == nnz)
    ok_mono = (crow_indices[1:] >= crow_indices[:-1]).all()
    ok_cols = ((col_indices >= 0) & (col_indices < n_block_cols)).all() if nnz else ok_ends
    msg = (f"bsr_linear: malformed block index (crow must run from 0 to nnz={nnz} without decreasing; "
           f"col_indices must lie in [0, {n_block_cols}))")
    if crow_indices.device.type == "cpu":
        if not bool(ok_ends & ok_mono & ok_cols):
            raise ValueError(msg)
    else:
        torch._assert_async(ok_ends & ok_mono & ok_cols, msg)


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if _ext.supports(device):
            return "ext"
        if device.type == "cuda" and _triton_kernel() is not None:
            return "triton"
        return "torch"
    if backend == "ext" and not _ext.supports(device):
        raise RuntimeError(f"cctk's compiled extension has no bsr_linear kernel for {device}; "
                           f"{_ext.REINSTALL_HINT}, or use backend='torch'")
    if backend == "triton" and _triton_kernel() is None:
        raise RuntimeError("backend='triton' needs triton and cctk.kernels.bsr_linear.bsr_linear_triton "
                           f"(import failed: {_TRITON['error']}); use backend='ext' or 'torch'")
    return backend


_TRITON = {"fn": None, "error": None, "tried": False}


def _triton_kernel():
    """cctk.kernels.bsr_linear.bsr_linear_triton, imported lazily (None if unavailable)."""
    if not _TRITON["tried"]:
        _TRITON["tried"] = True
        try:
            from cctk.kernels.bsr_linear import bsr_linear_triton
            _TRITON["fn"] = bsr_linear_triton
        except Exception as e:  # triton missing, or the kernel module absent
            _TRITON["error"] = f"{type(e).__name__}: {e}"
    return _TRITON["fn"]


class _BsrLinearTriton(torch.autograd.Function):
    """Autograd over the three Triton kernels (cctk.kernels.bsr_linear)."""

    @staticmethod
    def forward(ctx, x, values, crow_indices, col_indices, ccol_indices, row_indices, block_perm, bias,
                out_features):
        from cctk.kernels import bsr_linear as tk
        ctx.save_for_backward(x, values, crow_indices, col_indices, ccol_indices, row_indices, block_perm)
        ctx.has_bias = bias is not None
        return tk.bsr_linear_triton(x, values, crow_indices, col_indices, bias, out_features)

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward("bsr_linear (triton)")
        from cctk.kernels import bsr_linear as tk
        x, values, crow, col, ccol, row, perm = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = tk.bsr_linear_backward_input_triton(grad_out, values, ccol, row, perm, x.shape[1])
        if ctx.needs_input_grad[1]:
            grad_values = tk.bsr_linear_backward_weight_triton(grad_out, x, crow, col, values.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[7]:
            grad_bias = grad_out.sum(0)
        return grad_x, grad_values, None, None, None, None, None, grad_bias, None


def bsr_linear_epilogue(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                        col_indices: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                        activation: str = "none", residual: torch.Tensor | None = None,
                        backend: str = "auto", transposed_index: tuple | None = None) -> torch.Tensor:
    """``act(x @ W^T + bias) + residual`` with ``act`` in ``{"none", "gelu"}`` (exact erf GELU).

    The compiled CPU kernel applies the activation and adds the residual to each output tile
    while it is in registers (one pass over the output instead of three). Gradients: when
    autograd needs them, the unfused differentiable ops run instead (same function).
    """
    if activation not in EPILOGUE_ACTIVATIONS:
        raise ValueError(f"activation must be one of {EPILOGUE_ACTIVATIONS}, got {activation!r}")
    check_bsr_inputs(x, values, crow_indices, col_indices, bias, out_features)
    want = x.shape[:-1] + (out_features,)
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != want:
            raise ValueError(f"residual must have the output's shape {tuple(want)}, got "
                             f"{tuple(getattr(residual, 'shape', ())) or type(residual).__name__}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise TypeError(f"residual must be {x.dtype} on {x.device}, got {residual.dtype} on {residual.device}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, values, bias, residual))
    resolved = _resolve_backend(backend, x.device)
    if needs_grad or resolved != "ext" or x.device.type != "cpu":  # the fused epilogue is a CPU kernel
        y = bsr_linear(x, values, crow_indices, col_indices, bias, out_features, backend=resolved,
                       transposed_index=transposed_index)
        return _apply_epilogue(y, activation, residual)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    r2 = None if residual is None else residual.reshape(-1, out_features)
    y = _op_epilogue(x2, values, crow_indices, col_indices, bias, out_features, activation, r2)
    return y.reshape(want)


def bsr_linear(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
               bias: torch.Tensor | None, out_features: int, backend: str = "auto",
               transposed_index: tuple | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for a block-sparse W in BSR layout; x of any leading shape ``(..., in)``.

    ``backend``: ``"auto"`` (compiled kernel where the extension supports x's device, else the
    Triton kernel on CUDA, else the reference), ``"ext"`` (the ``cctk::bsr_linear`` op),
    ``"triton"``, ``"torch"`` (reference). Differentiable in x, values (kept blocks only) and
    bias. ``transposed_index``: ``(ccol, row, perm)`` from :func:`bsr_transpose_index`, if the
    caller keeps it (the Triton backward reads it; computed on the fly otherwise).
    """
    check_bsr_inputs(x, values, crow_indices, col_indices, bias, out_features)
    backend = _resolve_backend(backend, x.device)
    if backend != "ext" and not torch.compiler.is_compiling():  # the compiled kernels check it themselves
        check_bsr_index(crow_indices, col_indices, math.ceil(x.shape[-1] / values.shape[-1]))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if backend == "torch":
        y = bsr_linear_ref(x2, values, crow_indices, col_indices, bias, out_features)
    elif backend == "triton":
        if transposed_index is None:
            n_block_cols = math.ceil(x.shape[-1] / values.shape[-1])
            transposed_index = bsr_transpose_index(crow_indices, col_indices, n_block_cols)
        y = _BsrLinearTriton.apply(x2.contiguous(), values, crow_indices, col_indices, *transposed_index, bias,
                                   out_features)
    else:
        y = _op_forward(x2.contiguous(), values, crow_indices, col_indices, bias, out_features)
    return y.reshape(*lead, out_features)
