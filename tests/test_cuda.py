"""GPU paths on a CUDA device: the block-sparse linear ops (compiled CUDA kernels and the Triton
backend) against the masked dense layer, the fused SNP ops (Triton vs torch twin) and label_sum.

Every test carries ``@pytest.mark.cuda`` and is skipped without a GPU (conftest.py). cctk's
pieces are imported inside the tests, so collection never fails. References: float64 on the GPU
from the same (rounded) operands; relative Frobenius error per dtype.
"""
import pytest
import torch

pytestmark = pytest.mark.cuda

DEV = torch.device("cuda")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# (in, out, B): partial edge blocks (40 = 2*16 + 8, 72 = 4*16 + 8), in not a multiple of 8 (44,
# 132: the kernels' scalar load path), one block-row per CTA (B = 64) and several (B = 16, 32).
SHAPES = [(40, 72, 16), (44, 72, 16), (200, 136, 32), (132, 100, 32), (96, 80, 64), (256, 512, 64), (512, 256, 64)]
ROWS = [1, 5, 33, 300, 5000]  # 5000: enough token tiles for the 128-token tensor-core tiles


def _bsr():
    # cctk.ops re-exports the function bsr_linear under the module's name: import the module itself
    import importlib
    return importlib.import_module("cctk.ops.block_sparse")


def _ext_cuda_or_skip():
    from cctk import _ext
    if not _ext.has_cuda_kernels():
        pytest.skip("cctk._C was built without CUDA kernels: reinstall with CCTK_FORCE_CUDA=1 "
                    "(bench/gpu_check.sh fails loudly on this)")


def _triton_or_skip():
    pytest.importorskip("triton")


def rel_err(a, ref):
    a, ref = a.double(), ref.double()
    assert torch.isfinite(a).all(), "non-finite values in the output"
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(out, ref, dtype, what=""):
    assert out.dtype == dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    check_close(out, ref, TOL[dtype], what)


def check_close(out, ref, tol, what=""):
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def make_mask(nr, nc, density, g, uneven=False):
    mask = torch.rand(nr, nc, generator=g) < density
    if uneven and nr >= 3:  # one full block-row, one empty, the rest random: unequal counts
        mask[0] = True
        mask[1] = False
    return mask


