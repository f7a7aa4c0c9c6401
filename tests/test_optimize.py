"""cctk.optimize, the fused linear epilogues and structured node removal."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cctk
from capability import results_per_capability
from cctk import _ext
from cctk.models import create_model
from cctk.nn import ANDCLinear
from cctk.nn.fused import OneDNNLinear, linear_gelu, linear_residual, onednn_fusion_available
from cctk.ops.block_sparse import bsr_linear_epilogue, dense_to_bsr
from cctk.prune import PrunePlan, apply_masks, convert_to_andc, encoder_linear_names
from cctk.prune.masks import block_grid
from cctk.prune.structured import node_fraction_keep, remove_nodes

HAS_EXT = _ext.supports("cpu")


def _sparse(out_f, in_f, B, dtype, seed=0, density=0.5):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    mask = torch.rand(-(-out_f // B), -(-in_f // B), generator=g) < density
    mask[0, 0] = True
    return ANDCLinear.from_dense(lin, mask, B).to(dtype)


def _want(m, x, activation, residual):
    y = F.linear(x.double(), m.to_dense().double(), None if m.bias is None else m.bias.double())
    if activation == "gelu":
        y = F.gelu(y)
    return y if residual is None else y + residual.double()


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [16, 32, 64])
@pytest.mark.parametrize("activation,with_residual", [("gelu", False), ("none", True), ("gelu", True)])
def test_epilogue_matches_reference(B, dtype, activation, with_residual):
    m = _sparse(130, 70, B, dtype)
    x = torch.randn(3, 37, 70).to(dtype)  # 111 rows: a ragged last token tile
    r = torch.randn(3, 37, 130).to(dtype) if with_residual else None
    with torch.no_grad():
        got = m.forward_epilogue(x, activation=activation, residual=r)
    assert got.shape == (3, 37, 130) and got.dtype == dtype
    torch.testing.assert_close(got.double(), _want(m, x, activation, r), **TOL[dtype])


def test_epilogue_large_streamed_output():
    # >= 4 MiB outputs take the non-temporal store path: the epilogue must run there too
    m = _sparse(512, 256, 32, torch.float32, density=0.25)
    x, r = torch.randn(2100, 256), torch.randn(2100, 512)
    with torch.no_grad():
        got = m.forward_epilogue(x, activation="gelu", residual=r)
    torch.testing.assert_close(got.double(), _want(m, x, "gelu", r), **TOL[torch.float32])


def test_epilogue_with_autograd_uses_the_differentiable_path():
    m = _sparse(48, 40, 16, torch.float32)
    x = torch.randn(5, 40, requires_grad=True)
    r = torch.randn(5, 48, requires_grad=True)
    y = m.forward_epilogue(x, activation="gelu", residual=r)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    r2 = r.detach().clone().requires_grad_(True)
    (F.gelu(F.linear(x2, m.to_dense(), m.bias)) + r2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.grad, r2.grad)
    assert m.values.grad is not None and m.bias.grad is not None


def test_epilogue_bad_inputs():
    m = _sparse(48, 40, 16, torch.float32)
    x = torch.randn(5, 40)
    with pytest.raises(ValueError, match="activation"):
        m.forward_epilogue(x, activation="relu")
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        m.forward_epilogue(x, residual=torch.randn(5, 47))
    with pytest.raises(TypeError, match="residual must be torch.float32"):
        m.forward_epilogue(x, residual=torch.randn(5, 48).double())
    with pytest.raises(ValueError, match="expects x of shape"):
        m.forward_epilogue(torch.randn(5, 41))
    if HAS_EXT:
        with pytest.raises(RuntimeError, match="activation must be 'none' or 'gelu'"):
            torch.ops.cctk.bsr_linear_epilogue(x, m.values, m.crow_indices, m.col_indices, m.bias, 48, "tanh", None)
        with pytest.raises(RuntimeError, match="residual must have the output's shape"):
            torch.ops.cctk.bsr_linear_epilogue(x, m.values, m.crow_indices, m.col_indices, m.bias, 48, "none",
                                               torch.randn(4, 48))


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
def test_epilogue_opcheck():
    m = _sparse(48, 40, 16, torch.float32)
    x, r = torch.randn(7, 40), torch.randn(7, 48)
    values, bias = m.values.detach(), m.bias.detach()
    for act, res in (("gelu", None), ("none", r), ("gelu", r)):
        torch.library.opcheck(torch.ops.cctk.bsr_linear_epilogue.default,
                              (x, values, m.crow_indices, m.col_indices, bias, 48, act, res))
    with pytest.raises(RuntimeError, match="forward-only"):
        torch.ops.cctk.bsr_linear_epilogue(x.requires_grad_(True), values, m.crow_indices, m.col_indices, bias,
                                           48, "gelu", None).sum().backward()


_CAP_SCRIPT = r"""
import json, sys, torch
import cctk
from cctk.nn import ANDCLinear
torch.manual_seed(0)
out = {}
for dt in (torch.float32, torch.bfloat16):
    lin = torch.nn.Linear(70, 130)
    m = ANDCLinear.from_dense(lin, torch.rand(5, 3) < 0.6, 32).to(dt)
    x, r = torch.randn(37, 70).to(dt), torch.randn(37, 130).to(dt)
    with torch.no_grad():
        out[str(dt)] = m.forward_epilogue(x, activation="gelu", residual=r).float().tolist()
