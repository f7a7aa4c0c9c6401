"""Build script for cctk.

The C++ extension ``cctk._C`` holds the CPU kernels (always built, OpenMP, AVX-512 code paths
selected at run time with a portable scalar/AVX2 fallback) and the CUDA kernels (built when
torch has CUDA and nvcc is found, or when forced).

Switches (environment variables):

* ``CCTK_NO_EXT=1``         skip the extension entirely: a pure Python install (every op then
                           uses its PyTorch reference path or Triton).
* ``CCTK_FORCE_CUDA=1``     build the CUDA sources even without a visible GPU (needs nvcc and
                           CUDA_HOME pointing at the real toolkit root).
* ``CCTK_FORCE_CPU_ONLY=1`` never build the CUDA sources.
* ``TORCH_CUDA_ARCH_LIST``  CUDA architectures (default ``8.0;9.0+PTX``: Ampere and Hopper, plus PTX for newer GPUs).
* ``MAX_JOBS``              parallel compile jobs (ninja).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _packages():
    return find_packages(include=["cctk", "cctk.*"])


def _write_build_info(with_ext, with_cuda, torch_version):
    path = os.path.join(ROOT, "cctk", "_build_info.py")
    with open(os.path.join(ROOT, "csrc", "build_info.h"), "w") as f:
        f.write("// written by setup.py at build time\n#pragma once\n")
        f.write(f'#define CCTK_TORCH_VERSION "{torch_version}"\n')
    with open(path, "w") as f:
        f.write("# written by setup.py at build time\n")
        f.write(f"TORCH_VERSION = {torch_version!r}\n")
        f.write(f"WITH_EXT = {with_ext!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")


def _cuda_home_ok(cuda_home):
    return bool(cuda_home) and os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h"))


def _cuda_library_includes(cuda_home):
    """Header dirs of the CUDA math libraries torch's headers include (cusparse.h, cublas_v2.h).

    A minimal toolkit (nvcc + cudart) may lack them; torch's CUDA wheels then bring them as the
    ``nvidia-*`` pip packages (``site-packages/nvidia/**/include``)."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    dirs = []
    for base in sys.path:
        for inc in sorted(glob.glob(os.path.join(base, "nvidia", "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")) or os.path.exists(os.path.join(inc, "cublas_v2.h")):
                dirs.append(inc)
        if dirs:
            break
    return dirs


def _ext_modules():
    if _flag("CCTK_NO_EXT"):
        print("cctk: CCTK_NO_EXT=1, building a pure Python package", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils import cpp_extension

    force_cuda = _flag("CCTK_FORCE_CUDA")
    cpu_only = _flag("CCTK_FORCE_CPU_ONLY")
    if force_cuda and cpu_only:
        raise RuntimeError("cctk: CCTK_FORCE_CUDA and CCTK_FORCE_CPU_ONLY are both set; choose one")

    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = False
    if not cpu_only and torch.version.cuda is not None:
        if _cuda_home_ok(cuda_home):
            with_cuda = True
        elif force_cuda:
            raise RuntimeError(
                f"cctk: CCTK_FORCE_CUDA=1 but CUDA_HOME={cuda_home!r} holds no include/cuda_runtime.h; "
                "set CUDA_HOME to the real CUDA toolkit root (the directory whose bin/ holds the real nvcc)")
        else:
            print(f"cctk: no usable CUDA toolkit (CUDA_HOME={cuda_home!r}); building CPU kernels only",
                  file=sys.stderr)
    elif force_cuda:
        raise RuntimeError("cctk: CCTK_FORCE_CUDA=1 but this torch has no CUDA support")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    _write_build_info(True, with_cuda, torch.__version__)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define_macros = []
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    extra = {"cxx": cxx}
    libraries = []
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                         "-Xcompiler", "-fvisibility=hidden"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        "cctk._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + (_cuda_library_includes(cuda_home) if with_cuda else []),
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        libraries=libraries,
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _ext_modules()
if not ext_modules:
    try:
        import torch  # noqa: F401
        _tv = torch.__version__
    except ImportError:
        _tv = None
    _write_build_info(False, False, _tv)

setup(
    packages=_packages(),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
