"""Loading of the compiled extension ``cctk._C``.

Importing this module never compiles anything and never initialises CUDA. If the extension is
missing, was built for another torch, or fails to load, a single warning is issued and every op
falls back to its PyTorch reference path (``available()`` is then False).
"""
from __future__ import annotations

import importlib
import warnings

import torch

from cctk._library import LIB  # noqa: F401  (the cctk torch.library fragment)

_STATE = {"loaded": None, "error": None, "module": None}

REINSTALL_HINT = ("reinstall cctk from source against the installed torch: "
                  "`pip install --no-build-isolation -e .` (see README)")


def _load():
    if _STATE["loaded"] is not None:
        return _STATE["loaded"]
    # The cctk library fragment exists before the C++ kernels register against it (the op
    # schemas are declared by cctk.ops, which imports this module first).
    try:
        import cctk._build_info as _build_info
        built_for = getattr(_build_info, "TORCH_VERSION", None)
        with_ext = getattr(_build_info, "WITH_EXT", False)
    except ImportError:
        built_for, with_ext = None, False
    mod = None
    err = None
    try:
        mod = importlib.import_module("cctk._C")
    except ImportError as e:  # missing .so or symbol mismatch
        err = f"cctk._C could not be loaded ({e})"
    if mod is not None:
        ext_torch = getattr(mod, "TORCH_VERSION", built_for)
        if ext_torch is not None and ext_torch.split("+")[0] != torch.__version__.split("+")[0]:
            err = (f"cctk._C was built for torch {ext_torch} but torch {torch.__version__} is installed")
            mod = None
    if mod is None:
        _STATE.update(loaded=False, error=err)
        if with_ext or err and "built for" in err:
            warnings.warn(f"cctk: compiled extension unavailable: {err}; using the slower PyTorch "
                          f"reference paths. To fix, {REINSTALL_HINT}.", RuntimeWarning, stacklevel=3)
        return False
    _STATE.update(loaded=True, module=mod)
    return True


def available() -> bool:
    """True when the compiled extension is loaded."""
    return _load()


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _load() and bool(getattr(_STATE["module"], "WITH_CUDA", False))


def supports(device: torch.device | str) -> bool:
    """True when the extension has kernels for tensors on ``device``."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return available()
    if dev.type == "cuda":
        return has_cuda_kernels()
    return False


def cpu_capabilities() -> str:
    """The instruction set the CPU kernels chose at run time: 'amx', 'avx512_bf16', 'avx512', 'avx2' or
    'scalar' ('+amx_emulated' when CCTK_CPU_CAPABILITY=amx_emulated runs the tile kernels over the
    emulator)."""
    if not available():
        return "none"
    return torch.ops.cctk.cpu_capability()


def avx512_kernels() -> bool:
    """True when the CPU kernels run their AVX-512 paths (AVX-512 or above). Below it (an AVX2-only
    CPU) ``cctk::attention``, ``cctk::layer_norm`` and the fused tokenizer stage are scalar loops,
    slower than torch's own kernels, so the models use torch's there."""
    cap = _STATE.get("attention_vector")
    if cap is None:
        cap = _STATE["attention_vector"] = cpu_capabilities().split("+")[0] in ("avx512", "avx512_bf16", "amx")
    return cap


def info() -> dict:
    """What was built and what is in use: for bug reports and benchmark records."""
    ok = available()
    mod = _STATE["module"]
    return {
        "extension": ok,
        "error": _STATE["error"],
        "built_for_torch": getattr(mod, "TORCH_VERSION", None) if ok else None,
        "cuda_kernels": bool(getattr(mod, "WITH_CUDA", False)) if ok else False,
        "cpu_capability": cpu_capabilities() if ok else "none",
    }