json.dump(out, sys.stdout)
"""


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
def test_epilogue_capability_paths_agree():
    """The scalar / AVX2 paths (epilogue as a separate pass) agree with the fused AVX-512 one."""
    res = results_per_capability(_CAP_SCRIPT, ("best", "avx2", "scalar"))
    for cap in ("avx2", "scalar"):
        torch.testing.assert_close(torch.tensor(res[cap]["torch.float32"]), torch.tensor(res["best"]["torch.float32"]),
                                   atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(torch.tensor(res[cap]["torch.bfloat16"]),
                                   torch.tensor(res["best"]["torch.bfloat16"]), atol=5e-2, rtol=3e-2)


def test_linear_epilogue_helpers_on_dense_linears():
    lin = nn.Linear(20, 30)
    x, r = torch.randn(4, 20), torch.randn(4, 30)
    torch.testing.assert_close(linear_gelu(lin, x), F.gelu(lin(x)))
    torch.testing.assert_close(linear_residual(lin, x, r), r + lin(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_linear_epilogues_equal_the_plain_ops(dtype):
    """OneDNNLinear: GELU / residual add as oneDNN post-ops (where oneDNN runs the dtype here; else
    the plain ops), the same function as nn.Linear's, sharing its parameters and state dict."""
    torch.manual_seed(0)
    lin = nn.Linear(70, 33).to(dtype)
    fused = OneDNNLinear.from_linear(lin)
    assert fused.weight is lin.weight and fused.state_dict().keys() == lin.state_dict().keys()
    x, r = torch.randn(3, 5, 70).to(dtype), torch.randn(3, 5, 33).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    with torch.no_grad():
        torch.testing.assert_close(linear_gelu(fused, x).float(), F.gelu(lin(x).float()), **tol)
        torch.testing.assert_close(linear_residual(fused, x, r).float(), (r + lin(x)).float(), **tol)
        torch.testing.assert_close(fused(x), lin(x))
    if onednn_fusion_available(dtype):  # one post-op per GEMM: asking for both is an error, not a silent drop
        with pytest.raises(ValueError, match="either"), torch.no_grad():
            fused.forward_epilogue(x, activation="gelu", residual=r)
    # autograd: nn.Linear's own path, gradients flow
    lin32 = nn.Linear(8, 4)
    f32 = OneDNNLinear.from_linear(lin32)
    xg = torch.randn(2, 8, requires_grad=True)
    linear_gelu(f32, xg).sum().backward()
    assert xg.grad is not None and lin32.weight.grad is not None


