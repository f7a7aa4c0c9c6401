"""cctk: Compact Convolutional Transformers, single-nodal performance (SNP) analysis and ANDC
block-sparse pruning, with fused Triton kernels and a C++/CUDA extension.

Importing cctk never compiles anything and never initialises CUDA. Without the compiled
extension it warns once and every op uses its PyTorch reference path.
"""
from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _ensure_kernels_subpackage():
    # ``cctk.kernels`` is shipped from the top-level ``kernels/`` directory (setuptools
    # package_dir). Wheels and editable installs map it; when cctk is imported straight from a
    # source checkout (repo root on sys.path), map it here the same way.
    if "cctk.kernels" in _sys.modules or _ilu.find_spec("cctk.kernels") is not None:
        return
    src = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    init = _os.path.join(src, "__init__.py")
    if _os.path.exists(init):
        spec = _ilu.spec_from_file_location("cctk.kernels", init, submodule_search_locations=[src])
        mod = _ilu.module_from_spec(spec)
        _sys.modules["cctk.kernels"] = mod
        spec.loader.exec_module(mod)


_ensure_kernels_subpackage()

from cctk import ops  # noqa: E402  (declares the cctk:: op schemas)
from cctk import _ext  # noqa: E402
from cctk.nn import ANDCLinear  # noqa: E402
from cctk.optimize import optimize  # noqa: E402

_ext.available()  # load the compiled kernels now (or warn once and fall back)

__all__ = ["ops", "__version__", "ANDCLinear", "optimize"]
