"""cctk::attention (the fused CPU attention kernel) against its float64 reference."""
import pytest
import torch
import torch.nn.functional as F

from capability import results_per_capability
from cctk import _ext
from cctk.ops.fused_attention import attention, attention_ref

HAS_EXT = _ext.supports("cpu")
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _qkv(B, H, Tq, D, dtype, Tk=None, seed=0, layout="model"):
    """q, k, v as the CCT makes them (views of one qkv buffer) or as separate contiguous tensors."""
    g = torch.Generator().manual_seed(seed)
    Tk = Tq if Tk is None else Tk
    if layout == "model" and Tk == Tq:
        qkv = (torch.randn(B, Tq, 3, H, D, generator=g) * 1.5).to(dtype).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]
    return tuple((torch.randn(B, H, t, D, generator=g) * 1.5).to(dtype) for t in (Tq, Tk, Tk))


def _ref64(q, k, v, scale=None):
    return attention_ref(q.double(), k.double(), v.double(), scale)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,D", [(1, 64), (7, 16), (197, 80), (257, 64), (256, 32), (33, 128), (300, 24), (20, 33)])
def test_matches_reference(T, D, dtype):
    q, k, v = _qkv(2, 3, T, D, dtype)
    out = attention(q, k, v, backend="ext")
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), _ref64(q, k, v), **TOL[dtype])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_lengths_scale_and_key_blocks(dtype):
    # Tk > 256: several online-softmax key blocks; Tq != Tk; an explicit scale (also negative)
    q, k, v = _qkv(1, 2, 37, 64, dtype, Tk=600, layout="separate")
    for scale in (None, 0.3, -0.2):
        torch.testing.assert_close(attention(q, k, v, scale=scale, backend="ext").double(),
                                   _ref64(q, k, v, scale), **TOL[dtype])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(dtype):
    q, k, v = _qkv(2, 4, 50, 64, dtype, layout="separate")
    # strided token dim (every other token), a transposed last dim (no unit stride), odd row strides
    qs = torch.randn(2, 4, 100, 64).to(dtype)[:, :, ::2]
    kt = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    vw = torch.randn(2, 4, 50, 65).to(dtype)[..., :64]
    assert not qs.is_contiguous() and kt.stride(-1) != 1 and vw.stride(2) == 65
    torch.testing.assert_close(attention(qs, kt, vw, backend="ext").double(), _ref64(qs, kt, vw), **TOL[dtype])


@needs_ext
def test_output_layout_makes_the_head_merge_free():
    q, k, v = _qkv(3, 4, 9, 16, torch.float32)
    out = attention(q, k, v, backend="ext")
    assert out.transpose(1, 2).is_contiguous()  # (B, T, H, D) memory: reshape to (B, T, H*D) is a view
    merged = out.transpose(1, 2).reshape(3, 9, 64)
    assert merged.data_ptr() == out.data_ptr()


@needs_ext
def test_agrees_with_sdpa_and_empty_batches():
    q, k, v = _qkv(4, 2, 65, 32, torch.float32)
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    e = torch.randn(0, 2, 5, 16)
    assert attention(e, e, e, backend="ext").shape == (0, 2, 5, 16)
    z = torch.randn(1, 2, 0, 16)
    assert attention(z, torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), backend="ext").shape == (1, 2, 0, 16)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_scalar_path_dtypes(dtype):
    q, k, v = _qkv(1, 2, 23, 20, dtype, layout="separate")
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(attention(q, k, v, backend="ext").double(), _ref64(q, k, v), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients(dtype):
    q, k, v = (t.detach().requires_grad_(True) for t in _qkv(2, 2, 19, 16, dtype, layout="separate"))
    out = attention(q, k, v, backend="ext" if HAS_EXT else "torch")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want = torch.autograd.grad(F.scaled_dot_product_attention(q2, k2, v2), (q2, k2, v2), g.double())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for got, ref in zip(grads, want):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, **tol)


def test_gradcheck_float64():
    q, k, v = (t.detach().requires_grad_(True) for t in _qkv(1, 2, 5, 8, torch.float64, layout="separate"))
    assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.cctk.attention(a, b, c, 0.7), (q, k, v))


@needs_ext
def test_opcheck_and_compile():
    q, k, v = _qkv(2, 2, 17, 16, torch.float32)
    torch.library.opcheck(torch.ops.cctk.attention.default, (q, k, v, None))
    torch.library.opcheck(torch.ops.cctk.attention.default, (q.contiguous(), k.contiguous(), v.contiguous(), 0.5))
    fn = torch.compile(lambda a, b, c: attention(a, b, c).transpose(1, 2).reshape(2, 17, 32), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), attention_ref(q, k, v).transpose(1, 2).reshape(2, 17, 32),
                               atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    q, k, v = _qkv(2, 2, 8, 16, torch.float32, layout="separate")
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k, v)
    with pytest.raises(TypeError, match="one dtype"):
        attention(q, k.double(), v)
    with pytest.raises(TypeError, match="floating point"):
        attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="same shape"):
        attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="disagree"):
        attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="disagree"):
        attention(q[..., :8], k, v)
    with pytest.raises(ValueError, match="one device"):
        attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="at least one token"):
        attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(TypeError, match="scale"):
        attention(q, k, v, scale="0.5")
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="head_dim <= 256"):
        big = torch.randn(1, 1, 3, 300)
        attention(big, big, big, backend="ext" if HAS_EXT else "nope")
    if HAS_EXT:  # the C++ kernel checks too (for callers of torch.ops.cctk.attention)
        with pytest.raises(RuntimeError, match="must share one dtype"):
            torch.ops.cctk.attention(q, k.double(), v, None)
        with pytest.raises(RuntimeError, match="4-D"):
            torch.ops.cctk.attention(q[0], k[0], v[0], None)


def test_no_extension_falls_back_to_sdpa():
    q, k, v = _qkv(1, 2, 9, 16, torch.float32)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), attention_ref(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, backend="torch"), attention_ref(q, k, v))


_CAP_SCRIPT = r"""
import json, sys, torch
import cctk
from cctk.ops.fused_attention import attention
out = {"cap": torch.ops.cctk.cpu_capability()}
for dt in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 41, 24, generator=g).to(dt) for _ in range(3))
    out[str(dt)] = attention(q, k, v, backend="ext").float().tolist()
json.dump(out, sys.stdout)
"""


@needs_ext
def test_capability_paths_agree():
    """CCTK_CPU_CAPABILITY=scalar and avx512 (bf16 through fp32) agree with the best path."""
    results = results_per_capability(_CAP_SCRIPT, ("best", "avx512", "scalar"))
    assert results["scalar"]["cap"] == "scalar"
    for cap in ("avx512", "scalar"):
        for key in ("torch.float32", "torch.bfloat16"):
            tol = TOL[torch.float32] if key == "torch.float32" else dict(atol=3e-2, rtol=3e-2)
            torch.testing.assert_close(torch.tensor(results[cap][key]), torch.tensor(results["best"][key]), **tol)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_heads_split_into_query_tile_groups(dtype):
    # B*H = 3 heads over 2+ threads: heads are split into groups of query tiles, each packing its
    # head's K and V again; the result must not depend on the split
    q, k, v = _qkv(1, 3, 200, 64, dtype)
    torch.testing.assert_close(attention(q, k, v, backend="ext").double(), _ref64(q, k, v), **TOL[dtype])