# ---------------------------------------------------------------------------------------------
def _random_pruned(model, density=0.25, block=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name in encoder_linear_names(model):
        nbr, nbc = block_grid(model.get_submodule(name).weight.shape, block)
        m = torch.zeros(nbr * nbc, dtype=torch.bool)
        m[torch.randperm(nbr * nbc, generator=g)[:max(1, round(density * nbr * nbc))]] = True
        masks[name] = m.view(nbr, nbc)
    pruned = copy.deepcopy(model)
    apply_masks(pruned, PrunePlan(method="random", block_size=block, block_masks=masks, classifier_mask=None))
    return convert_to_andc(pruned).eval()


def _check_equal(model, x, dtype):
    with torch.enable_grad():
        ref = model(x)  # the reference (training-path) computation: SDPA, unfused, fp32
    fast = cctk.optimize(model, dtype=dtype, sample_input=x)  # tuned on the test's own small batch
    with torch.no_grad():
        got = fast(x)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref.detach(), atol=1e-4, rtol=1e-4)
    else:  # bf16 weights and activations: logits within bf16 rounding of the logit scale
        err = (got.float() - ref.detach()).abs().max().item()
        assert err <= 0.05 * max(ref.abs().max().item(), 1.0), err
    return fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimize_dense_and_pruned_cct7(dtype):
    torch.manual_seed(0)
    dense = create_model("cct_7_3x1_32", num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = _check_equal(dense, x, dtype)
    assert all(b.fused_epilogues for b in fast.blocks) and not fast.training
    assert all(not p.requires_grad for p in fast.parameters())
    assert fast.tokenizer.conv_layers[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert dense.blocks[0].fused_epilogues is False and dense.blocks[0].linear1.weight.dtype == torch.float32
    _check_equal(_random_pruned(dense), x, dtype)


def test_optimize_demo_pruned_model_and_any_module():
    # the demo's model: cct_2_3x1_8 (digits), 16 x 16 blocks at 50%
    torch.manual_seed(0)
    small = create_model("cct_2_3x1_8", num_classes=10, in_channels=1).eval()
    _check_equal(_random_pruned(small, density=0.5, block=16), torch.randn(5, 1, 8, 8), torch.float32)
    _check_equal(_random_pruned(small, density=0.5, block=16), torch.randn(5, 1, 8, 8), torch.bfloat16)
    seq = nn.Sequential(_sparse(64, 48, 16, torch.float32), nn.GELU(), _sparse(10, 64, 16, torch.float32, seed=1))
    x = torch.randn(6, 48)
    fast = cctk.optimize(seq, dtype=torch.bfloat16)
    assert isinstance(fast[0], ANDCLinear) and fast[0].values.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(fast(x).float(), seq(x), atol=5e-2, rtol=5e-2)


def test_optimize_bad_input_and_no_double_optimize():
    m = create_model("cct_2_3x1_8", num_classes=10, in_channels=1)
    with pytest.raises(TypeError, match="nn.Module"):
        cctk.optimize("model")
    with pytest.raises(TypeError, match="dtype must be one of"):
        cctk.optimize(m, dtype=torch.int8)
    fast = cctk.optimize(m, dtype=torch.float32)
    with pytest.raises(ValueError, match="already returned by cctk.optimize"):
        cctk.optimize(fast)
    assert m.training  # the input model is untouched


def test_optimize_compile_has_no_graph_breaks():
    torch.manual_seed(0)
    small = _random_pruned(create_model("cct_2_3x1_8", num_classes=10, in_channels=1).eval(), 0.5, 16)
    x = torch.randn(3, 1, 8, 8)
    compiled = cctk.optimize(small, dtype=torch.float32, compile=True)  # fullgraph=True: a break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), small(x), atol=1e-4, rtol=1e-4)


def test_onednn_layers_compile_without_graph_breaks():
    """A tuned model whose layers hold OneDNNLinear (the tuner's pick on some CPUs) still compiles
    with fullgraph=True: under torch.compile the layer runs the plain ops."""
    from cctk.optimize import _onednn_linears
    torch.manual_seed(0)
    m = create_model("cct_2_3x1_8", num_classes=10, in_channels=1).eval()
    fast = cctk.optimize(m, dtype=torch.float32, tune=False)
    swapped = [_onednn_linears(blk, torch.float32) for blk in fast.classifier.blocks]
    assert all(swapped) == onednn_fusion_available(torch.float32)
    x = torch.randn(3, 1, 8, 8)
    compiled = torch.compile(fast, dynamic=False, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(compiled(x), m(x), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
def test_remove_nodes_equals_the_node_masked_model():
    torch.manual_seed(0)
    m = create_model("cct_7_3x1_32", num_classes=10).eval()
    ff, heads = node_fraction_keep(m, 0.25, seed=3)
    small = remove_nodes(m, ff, heads)
    masked = copy.deepcopy(m)
    with torch.no_grad():
        for b, blk in enumerate(masked.blocks):
            drop = torch.ones(blk.linear1.out_features, dtype=torch.bool)
            drop[ff[b]] = False
            blk.linear1.weight[drop] = 0
            blk.linear1.bias[drop] = 0
            a = blk.self_attn
            dh = a.head_dim
            keep = torch.zeros(a.num_heads * dh, dtype=torch.bool)
            for h in range(a.num_heads):
                keep[h * dh + heads[b][h]] = True
            a.qkv.weight.view(3, -1, a.qkv.in_features)[:, ~keep] = 0
    assert small.blocks[0].linear1.out_features == 128 and small.blocks[0].self_attn.qkv.out_features == 3 * 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cctk.optimize(small, torch.float32)(x), masked(x), atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < 0.5 * sum(p.numel() for p in m.parameters())


def test_remove_nodes_bad_input():
    m = create_model("cct_2_3x1_8", num_classes=10, in_channels=1)
    with pytest.raises(TypeError, match="expects a CCT"):
        remove_nodes(nn.Linear(3, 3), {})
    with pytest.raises(ValueError, match="not in"):
        remove_nodes(m, {5: torch.tensor([0])})
    with pytest.raises(ValueError, match="distinct and in"):
        remove_nodes(m, {0: torch.tensor([0, 0])})
    with pytest.raises(ValueError, match="keep at least one"):
        remove_nodes(m, {0: torch.tensor([], dtype=torch.long)})
    with pytest.raises(ValueError, match=r"must be \(heads="):
        remove_nodes(m, head_dims_keep={0: torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="fraction"):
        node_fraction_keep(m, 0.0)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [256, 97, 1, 1030])
def test_layer_norm_matches_reference(d, dtype):
    from cctk.ops.normalization import layer_norm, layer_norm_ref
    x = (torch.randn(3, 37, d) * 4 + 2).to(dtype)
    w, b = (torch.randn(d) + 1).to(dtype), torch.randn(d).to(dtype)
    want = layer_norm_ref(x.double(), w.double(), b.double(), 1e-5)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-2, rtol=2e-2)
    for args in ((w, b), (None, None), (w, None)):
        want = layer_norm_ref(x.double(), *(None if t is None else t.double() for t in args), 1e-5)
        torch.testing.assert_close(layer_norm(x, *args).double(), want, **tol)
    strided = x.transpose(0, 1)  # non-contiguous input
    torch.testing.assert_close(layer_norm(strided, w, b).double(),
                               layer_norm_ref(strided.double(), w.double(), b.double(), 1e-5), **tol)


def test_layer_norm_grad_opcheck_and_bad_input():
    from cctk.ops.normalization import layer_norm
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.cctk.layer_norm(*a, 1e-5), (x, w, b))
    if HAS_EXT:
        xs = torch.randn(4, 7, 32)
        torch.library.opcheck(torch.ops.cctk.layer_norm.default, (xs, torch.randn(32), torch.randn(32), 1e-5))
        torch.library.opcheck(torch.ops.cctk.layer_norm.default, (xs, None, None, 1e-6))
    with pytest.raises(ValueError, match="weight must have shape"):
        layer_norm(torch.randn(3, 8), torch.randn(7))
    with pytest.raises(TypeError, match="bias must be torch.float32"):
        layer_norm(torch.randn(3, 8), None, torch.randn(8).double())
    with pytest.raises(TypeError, match="floating point"):
        layer_norm(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="eps"):
        layer_norm(torch.randn(3, 8), eps=-1.0)


def test_cctk_layer_norm_module_is_a_drop_in():
    from cctk.nn.layer_norm import LayerNorm
    ln = nn.LayerNorm(24)
    with torch.no_grad():
        ln.weight.normal_()
    fast = LayerNorm.from_torch(ln)
    assert fast.weight is ln.weight and fast.state_dict().keys() == ln.state_dict().keys()
    x = torch.randn(6, 24)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ln(x), atol=1e-5, rtol=1e-5)
    y = fast(x.requires_grad_(True))  # autograd on: torch's own layer norm
    y.sum().backward()
    assert x.grad is not None and ln.weight.grad is not None
    with pytest.raises(ValueError, match="last dimension only"):
        LayerNorm.from_torch(nn.LayerNorm((4, 24)))


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 32, 256, 3, 1, 1), (3, 1, 8, 64, 3, 1, 1), (2, 3, 37, 32, 7, 2, 3),
                                   (1, 5, 11, 40, 3, 1, 1)])
