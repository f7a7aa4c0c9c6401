"""Compile every Triton kernel of cctk for a CUDA GPU target, on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python semantics on CPU tensors but
never lowers them; this check lowers them through Triton's real pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> cubin with the ptxas bundled in the triton wheel) for a chosen compute capability, so a
kernel that would fail to compile on the GPU fails here too, and the PTX can be read: are the
loads 16 bytes wide, are there tensor-core instructions. Nothing is launched.

    python -m cctk.kernels.compile_check --arch 90 --out DIR [--kernel NAME] [--dtype bf16] [--block 64]

writes ``DIR/<kernel>_<dtype>[_...].ptx`` for each variant and prints one line per variant: its
file, whether it holds tensor-core instructions (``mma``/``wgmma``) and the widths in bytes of
its global loads (``ld.global`` and ``cp.async``). Variants are compiled as the launchers call
them: pointers and row strides 16-byte aligned, unit column strides (Triton specialises a stride
of 1 to a constant), sizes unspecialised where the kernel says so.

Kernels: ``bsr_forward``, ``bsr_backward_input``, ``bsr_backward_weight`` (``kernels/bsr_linear.py``;
blocks 16/32/64, ``even``: feature sizes a multiple of B, ``odd``: masked edges),
``linear_label_stats``, ``attention_label_stats`` (``kernels/label_stats.py``; pooled/token).

Run it with TRITON_INTERPRET unset: under the interpreter Triton patches ``triton.language`` and
real compilation breaks.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

DTYPES = ("fp32", "bf16", "fp16")
BLOCKS = (16, 32, 64)
BSR_KERNELS = ("bsr_forward", "bsr_backward_input", "bsr_backward_weight")
LABEL_STATS_KERNELS = ("linear_label_stats", "attention_label_stats")
KERNELS = BSR_KERNELS + LABEL_STATS_KERNELS

# pointer parameters that are not in the data dtype
_POINTER_TYPES = {"ptr_ptr": "*i32", "idx_ptr": "*i32", "perm_ptr": "*i32", "brow_ptr": "*i32",
                  "col_ptr": "*i32", "part_ptr": "*fp32", "Labels_ptr": "*i64", "Sums_ptr": "*fp32"}
_FLOAT_SCALARS = ("inv_T", "sm_scale")


def _as_jit_function(kernel):
    """The JITFunction behind ``kernel`` (under TRITON_INTERPRET=1, @triton.jit yields an
    InterpretedFunction wrapping the same Python function)."""
    from triton.runtime.jit import JITFunction
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def _compile(kernel, dtype: str, constexprs: dict, arch: int, num_warps: int = 4, num_stages: int = 3):
    """Lower ``kernel`` for ``sm_<arch>`` with pointers in ``dtype`` (see _POINTER_TYPES), float
    scalars fp32, other scalars i32; every pointer, and every scalar not unspecialised by the kernel
    (``do_not_specialize``), 16-divisible, as the JIT sees aligned tensors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _as_jit_function(kernel)
    unspecialised = {fn.arg_names[n] if isinstance(n, int) else n for n in getattr(fn, "do_not_specialize", ())}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            sig[name] = _POINTER_TYPES.get(name, f"*{dtype}")
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
            continue
        else:
            sig[name] = "i32"
            if name in unspecialised:
                continue
        attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def global_load_widths(ptx: str) -> list[int]:
    """Widths in bytes of the global loads in ``ptx``: ``ld.global[...].v<n>.b<bits>`` and the
    ``cp.async`` copies into shared memory (their byte count), sorted, without repeats."""
    widths = set()
    for m in re.finditer(r"\bld\.global((?:\.[A-Za-z0-9:_]+)+)", ptx):
        quals = m.group(1).split(".")
        bits = [int(q[1:]) for q in quals if re.fullmatch(r"[bfsu]\d+", q)]
        vec = [int(q[1:]) for q in quals if re.fullmatch(r"v\d", q)]
        if bits:
            widths.add((vec[0] if vec else 1) * bits[-1] // 8)
    for m in re.finditer(r"\bcp\.async\.c[ag]\.shared(?:::cta)?\.global[^\s]*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*"
                         r"(0x[0-9a-fA-F]+|\d+)", ptx):
        widths.add(int(m.group(1), 0))
    return sorted(widths)


def has_tensor_cores(ptx: str) -> bool:
    return bool(re.search(r"\b(?:w?gmma|mma)\.", ptx))


def _bsr_variants(kernels, dtypes, blocks):
    from cctk.kernels import bsr_linear as bl
    fwd, wgrad = bl._kernels()
    for name in kernels:
        if name not in BSR_KERNELS:
            continue
        for dtype in dtypes:
            precision = "ieee" if dtype == "fp32" else "tf32"
            for B in blocks:
                for even in (True, False):
                    tag = f"{name}_{dtype}_B{B}_{'even' if even else 'odd'}"
                    if name == "bsr_backward_weight":
                        consts = dict(B=B, BLOCK_M=bl._block_m(1 << 20, B) if B < 64 else 64,
                                      INPUT_PRECISION=precision, DOT_F32=False, EVEN_N=even, EVEN_K=even,
                                      stride_gn=1, stride_xk=1)
                        yield tag, wgrad, dtype, consts
                    else:
                        forward = name == "bsr_forward"
                        consts = dict(HAS_BIAS=forward, HAS_PERM=not forward, TRANS_V=forward, B=B,
                                      BLOCK_M=bl._block_m(1 << 20, B), INPUT_PRECISION=precision,
                                      DOT_F32=False, EVEN_K=even, EVEN_N=even, stride_ak=1, stride_on=1)
                        yield tag, fwd, dtype, consts


def _label_stats_variants(kernels, dtypes, head_blocks=(16, 64)):
    from cctk.kernels import label_stats as ls
    for dtype in dtypes:
        precision = "ieee" if dtype == "fp32" else None
        for mode_name, mode in ls.MODES.items():
            if "linear_label_stats" in kernels:
                consts = dict(HAS_BIAS=True, ACTIVATION=1, MODE=mode, DOT_PRECISION=precision,
                              DOT_UPCAST=False, BLOCK_T=64, BLOCK_N=128, BLOCK_K=32,
                              X_col_stride=1, W_col_stride=1, Bias_stride=1, Labels_stride=1)
                yield f"linear_label_stats_{dtype}_{mode_name}", ls._linear_label_stats_forward_kernel, dtype, consts
            if "attention_label_stats" in kernels:
                for block_d in head_blocks:
                    consts = dict(MODE=mode, DOT_PRECISION=precision, DOT_UPCAST=False,
                                  BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, Q_col_stride=1, K_col_stride=1,
                                  V_col_stride=1, Labels_stride=1)
                    yield (f"attention_label_stats_{dtype}_{mode_name}_d{block_d}",
                           ls._attention_label_stats_forward_kernel, dtype, consts)


def compile_all(arch: int = 90, out_dir: str | None = None, kernels=KERNELS, dtypes=DTYPES, blocks=BLOCKS):
    """Compile the chosen variants for ``sm_<arch>``; write ``out_dir/<variant>.ptx`` when given.
    Returns one dict per variant: ``name``, ``ptx`` (path or None), ``cubin_bytes``,
    ``tensor_cores``, ``load_widths``. Raises whatever Triton raises on a failure."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        raise RuntimeError("unset TRITON_INTERPRET to compile the kernels for a GPU target")
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {', '.join(KERNELS)}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    variants = list(_bsr_variants(kernels, dtypes, blocks)) + list(_label_stats_variants(kernels, dtypes))
    done = []
    for tag, kernel, dtype, consts in variants:
        compiled = _compile(kernel, dtype, consts, arch)
        ptx = compiled.asm["ptx"]
        path = None
        if out_dir:
            path = os.path.join(out_dir, f"{tag}.ptx")
            with open(path, "w") as f:
                f.write(ptx)
        done.append(dict(name=tag, ptx=path, cubin_bytes=len(compiled.asm["cubin"]),
                         tensor_cores=has_tensor_cores(ptx), load_widths=global_load_widths(ptx)))
    return done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable; default 90)")
    parser.add_argument("--out", help="directory for the PTX files (one per variant; a folder per arch if several)")
    parser.add_argument("--kernel", action="append", choices=KERNELS, help="(repeatable; default all)")
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="(repeatable; default all)")
    parser.add_argument("--block", type=int, action="append", choices=BLOCKS,
                        help="block size of the bsr kernels (repeatable; default all)")
    args = parser.parse_args(argv)
    archs = args.arch or [90]
    for arch in archs:
        out = args.out if (args.out is None or len(archs) == 1) else os.path.join(args.out, f"sm_{arch}")
        for r in compile_all(arch, out, kernels=args.kernel or KERNELS, dtypes=args.dtype or DTYPES,
                             blocks=args.block or BLOCKS):
            print(f"sm_{arch} {r['name']}: {r['cubin_bytes']} B cubin, tensor cores "
                  f"{'yes' if r['tensor_cores'] else 'no'}, global loads {r['load_widths']} B"
                  + (f" -> {r['ptx']}" if r["ptx"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
