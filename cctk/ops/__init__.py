"""cctk ops: one module per op, each with its torch.library schema, fake implementation,
PyTorch reference twin (``*_ref``) and dispatch to the compiled / Triton kernels."""
from cctk.ops import _library  # noqa: F401  (the cctk torch.library fragment)
from cctk.ops.label_sum import check_labels, label_sum, label_sum_ref

__all__ = ["label_sum", "label_sum_ref", "check_labels"]

from cctk.ops.label_stats import (attention_label_stats, attention_label_stats_ref,  # noqa: E402
                                  linear_label_stats, linear_label_stats_ref)

__all__ += ["linear_label_stats", "linear_label_stats_ref", "attention_label_stats", "attention_label_stats_ref"]