def make_case(M, in_f, out_f, B, dtype, density=0.4, seed=0, uneven=False):
    g = torch.Generator().manual_seed(seed)
    nr, nc = -(-out_f // B), -(-in_f // B)
    mask = make_mask(nr, nc, density, g, uneven)
    w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    x = torch.randn(M, in_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    to = dict(device=DEV, dtype=dtype)
    return x.to(**to), w.to(**to), bias.to(**to), mask.to(DEV)


def masked_dense(w, mask, B):
    out_f, in_f = w.shape
    full = mask.repeat_interleave(B, 0).repeat_interleave(B, 1)[:out_f, :in_f]
    return w * full.to(w.dtype)


def dirty_allocator(nbytes):
    """Leave NaNs in freed memory of the caching allocator: unwritten outputs then show."""
    torch.full((nbytes // 4 + 1,), float("nan"), device=DEV, dtype=torch.float32)


# --------------------------------------------------------------------------------- ext kernels

@pytest.mark.parametrize("in_f,out_f,B", SHAPES)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ext_forward_and_grads_match_masked_dense(in_f, out_f, B, M, dtype):
    _ext_cuda_or_skip()
    m = _bsr()
    x, w, bias, mask = make_case(M, in_f, out_f, B, dtype, seed=M + B, uneven=True)
    values, crow, col = m.dense_to_bsr(masked_dense(w, mask, B), mask, B)
    x.requires_grad_(True)
    values.requires_grad_(True)
    bias.requires_grad_(True)
    dirty_allocator(M * max(in_f, out_f) * 4)
    y = m.bsr_linear(x, values, crow, col, bias, out_f, backend="ext")
    wd = masked_dense(w, mask, B).double()
    check(y.detach(), x.detach().double() @ wd.T + bias.detach().double(), dtype, "forward")
    gout = torch.randn_like(y)
    y.backward(gout)
    check(x.grad, gout.double() @ wd, dtype, "grad x")
    gw = gout.double().T @ x.detach().double()
    ref_vals, _, _ = m.dense_to_bsr(gw, mask, B)
    check(values.grad, ref_vals, dtype, "grad kept blocks")
    check(bias.grad, gout.double().sum(0), dtype, "grad bias")


# The shapes bench/gpu_bench.py times: >= 16384 rows give >= 2 x SMs CTAs of 128 tokens, so the
# 128-token, 4-warp tensor-core kernels run for every block size (below that, 32-token tiles).
# 16384 + 37 leaves a partial last token tile.
TIMED_SHAPES = [(256, 512), (512, 256), (1024, 4096)]


@pytest.mark.parametrize("in_f,out_f", TIMED_SHAPES)
@pytest.mark.parametrize("B", [16, 32, 64])
@pytest.mark.parametrize("M", [16384, 16384 + 37])
def test_ext_timed_shapes_forward_and_input_grad(in_f, out_f, B, M):
    """bf16 forward and input gradient at the timed shapes and row counts, every block size,
    against float64 from the same operands: the configurations the benchmark reports."""
    _ext_cuda_or_skip()
    m = _bsr()
    dtype = torch.bfloat16
    x, w, bias, mask = make_case(M, in_f, out_f, B, dtype, density=0.25, seed=B + M % 7, uneven=True)
    wm = masked_dense(w, mask, B)
    values, crow, col = m.dense_to_bsr(wm, mask, B)
    ccol, row, perm = m.bsr_transpose_index(crow, col, -(-in_f // B))
    wd = wm.double()
    dirty_allocator(M * max(in_f, out_f) * 4)
    y = torch.ops.cctk.bsr_linear(x, values, crow, col, bias, out_f)
    check(y, x.double() @ wd.T + bias.double(), dtype, "forward")
    gout = torch.randn(M, out_f, device=DEV, dtype=dtype)
    dirty_allocator(M * max(in_f, out_f) * 4)
    gin = torch.ops.cctk.bsr_linear_backward_input(gout, values, ccol, row, perm, in_f)
    check(gin, gout.double() @ wd, dtype, "grad x")


def test_ext_graph_capture_matches_eager_and_reuses_the_order_cache():
    """The ext op captured in a CUDA graph (after eager warm-up calls, as the benchmark does)
    gives the eager result on replay, with fresh inputs copied into the static buffer."""
    _ext_cuda_or_skip()
    m = _bsr()
    x, w, bias, mask = make_case(16384, 256, 512, 16, torch.bfloat16, density=0.25, uneven=True)
    values, crow, col = m.dense_to_bsr(masked_dense(w, mask, 16), mask, 16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            torch.ops.cctk.bsr_linear(x, values, crow, col, bias, 512)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.cctk.bsr_linear(x, values, crow, col, bias, 512)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, torch.ops.cctk.bsr_linear(x, values, crow, col, bias, 512))


@pytest.mark.parametrize("B", [16, 64])
def test_ext_float64_and_gradcheck(B):
    _ext_cuda_or_skip()
    m = _bsr()
    x, w, bias, mask = make_case(7, 40, 72, B, torch.float64, seed=3, uneven=True)
    values, crow, col = m.dense_to_bsr(masked_dense(w, mask, B), mask, B)
    y = torch.ops.cctk.bsr_linear(x, values, crow, col, bias, 72)
    check(y, x @ masked_dense(w, mask, B).T + bias, torch.float64, "fp64 forward")
    xs = x[:3].clone().requires_grad_(True)
    vs = values.clone().requires_grad_(True)
    bs = bias.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, v, b: torch.ops.cctk.bsr_linear(a, v, crow, col, b, 72),
                                    (xs, vs, bs), eps=1e-6, atol=1e-8)


def test_ext_empty_mask_rows_and_all_false():
    _ext_cuda_or_skip()
    m = _bsr()
    for dtype in (torch.float32, torch.bfloat16):
        x, w, bias, _ = make_case(33, 40, 72, 16, dtype)
        mask = torch.zeros(5, 3, dtype=torch.bool, device=DEV)
        values, crow, col = m.dense_to_bsr(w, mask, 16)
        y = torch.ops.cctk.bsr_linear(x, values, crow, col, bias, 72)
        assert torch.equal(y, bias.expand(33, -1))
        mask[2, 1] = True
        values, crow, col = m.dense_to_bsr(masked_dense(w, mask, 16), mask, 16)
        y = torch.ops.cctk.bsr_linear(x, values, crow, col, None, 72)
        check(y, x.double() @ masked_dense(w, mask, 16).double().T, dtype, "one block")
        assert torch.equal(y[:, :32], torch.zeros_like(y[:, :32]))


def test_ext_under_inference_mode():
    """Index tensors made under inference_mode (no version counter) work, cached or not."""
    _ext_cuda_or_skip()
    m = _bsr()
    with torch.inference_mode():
        x, w, bias, mask = make_case(33, 40, 72, 16, torch.bfloat16, uneven=True)
        values, crow, col = m.dense_to_bsr(masked_dense(w, mask, 16), mask, 16)
        y1 = torch.ops.cctk.bsr_linear(x, values, crow, col, bias, 72)
        y2 = torch.ops.cctk.bsr_linear(x, values, crow, col, bias, 72)
    check(y1, x.double() @ masked_dense(w, mask, 16).double().T + bias.double(), torch.bfloat16, "inference")
    assert torch.equal(y1, y2)


def test_ext_bad_inputs_raise():
    _ext_cuda_or_skip()
    m = _bsr()
    x, w, bias, mask = make_case(5, 40, 72, 16, torch.float32)
    values, crow, col = m.dense_to_bsr(masked_dense(w, mask, 16), mask, 16)
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.cctk.bsr_linear(x, values, crow.long(), col, bias, 72)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.cctk.bsr_linear(x.bfloat16(), values, crow, col, None, 72)
    with pytest.raises(RuntimeError, match="entries"):
        torch.ops.cctk.bsr_linear(x, values, crow[:-1], col, bias, 72)
    with pytest.raises(RuntimeError, match="crow_indices is on cpu"):
        torch.ops.cctk.bsr_linear(x, values, crow.cpu(), col, bias, 72)


def test_ext_nonzero_streams_and_repeat_are_deterministic():
    """Same inputs twice (and on a side stream) give bit-identical outputs: no races."""
    _ext_cuda_or_skip()
    m = _bsr()
    x, w, bias, mask = make_case(3000, 256, 512, 32, torch.bfloat16, density=0.3, uneven=True)
    values, crow, col = m.dense_to_bsr(masked_dense(w, mask, 32), mask, 32)
    y1 = torch.ops.cctk.bsr_linear(x, values, crow, col, bias, 512)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y2 = torch.ops.cctk.bsr_linear(x, values, crow, col, bias, 512)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    gw1 = torch.ops.cctk.bsr_linear_backward_weight(g, x, crow, col, 32)
    gw2 = torch.ops.cctk.bsr_linear_backward_weight(g, x, crow, col, 32)
    assert torch.equal(gw1, gw2)


# ------------------------------------------------------------------------------ Triton backend

@pytest.mark.parametrize("in_f,out_f,B", SHAPES)
@pytest.mark.parametrize("M", [1, 33, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_masked_dense(in_f, out_f, B, M, dtype):
    _triton_or_skip()
    m = _bsr()
    from cctk.kernels import bsr_linear as k
    x, w, bias, mask = make_case(M, in_f, out_f, B, dtype, seed=7 + M, uneven=True)
    wm = masked_dense(w, mask, B)
    values, crow, col = m.dense_to_bsr(wm, mask, B)
    ccol, row, perm = m.bsr_transpose_index(crow, col, -(-in_f // B))
    wd = wm.double()
    y = k.bsr_linear_triton(x, values, crow, col, bias, out_f, allow_tf32=False)
    check(y, x.double() @ wd.T + bias.double(), dtype, "triton forward")
    gout = torch.randn(M, out_f, device=DEV, dtype=dtype)
    gin = k.bsr_linear_backward_input_triton(gout, values, ccol, row, perm, in_f, allow_tf32=False)
    check(gin, gout.double() @ wd, dtype, "triton grad x")
    gval = k.bsr_linear_backward_weight_triton(gout, x, crow, col, B, allow_tf32=False)
    ref_vals, _, _ = m.dense_to_bsr(gout.double().T @ x.double(), mask, B)
    check(gval, ref_vals, dtype, "triton grad kept blocks")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_triton_backend_forward(dtype):
    _triton_or_skip()
    m = _bsr()
    x, w, bias, mask = make_case(300, 200, 136, 32, dtype, seed=11)
    values, crow, col = m.dense_to_bsr(masked_dense(w, mask, 32), mask, 32)
    y = m.bsr_linear(x.reshape(3, 100, 200), values, crow, col, bias, 136, backend="triton")
    assert y.shape == (3, 100, 136)
    check(y.reshape(300, 136), x.double() @ masked_dense(w, mask, 32).double().T + bias.double(), dtype,
          "op backend=triton")


def test_andclinear_module_on_cuda_all_backends():
    """cctk.ANDCLinear on CUDA, every GPU backend, against F.linear with the masked weight."""
    try:
        from cctk.nn import ANDCLinear
    except ImportError as e:
        pytest.skip(f"cctk.nn.ANDCLinear not available: {e}")
    from cctk import _ext
    backends = (["ext"] if _ext.has_cuda_kernels() else []) + ["triton", "torch"]
    for dtype in (torch.float32, torch.bfloat16):
        lin = torch.nn.Linear(200, 136).to(DEV, dtype)
        mask = make_mask(5, 7, 0.4, torch.Generator().manual_seed(1), uneven=True).to(DEV)
        x = torch.randn(4, 50, 200, device=DEV, dtype=dtype)
        wd = masked_dense(lin.weight.detach(), mask, 32).double()
        ref = x.double() @ wd.T + lin.bias.detach().double()
        for backend in backends:
            mod = ANDCLinear.from_dense(lin, mask, 32)
            mod.backend = backend
            xr = x.clone().requires_grad_(True)
            y = mod(xr)
            check(y.detach(), ref, dtype, f"ANDCLinear {backend} forward")
            gout = torch.randn_like(y)
            y.backward(gout)
            check(xr.grad, gout.double() @ wd, dtype, f"ANDCLinear {backend} grad x")
            gw = gout.double().reshape(-1, 136).T @ x.double().reshape(-1, 200)
            ref_vals, _, _ = _bsr().dense_to_bsr(gw, mask, 32)
            check(mod.values.grad, ref_vals, dtype, f"ANDCLinear {backend} grad kept blocks")
            check(mod.bias.grad, gout.double().sum((0, 1)), dtype, f"ANDCLinear {backend} grad bias")


# ------------------------------------------------------------------------------- SNP fused ops

@pytest.mark.parametrize("mode", ["pooled", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,d_in,d_out,K", [(6, 17, 40, 72, 3), (64, 256, 256, 512, 100)])
def test_linear_label_stats_triton_matches_torch(mode, dtype, B, T, d_in, d_out, K):
    _triton_or_skip()
    from cctk.ops import linear_label_stats
    x = torch.randn(B, T, d_in, device=DEV, dtype=dtype)
    w = (torch.randn(d_out, d_in, device=DEV) / d_in ** 0.5).to(dtype)
    b = torch.randn(d_out, device=DEV, dtype=dtype)
    labels = torch.randint(0, K, (B,), device=DEV)
    out_t, sums_t, cnt_t = linear_label_stats(x, w, b, labels, K, mode=mode, backend="triton")
    out_r, sums_r, cnt_r = linear_label_stats(x, w, b, labels, K, mode=mode, backend="torch")
    check(out_t, out_r.double(), dtype, "FF out")
    assert sums_t.dtype == torch.float32 and sums_r.dtype == torch.float32
    # fp32 inputs: the Triton dot may run in tf32 (Triton's default), hence 3e-3
    tol = 3e-3 if dtype == torch.float32 else TOL[dtype]
    check_close(sums_t, sums_r.double(), tol, "FF sums")
    assert torch.equal(cnt_t, cnt_r)


@pytest.mark.parametrize("mode", ["pooled", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,T,dh,K", [(5, 3, 17, 16, 4), (64, 4, 256, 32, 100)])
def test_attention_label_stats_triton_matches_torch(mode, dtype, B, H, T, dh, K):
    _triton_or_skip()
    from cctk.ops import attention_label_stats
    q, k, v = (torch.randn(B, H, T, dh, device=DEV, dtype=dtype) for _ in range(3))
    labels = torch.randint(0, K, (B,), device=DEV)
    out_t, sums_t, cnt_t = attention_label_stats(q, k, v, labels, K, mode=mode, backend="triton")
    out_r, sums_r, cnt_r = attention_label_stats(q, k, v, labels, K, mode=mode, backend="torch")
    # fp32 attention in Triton may use tf32 dots: allow tf32-level error for fp32
    tol = 3e-3 if dtype == torch.float32 else TOL[dtype]
    assert out_t.dtype == dtype and sums_t.dtype == torch.float32
    check_close(out_t, out_r.double(), tol, "MHA out")
    check_close(sums_t, sums_r.double(), tol, "MHA sums")
    assert torch.equal(cnt_t, cnt_r)


_BAD_LABELS_SCRIPT = r"""
import sys, torch, cctk
from cctk.ops import label_sum, linear_label_stats
x = torch.randn(4, 8, device="cuda")
labels = torch.tensor([0, 1, 2, 9], device="cuda")
if sys.argv[1] == "label_sum":
    sums, _ = label_sum(x, labels, 3, backend="ext")
else:
    _, sums, _ = linear_label_stats(x[:, None], torch.randn(16, 8, device="cuda"), None, labels, 3,
                                    backend="triton")
torch.cuda.synchronize()
print("NO ERROR", sums.sum().item())
"""


@pytest.mark.parametrize("op", ["label_sum", "linear_label_stats"])
def test_bad_labels_fail_on_the_device(op):
    """On a GPU the label range is checked on the device (no host sync): a bad label fails the
    stream with a device-side assert, which ends the process's CUDA context, so it runs in a
    subprocess of its own. (The CPU path's ValueError is tested in test_label_stats / test_ext.)"""
    if op == "label_sum":
        _ext_cuda_or_skip()
    else:
        _triton_or_skip()
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _BAD_LABELS_SCRIPT, op], env=env, cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "NO ERROR" not in r.stdout, r.stdout + r.stderr[-2000:]
    assert "assert" in r.stderr.lower(), r.stderr[-2000:]


def test_label_ops_do_not_sync_the_host():
    """label_sum (ext) and the fused ops (triton), validation included, enqueue no host sync, so
    they can be captured in a CUDA graph (torch.cuda.set_sync_debug_mode raises on any sync)."""
    _triton_or_skip()
    from cctk import _ext
    from cctk.ops import attention_label_stats, label_sum, linear_label_stats
    x = torch.randn(8, 17, 40, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(72, 40, device=DEV, dtype=torch.bfloat16)
    q = torch.randn(8, 2, 17, 16, device=DEV, dtype=torch.bfloat16)
    labels = torch.randint(0, 5, (8,), device=DEV)
    for mode in ("pooled", "token"):  # compile the Triton kernels before the sync check
        linear_label_stats(x, w, None, labels, 5, mode=mode, backend="triton")
        attention_label_stats(q, q, q, labels, 5, mode=mode, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in ("pooled", "token"):
            linear_label_stats(x, w, None, labels, 5, mode=mode, backend="triton")
            attention_label_stats(q, q, q, labels, 5, mode=mode, backend="triton")
        if _ext.has_cuda_kernels():
            label_sum(x[:, 0], labels, 5, backend="ext")
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------- label_sum

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,N,K", [(1, 7, 1), (97, 59, 10), (4096, 512, 100)])
def test_label_sum_cuda_matches_reference(dtype, B, N, K):
    _ext_cuda_or_skip()
    from cctk.ops import label_sum, label_sum_ref
    x = torch.randn(B, N, device=DEV, dtype=dtype)
    labels = torch.randint(0, K, (B,), device=DEV)
    sums, counts = label_sum(x, labels, K, backend="ext")
    sums_r, counts_r = label_sum_ref(x.double(), labels, K)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    err = rel_err(sums, sums_r)
    assert err <= 1e-5, f"label_sum error {err:.3g}"
    assert torch.equal(counts, counts_r)
