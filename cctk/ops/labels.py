"""``label_sum``: per-label sums of rows, the reduction behind every SNP statistic.

    sums[k, n]  = sum_{b : labels[b] = k} x[b, n]      (float32, whatever x's dtype)
    counts[k]   = #{b : labels[b] = k}                 (int64)

Kernels: C++ (``csrc/cpu/label_sum_cpu.cpp``, OpenMP over columns), CUDA
(``csrc/cuda/label_sum_cuda.cu``), and the PyTorch reference ``label_sum_ref`` (index_add).
Labels outside ``[0, num_labels)`` never write anything: on the CPU they raise a ``ValueError``
at once; on a GPU the check runs on the device (``torch._assert_async``, no host sync, so the ops
can be captured in a CUDA graph) and a bad label stops the stream with a device-side assert
before any kernel after it runs.
"""
from __future__ import annotations

import torch

from cctk import _ext
from cctk._library import define


def label_sum_ref(x: torch.Tensor, labels: torch.Tensor, num_labels: int):
    """Plain PyTorch twin: index_add in float32."""
    sums = torch.zeros(num_labels, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, labels, x.float())
    return sums, label_counts(labels, num_labels)


def label_counts(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """counts[k] = #{b : labels[b] = k}, int64 (K,), for labels already checked to lie in [0, K).

    ``index_add_`` rather than ``torch.bincount``: bincount sizes its output from ``labels.max()``,
    a host sync on a GPU that also breaks CUDA-graph capture."""
    counts = torch.zeros(num_labels, dtype=torch.int64, device=labels.device)
    return counts.index_add_(0, labels, torch.ones_like(labels))


_op = define("label_sum(Tensor x, Tensor labels, int num_labels) -> (Tensor, Tensor)", label_sum_ref)


@torch.library.register_fake("cctk::label_sum")
def _label_sum_fake(x, labels, num_labels):
    return (x.new_empty((num_labels, x.shape[1]), dtype=torch.float32),
            labels.new_empty((num_labels,), dtype=torch.int64))


def check_labels(labels: torch.Tensor, num_labels: int, batch: int | None = None, device=None):
    """Validate a label vector: int64, 1-D, the batch's length and device, values in [0, K).

    The values are checked without a host sync: on the CPU a ``ValueError`` names the range found;
    on any other device ``torch._assert_async`` checks them on the device, in stream order, so a
    bad label fails the stream (a device-side assert) before the kernels that would use it."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 (torch.long), got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (batch,), got shape {tuple(labels.shape)}")
    if batch is not None and labels.shape[0] != batch:
        raise ValueError(f"labels has {labels.shape[0]} entries but the batch has {batch} samples")
    if device is not None and labels.device != torch.device(device):
        raise ValueError(f"labels are on {labels.device} but the inputs are on {device}")
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    if labels.numel() == 0 or torch.compiler.is_compiling():
        return
    if labels.device.type != "cpu":
        torch._assert_async(((labels >= 0) & (labels < num_labels)).all(),
                            f"cctk: labels must lie in [0, {num_labels})")
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_labels:
        raise ValueError(f"labels must lie in [0, {num_labels}); found values in [{lo}, {hi}]")


def label_sum(x: torch.Tensor, labels: torch.Tensor, num_labels: int, backend: str = "auto"):
    """Per-label row sums of ``x`` (B, N): returns ``(sums (K, N) float32, counts (K,) int64)``.

    ``backend``: ``"auto"`` (compiled kernel where available, else reference), ``"ext"``
    (compiled kernel; error if missing), ``"torch"`` (reference).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor (batch, features), got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    check_labels(labels, num_labels, batch=x.shape[0], device=x.device)
    if backend not in ("auto", "ext", "torch"):
        raise ValueError(f"backend must be 'auto', 'ext' or 'torch', got {backend!r}")
    if backend == "torch":
        return label_sum_ref(x, labels, num_labels)
    if backend == "ext" and not _ext.supports(x.device):
        raise RuntimeError(f"cctk's compiled extension has no label_sum kernel for {x.device}; "
                           f"{_ext.REINSTALL_HINT}")
    return _op(x.contiguous(), labels.contiguous(), num_labels)
