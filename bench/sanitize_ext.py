"""Calls of cctk's CUDA kernels for compute-sanitizer (run by bench/gpu_check.sh):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/sanitize_ext.py

Without the caching allocator every tensor is its own cudaMalloc, so an out-of-bounds read or
write lands outside any allocation and memcheck sees it (inside the allocator's pool it would pass).
Covers the ext ops forward, input gradient and weight gradient in bf16 and fp32 at each block size,
both on the 128-token tensor-core path (256->512 at 4261 rows: >= 2 x SMs CTAs of 128 tokens on an
H200, with a partial last tile) and on the 32-token path (few rows, partial edge blocks), and
label_sum. Prints one line per call; the sanitizer's summary says whether any access was bad.
"""
import importlib
import sys

import torch

import cctk  # noqa: F401  (loads the extension)


def main() -> int:
    bl = importlib.import_module("cctk.ops.block_sparse")
    from cctk.ops import label_sum
    dev = torch.device("cuda")
    cases = [(256, 512, 4261), (40, 72, 33), (132, 100, 300)]   # (in, out, rows)
    for dtype in (torch.bfloat16, torch.float32):
        for B in (16, 32, 64):
            for in_f, out_f, M in cases:
                g = torch.Generator().manual_seed(B + M)
                mask = (torch.rand(-(-out_f // B), -(-in_f // B), generator=g) < 0.4).to(dev)
                w = torch.randn(out_f, in_f, generator=g).to(dev, dtype)
                values, crow, col = bl.dense_to_bsr(w, mask, B)
                x = torch.randn(M, in_f, generator=g).to(dev, dtype).requires_grad_(True)
                values.requires_grad_(True)
                bias = torch.randn(out_f, generator=g).to(dev, dtype).requires_grad_(True)
                y = bl.bsr_linear(x, values, crow, col, bias, out_f, backend="ext")
                y.backward(torch.randn_like(y))
                torch.cuda.synchronize()
                print(f"ext {str(dtype)[6:]} B{B} {in_f}->{out_f} rows {M}: fwd + bwd done", flush=True)
    x = torch.randn(4261, 512, device=dev, dtype=torch.bfloat16)
    label_sum(x, torch.randint(0, 100, (4261,), device=dev), 100, backend="ext")
    torch.cuda.synchronize()
    print("label_sum done; all sanitized calls done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
