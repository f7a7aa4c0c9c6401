"""cctk ops: one module per op, each with its torch.library schema, fake implementation,
PyTorch reference twin (``*_ref``) and dispatch to the compiled / Triton kernels."""
from cctk._library import LIB  # noqa: F401  (the cctk torch.library fragment)
from cctk.ops.labels import check_labels, label_sum, label_sum_ref
from cctk.ops.block_sparse import (bsr_linear, bsr_linear_backward_input_ref, bsr_linear_backward_weight_ref,
                                  bsr_linear_ref, bsr_to_dense, bsr_transpose_index, dense_to_bsr)

__all__ = ["label_sum", "label_sum_ref", "check_labels",
           "bsr_linear", "bsr_linear_ref", "bsr_linear_backward_input_ref", "bsr_linear_backward_weight_ref",
           "dense_to_bsr", "bsr_to_dense", "bsr_transpose_index"]

from cctk.ops.label_stats import (attention_label_stats, attention_label_stats_ref,  # noqa: E402
                                  linear_label_stats, linear_label_stats_ref)

__all__ += ["linear_label_stats", "linear_label_stats_ref", "attention_label_stats", "attention_label_stats_ref"]

from cctk.ops.fused_attention import attention, attention_ref  # noqa: E402

__all__ += ["attention", "attention_ref"]

from cctk.ops.normalization import layer_norm, layer_norm_ref  # noqa: E402

__all__ += ["layer_norm", "layer_norm_ref"]

from cctk.ops.conv_pool import conv_relu_maxpool, conv_relu_maxpool_ref  # noqa: E402

__all__ += ["conv_relu_maxpool", "conv_relu_maxpool_ref"]
