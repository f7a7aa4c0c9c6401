"""Triton kernels of cctk, installed as the subpackage ``cctk.kernels``.

Triton is optional: these modules import it lazily, so cctk works without it (the PyTorch and
C++ paths remain). Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (that is how CI
tests them).
"""


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True
