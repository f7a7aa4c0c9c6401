"""Compile the label_stats Triton kernels for a CUDA GPU target on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python semantics on CPU tensors but
never lowers them; this check lowers them through Triton's real pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> cubin with the ptxas bundled in the triton wheel) for a chosen compute capability, so a
kernel that would fail to compile on the GPU fails here too. Nothing is launched.

    python -m cctk.kernels.label_stats_compile_check [--arch 90] [--arch 80] [--dtype bf16] [--mode 0]

Run it with TRITON_INTERPRET unset: under the interpreter Triton patches ``triton.language`` and
real compilation breaks.
"""
import argparse
import inspect


def _as_jit_function(kernel):
    """The JITFunction behind ``kernel`` (under TRITON_INTERPRET=1, @triton.jit yields an
    InterpretedFunction wrapping the same Python function)."""
    from triton.runtime.jit import JITFunction
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def _signature(kernel, dtype: str, constexprs: dict):
    """Triton type strings for every parameter: data pointers in ``dtype``, labels int64, sums
    fp32, float scalars fp32, other scalars i32."""
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = {"Labels_ptr": "*i64", "Sums_ptr": "*fp32"}.get(name, f"*{dtype}")
        elif name in ("inv_T", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_label_stats_kernels(arch: int = 90, dtypes=("fp32", "bf16", "fp16"), modes=(0, 1),
                                head_blocks=(16, 64)):
    """Compile both kernels for ``sm_<arch>`` over dtypes x modes (x head-dim blocks for attention);
    returns one line per compiled variant. Raises whatever Triton raises on a failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cctk.kernels import label_stats as ls

    if ls.interpreting():
        raise RuntimeError("unset TRITON_INTERPRET to compile the kernels for a GPU target")

    target = GPUTarget("cuda", arch, 32)
    linear = _as_jit_function(ls._linear_label_stats_forward_kernel)
    attention = _as_jit_function(ls._attention_label_stats_forward_kernel)
    done = []
    for dtype in dtypes:
        precision = "ieee" if dtype == "fp32" else None
        for mode in modes:
            consts = dict(HAS_BIAS=True, ACTIVATION=1, MODE=mode, DOT_PRECISION=precision,
                          DOT_UPCAST=False, BLOCK_T=64, BLOCK_N=128, BLOCK_K=32)
            compiled = triton.compile(ASTSource(linear, _signature(linear, dtype, consts), constexprs=consts),
                                      target=target)
            done.append(f"linear sm_{arch} {dtype} mode={mode}: {len(compiled.asm['cubin'])} B cubin")
            for block_d in head_blocks:
                consts = dict(MODE=mode, DOT_PRECISION=precision, DOT_UPCAST=False,
                              BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d)
                compiled = triton.compile(
                    ASTSource(attention, _signature(attention, dtype, consts), constexprs=consts), target=target)
                done.append(f"attention sm_{arch} {dtype} mode={mode} BLOCK_D={block_d}: "
                            f"{len(compiled.asm['cubin'])} B cubin")
    return done


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    parser.add_argument("--dtype", action="append", choices=("fp32", "bf16", "fp16"), help="(repeatable)")
    parser.add_argument("--mode", type=int, action="append", choices=(0, 1), help="0 pooled, 1 token (repeatable)")
    args = parser.parse_args(argv)
    for arch in args.arch or [90]:
        for line in compile_label_stats_kernels(arch, dtypes=args.dtype or ("fp32", "bf16", "fp16"),
                                                modes=args.mode or (0, 1)):
            print(line)


if __name__ == "__main__":
    main()
