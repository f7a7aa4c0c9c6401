"""cctk: Compact Convolutional Transformers, single-nodal performance (SNP) analysis and ANDC
block-sparse pruning, with fused Triton kernels and a C++/CUDA extension.

Importing cctk never compiles anything and never initialises CUDA. Without the compiled
extension it warns once and every op uses its PyTorch reference path.
"""
from __future__ import annotations

__version__ = "0.1.0"

from cctk import ops  # noqa: E402  (declares the cctk:: op schemas)
from cctk import _ext  # noqa: E402
from cctk.nn import ANDCLinear  # noqa: E402
from cctk.optimize import optimize  # noqa: E402

_ext.available()  # load the compiled kernels now (or warn once and fall back)

__all__ = ["ops", "__version__", "ANDCLinear", "optimize"]
