"""cctk ops: one module per op, each with its torch.library schema, fake implementation,
PyTorch reference twin (``*_ref``) and dispatch to the compiled / Triton kernels."""
from cctk.ops import _library  # noqa: F401  (the cctk torch.library fragment)
from cctk.ops.label_sum import check_labels, label_sum, label_sum_ref

__all__ = ["label_sum", "label_sum_ref", "check_labels"]