def test_conv_relu_maxpool_matches_reference(shape, dtype):
    from cctk.ops.conv_pool import conv_relu_maxpool, conv_relu_maxpool_ref
    B, C, H, Co, k, s, p = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, H + 2, generator=g).to(dtype)
    w = (torch.randn(Co, C, k, k, generator=g) * 0.3).to(dtype)
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):  # NCHW and NHWC inputs
        y = conv_relu_maxpool(xin, w, s, p, 3, 2, 1)
        want = conv_relu_maxpool_ref(x.double(), w.double(), s, p, 3, 2, 1)
        assert y.shape == want.shape and y.dtype == dtype
        assert y.is_contiguous(memory_format=torch.channels_last)
        tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=4e-2, rtol=1e-2)
        torch.testing.assert_close(y.double(), want, **tol)


def test_conv_relu_maxpool_bad_input_and_opcheck():
    from cctk.ops.conv_pool import conv_relu_maxpool
    x, w = torch.randn(2, 3, 8, 8), torch.randn(16, 3, 3, 3)
    with pytest.raises(ValueError, match="images"):
        conv_relu_maxpool(x[0], w)
    with pytest.raises(ValueError, match="weight must be"):
        conv_relu_maxpool(x, torch.randn(16, 2, 3, 3))
    with pytest.raises(TypeError, match="one dtype"):
        conv_relu_maxpool(x, w.double())
    with pytest.raises(ValueError, match="stride"):
        conv_relu_maxpool(x, w, stride=0)
    with pytest.raises(ValueError, match="too small"):
        conv_relu_maxpool(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 7, 7))
    with pytest.raises(ValueError, match="pool_padding"):
        conv_relu_maxpool(x, w, pool_kernel=2, pool_padding=2)
    if HAS_EXT:
        torch.library.opcheck(torch.ops.cctk.conv_relu_maxpool.default, (x, w, 1, 1, 3, 2, 1))
        with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
            torch.ops.cctk.conv_relu_maxpool(x.double(), w.double(), 1, 1, 3, 2, 1)


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
def test_optimized_tokenizer_runs_the_fused_stage(monkeypatch):
    import cctk.models.cct as cct_mod
    calls = []
    real = cct_mod.conv_relu_maxpool
    monkeypatch.setattr(cct_mod, "conv_relu_maxpool", lambda *a: calls.append(a[2:]) or real(*a))
    torch.manual_seed(0)
    m = create_model("cct_7_7x2_224", num_classes=5, img_size=64).eval()  # two 7x7 stride-2 stages
    fast = cctk.optimize(m, dtype=torch.float32, tune=False)  # tuning may prefer torch's stages here
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), atol=1e-4, rtol=1e-4)
    assert calls == [(2, 3, 3, 2, 1), (2, 3, 3, 2, 1)]
    assert fast.tokenizer.fused_stages() is not None
    with torch.enable_grad():  # autograd on: the torch modules, not the forward-only kernel
        calls.clear()
        fast(x)
        assert calls == []


# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [16, 32, 64])
def test_prepacked_weights_equal_on_the_fly_packing(B, dtype):
    from cctk.ops.block_sparse import bsr_pack_ref
    m = _sparse(130, 70, B, dtype)
    packed = torch.ops.cctk.bsr_pack(m.values.detach())
    assert torch.equal(packed, bsr_pack_ref(m.values.detach()))
    torch.library.opcheck(torch.ops.cctk.bsr_pack.default, (m.values.detach(),))
    x, r = torch.randn(37, 70).to(dtype), torch.randn(37, 130).to(dtype)
    with torch.no_grad():
        plain = m.forward_epilogue(x, activation="gelu", residual=r)
        m.inference_fast = True
        assert m.prepack()
        fast = m.forward_epilogue(x, activation="gelu", residual=r)
        assert torch.equal(fast, plain)
        m.values.mul_(2.0)  # the weights change: the pack is retired, never used stale
        torch.testing.assert_close(m.forward_epilogue(x).double(), _want(m, x, "none", None), **TOL[dtype])
        assert m._packed is None
    with pytest.raises(RuntimeError, match="bsr_pack"):
        torch.ops.cctk.bsr_linear_epilogue(x, m.values.detach(), m.crow_indices, m.col_indices, None, 130, "none",
                                           None, packed[:1])
