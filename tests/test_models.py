"""cctk.models: reference parameter counts and key layout, forward semantics, node taps, errors."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cctk.models import (
    CCT,
    REFERENCE_MODELS,
    NodeTap,
    create_model,
    list_models,
    model_config,
)

# Parameter counts published by SHI-Labs/Compact-Transformers README (CIFAR table, 10 classes,
# and ImageNet table, 1000 classes): (name, num_classes, published figure, last printed digit).
# (An older README printed 22.29M for CCT-14/7x2: that is the count without the positional
# embedding, 22,292,009.)
PUBLISHED = [
    ("cct_2_3x2_32", 10, 0.284e6, 1e3),
    ("cct_4_3x2_32", 10, 0.482e6, 1e3),
    ("cct_6_3x2_32", 10, 3.327e6, 1e3),
    ("cct_7_3x2_32", 10, 3.853e6, 1e3),
    ("cct_7_3x1_32", 10, 3.760e6, 1e3),
    # the README's CCT-6/3x1 figure (3.168M) counts no positional embedding: it is the count of
    # trainable parameters of the sine variant (learnable: 3.234M)
    ("cct_6_3x1_32_sine", 10, 3.168e6, 1e3),
    ("cct_14_7x2_224", 1000, 22.36e6, 1e4),
    ("cct_14_7x2_384", 1000, 22.51e6, 1e4),
]


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _tokens_after(n, kernel, stride, padding, n_conv):
    for _ in range(n_conv):
        n = (n + 2 * padding - kernel) // stride + 1  # conv
        n = (n + 2 * 1 - 3) // 2 + 1  # max-pool 3/2/1
    return n * n


def reference_layout(name, num_classes=None, positional_embedding=None, img_size=None, in_channels=None):
    """Keys and shapes of the reference's state dict, written from its architecture formulas
    (independent of cctk's module code)."""
    fam = {2: (128, 1), 4: (128, 1), 6: (256, 2), 7: (256, 2), 14: (384, 3)}
    parts = name.split("_")
    L = int(parts[1])
    k, n_conv = (int(s) for s in parts[2].split("x"))
    img = img_size or int(parts[3])
    d, mlp = fam[L]
    ff = d * mlp
    pe = positional_embedding or ("sine" if "sine" in parts else "learnable")
    classes = num_classes or (100 if "c100" in parts else 102 if ("fl" in parts or img == 224 and L == 7)
                              else 1000 if L == 14 else 10)
    cin = in_channels or (1 if img in (8, 28) else 3)
    stride, padding = max(1, k // 2 - 1), max(1, k // 2)
    T = _tokens_after(img, k, stride, padding, n_conv)
    chans = [cin] + [64] * (n_conv - 1) + [d]
    sd = {}
    for i in range(n_conv):
        sd[f"tokenizer.conv_layers.{i}.0.weight"] = (chans[i + 1], chans[i], k, k)
    sd["classifier.attention_pool.weight"] = (1, d)
    sd["classifier.attention_pool.bias"] = (1,)
    if pe != "none":
        sd["classifier.positional_emb"] = (1, T, d)
    for b in range(L):
        p = f"classifier.blocks.{b}."
        sd[p + "pre_norm.weight"] = (d,)
        sd[p + "pre_norm.bias"] = (d,)
        sd[p + "self_attn.qkv.weight"] = (3 * d, d)
        sd[p + "self_attn.proj.weight"] = (d, d)
        sd[p + "self_attn.proj.bias"] = (d,)
        sd[p + "linear1.weight"] = (ff, d)
        sd[p + "linear1.bias"] = (ff,)
        sd[p + "norm1.weight"] = (d,)
        sd[p + "norm1.bias"] = (d,)
        sd[p + "linear2.weight"] = (d, ff)
        sd[p + "linear2.bias"] = (d,)
    sd["classifier.norm.weight"] = (d,)
    sd["classifier.norm.bias"] = (d,)
    sd["classifier.fc.weight"] = (classes, d)
    sd["classifier.fc.bias"] = (classes,)
    return sd, T


def reference_forward(sd, x, cfg):
    """The reference CCT forward written with functional ops from a state dict (eval mode)."""
    n_conv, k = cfg["n_conv_layers"], cfg["kernel_size"]
    s, p = max(1, k // 2 - 1), max(1, k // 2)
    for i in range(n_conv):
        x = F.max_pool2d(F.relu(F.conv2d(x, sd[f"tokenizer.conv_layers.{i}.0.weight"], stride=s, padding=p)),
                         3, 2, 1)
    x = x.flatten(2, 3).transpose(-2, -1)
    if "classifier.positional_emb" in sd:
        x = x + sd["classifier.positional_emb"]
    d, H = cfg["embedding_dim"], cfg["num_heads"]
    B, T, _ = x.shape
    for b in range(cfg["num_layers"]):
        g = lambda n: sd[f"classifier.blocks.{b}.{n}"]  # noqa: E731
        y = F.layer_norm(x, (d,), g("pre_norm.weight"), g("pre_norm.bias"))
        qkv = (y @ g("self_attn.qkv.weight").T).reshape(B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)
        a = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) / math.sqrt(d // H), dim=-1) @ qkv[2]
        a = a.transpose(1, 2).reshape(B, T, d) @ g("self_attn.proj.weight").T + g("self_attn.proj.bias")
        x = F.layer_norm(x + a, (d,), g("norm1.weight"), g("norm1.bias"))
        h = F.gelu(x @ g("linear1.weight").T + g("linear1.bias"))
        x = x + h @ g("linear2.weight").T + g("linear2.bias")
    x = F.layer_norm(x, (d,), sd["classifier.norm.weight"], sd["classifier.norm.bias"])
    w = torch.softmax(x @ sd["classifier.attention_pool.weight"].T + sd["classifier.attention_pool.bias"], dim=1)
    pooled = (w.transpose(-1, -2) @ x).squeeze(-2)
    return pooled @ sd["classifier.fc.weight"].T + sd["classifier.fc.bias"]


# ---------------------------------------------------------------------------------------------
# registry, counts, layout
# ---------------------------------------------------------------------------------------------
def test_registry_has_every_reference_model():
    expected = {
        "cct_2_3x2_32", "cct_2_3x2_32_sine", "cct_4_3x2_32", "cct_4_3x2_32_sine",
        "cct_6_3x1_32", "cct_6_3x1_32_sine", "cct_6_3x2_32", "cct_6_3x2_32_sine",
        "cct_7_3x1_32", "cct_7_3x1_32_sine", "cct_7_3x1_32_c100", "cct_7_3x1_32_sine_c100",
        "cct_7_3x2_32", "cct_7_3x2_32_sine", "cct_7_7x2_224", "cct_7_7x2_224_sine",
        "cct_14_7x2_224", "cct_14_7x2_384", "cct_14_7x2_384_fl",
    }
    assert set(REFERENCE_MODELS) == expected
    assert expected < set(list_models())
    assert {"cct_2_3x1_8", "cct_2_3x2_28"} < set(list_models())
    assert model_config("cct_14_7x2_224")["stride"] == 2 and model_config("cct_14_7x2_224")["padding"] == 3
    assert model_config("cct_7_3x1_32")["stride"] == 1 and model_config("cct_7_3x1_32")["padding"] == 1


@pytest.mark.parametrize("name,num_classes,figure,unit", PUBLISHED)
def test_param_count_matches_published(name, num_classes, figure, unit):
    # the CIFAR figures are rounded, the ImageNet ones truncated, to the printed digits
    count = _trainable(model := create_model(name, num_classes=num_classes))
    assert abs(count - figure) <= unit / 2 or 0 <= count - figure < unit, (count, figure)
    assert model.num_classes == num_classes


@pytest.mark.parametrize("name", REFERENCE_MODELS + ("cct_2_3x1_8", "cct_2_3x2_28_sine"))
def test_reference_layout_loads_strict(name):
    layout, T = reference_layout(name)
    model = create_model(name)
    assert model.seq_len == T
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == layout
    # exact count = sum over the reference layout
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for s in layout.values())
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=g) for k, s in layout.items()}
    model.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])


def test_reference_layout_none_pe_and_overrides():
    layout, _ = reference_layout("cct_7_3x1_32", num_classes=100, positional_embedding="none")
    model = create_model("cct_7_3x1_32", num_classes=100, positional_embedding="none")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    layout, T = reference_layout("cct_6_3x2_32", img_size=64, in_channels=1)
    model = create_model("cct_6_3x2_32", img_size=64, in_channels=1)
    assert model.seq_len == T == 256
    model.load_state_dict({k: torch.zeros(s) for k, s in layout.items()}, strict=True)


def test_sine_embedding_is_fixed_parameter():
    model = create_model("cct_2_3x1_8_sine")
    pe = model.classifier.positional_emb
    assert isinstance(pe, nn.Parameter) and not pe.requires_grad
    assert "classifier.positional_emb" in model.state_dict()
    T, d = model.seq_len, model.embed_dim
    expect = torch.tensor([[p / 10000 ** (2 * (i // 2) / d) for i in range(d)] for p in range(T)])
    expect[:, 0::2] = torch.sin(expect[:, 0::2])
    expect[:, 1::2] = torch.cos(expect[:, 1::2])
    assert torch.equal(pe[0], expect)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert pe.grad is None and model.tokenizer.conv_layers[0][0].weight.grad is not None


def test_drop_path_per_sample():
    from cctk.models import DropPath

    dp = DropPath(0.5).train()
    x = torch.ones(1000, 3, 4)
    y = dp(x)
    per_sample = y.flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 2).all(1))  # x / keep or 0, per sample
    assert 400 < int((per_sample[:, 0] == 2).sum()) < 600
    assert torch.equal(dp.eval()(x), x)


def test_initialisation_matches_reference():
    torch.manual_seed(0)
    model = create_model("cct_7_3x1_32")
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight
            assert w.abs().max() <= 2.0 and abs(w.std().item() - 0.02) < 0.02 * 0.35 + 0.006, name
            if w.numel() > 10000:
                assert abs(w.std().item() - 0.02) < 0.002, name
            if m.bias is not None:
                assert torch.all(m.bias == 0), name
        elif isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
        elif isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            assert m.bias is None
            assert abs(m.weight.std().item() / math.sqrt(2 / fan_in) - 1) < 0.05, name
    pe = model.classifier.positional_emb
    assert pe.requires_grad and abs(pe.std().item() - 0.2) < 0.01 and pe.abs().max() <= 2.0
    # stochastic depth: linspace(0, 0.1, L); block 0 has none; reference dropout defaults
    dp = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert dp == pytest.approx(torch.linspace(0, 0.1, 7).tolist())
    assert isinstance(model.blocks[0].drop_path, nn.Identity)
    assert model.blocks[0].self_attn.attn_drop.p == 0.1
    assert model.blocks[0].dropout1.p == 0.0 and model.classifier.dropout.p == 0.0


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_models())
def test_forward_shapes_every_model(name):
    model = create_model(name).eval()
    cfg = model.config
    batch = 1 if cfg["img_size"] >= 224 else 2
    x = torch.randn(batch, cfg["in_channels"], cfg["img_size"], cfg["img_size"])
    with torch.no_grad():
        y = model(x)
    assert y.shape == (batch, cfg["num_classes"])
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["cct_2_3x2_32", "cct_7_3x1_32_sine", "cct_2_3x1_8"])
def test_forward_matches_functional_reference(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    cfg = model.config
    x = torch.randn(2, cfg["in_channels"], cfg["img_size"], cfg["img_size"])
    sd = model.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(sd, x, cfg), rtol=1e-4, atol=1e-5)


def test_forward_features_fc_and_tokens():
    model = create_model("cct_2_3x2_28").eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (3, model.embed_dim)
        torch.testing.assert_close(model.fc(feats), model(x), rtol=0, atol=0)
        z = model.tokens(x)
        assert z.shape == (3, model.seq_len, model.embed_dim)
        torch.testing.assert_close(z, model.tokenizer(x) + model.classifier.positional_emb)
        for i, blk in enumerate(model.blocks):
            z = blk(z)
        torch.testing.assert_close(model.classifier.pool(model.classifier.norm(z)), feats)
    assert model.blocks is model.classifier.blocks and model.fc is model.classifier.fc
    assert (model.num_blocks, model.num_heads, model.embed_dim, model.head_dim, model.ff_dim,
            model.num_classes, model.seq_len) == (2, 2, 128, 64, 128, 10, 49)


def test_bf16_forward_close_to_fp32():
    model = create_model("cct_2_3x1_8").eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        y = model(x)
        yb = model.to(torch.bfloat16)(x.bfloat16()).float()
    torch.testing.assert_close(yb, y, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------
# taps
# ---------------------------------------------------------------------------------------------
class RecordingTap(NodeTap):
    def __init__(self):
        self.attn, self.ff, self.streams, self.qkv = {}, {}, {}, {}

    def attention(self, block, q, k, v, dropout_p):
        o = super().attention(block, q, k, v, dropout_p)
        self.qkv[block] = (q, k, v, dropout_p)
        self.attn[block] = o
        return o

    def ff_hidden(self, block, x, linear1):
        h = super().ff_hidden(block, x, linear1)
        self.ff[block] = h
        return h

    def stream(self, block, where, x):
        self.streams[(block, where)] = x


class ExplicitSoftmaxTap(NodeTap):
    def attention(self, block, q, k, v, dropout_p):
        s = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1])
        p = torch.exp(s - s.amax(-1, keepdim=True))
        return torch.einsum("bhts,bhsd->bhtd", p / p.sum(-1, keepdim=True), v)


def test_recording_tap_is_transparent_and_shapes():
    torch.manual_seed(0)
    model = create_model("cct_4_3x2_28").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        plain = model(x)
        tap = RecordingTap()
        with model.tapped(tap):
            tapped = model(x)
        assert model.tap is None
        torch.testing.assert_close(tapped, plain, rtol=1e-5, atol=1e-5)
        B, H, T, dh, d, dff = 2, model.num_heads, model.seq_len, model.head_dim, model.embed_dim, model.ff_dim
        assert sorted(tap.attn) == list(range(model.num_blocks)) == sorted(tap.ff)
        assert set(tap.streams) == {(b, w) for b in range(model.num_blocks) for w in ("mha", "ff")} | {(0, "tokens")}
        z = model.tokens(x)
        torch.testing.assert_close(tap.streams[(0, "tokens")], z)   # the stream entering block 0
        for b, blk in enumerate(model.blocks):
            assert tap.attn[b].shape == (B, H, T, dh)
            assert all(t.shape == (B, H, T, dh) for t in tap.qkv[b][:3]) and tap.qkv[b][3] == 0.0
            assert tap.ff[b].shape == (B, T, dff)
            assert tap.streams[(b, "mha")].shape == tap.streams[(b, "ff")].shape == (B, T, d)
            # MHA nodes (h*d_h + j) feed the output projection; the 'mha' stream is norm1(z + proj)
            concat = tap.attn[b].transpose(1, 2).reshape(B, T, d)
            z_mha = blk.norm1(z + blk.self_attn.proj(concat))
            torch.testing.assert_close(tap.streams[(b, "mha")], z_mha, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tap.ff[b], F.gelu(blk.linear1(z_mha)), rtol=1e-5, atol=1e-5)
            z = z_mha + blk.linear2(tap.ff[b])
            torch.testing.assert_close(tap.streams[(b, "ff")], z, rtol=1e-5, atol=1e-5)
            z = tap.streams[(b, "ff")]
        torch.testing.assert_close(model.classifier.pool(model.classifier.norm(z)), model.forward_features(x))


def test_explicit_softmax_tap_same_logits_and_grads():
    torch.manual_seed(0)
    model = create_model("cct_2_3x2_32_sine").eval()
    x = torch.randn(2, 3, 32, 32)
    plain = model(x)
    plain.square().sum().backward()
    g_plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_tap(ExplicitSoftmaxTap())
    out = model(x)
    out.square().sum().backward()
    model.set_tap(None)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    for n, g in g_plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-5)


def test_training_mode_dropout_same_with_base_tap():
    model = create_model("cct_2_3x1_8", dropout=0.1).train()
    x = torch.randn(4, 1, 8, 8)
    torch.manual_seed(3)
    y1 = model(x)
    torch.manual_seed(3)
    with model.tapped(NodeTap()):
        y2 = model(x)
    torch.manual_seed(4)
    y3 = model(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert not torch.allclose(y1, y3)  # dropout / attention dropout / drop-path active
    tap = RecordingTap()
    with model.tapped(tap):
        model(x)
    assert tap.qkv[0][3] == pytest.approx(0.1)


def test_set_tap_rejects_non_taps():
    model = create_model("cct_2_3x1_8")
    with pytest.raises(TypeError, match="NodeTap"):
        model.set_tap(object())


def test_replacing_linears_with_wrappers():
    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    torch.manual_seed(0)
    model = create_model("cct_2_3x1_8").eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        plain = model(x)
        for blk in model.blocks:
            blk.linear1 = Wrapped(blk.linear1)
            blk.linear2 = Wrapped(blk.linear2)
            blk.self_attn.qkv = Wrapped(blk.self_attn.qkv)
            blk.self_attn.proj = Wrapped(blk.self_attn.proj)
        model.fc = Wrapped(model.fc)
        assert isinstance(model.classifier.fc, Wrapped) and "fc.inner.weight" not in model.state_dict()
        out = model(x)
        with model.tapped(RecordingTap()):
            out_tapped = model(x)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    torch.testing.assert_close(out_tapped, plain, rtol=1e-5, atol=1e-5)
    assert model.blocks[0].linear1.calls == 2 and model.blocks[1].self_attn.qkv.calls == 2
    assert model.fc.calls == 2


def test_config_rebuilds_same_architecture():
    model = create_model("cct_7_3x1_32", num_classes=37, positional_embedding="sine", dropout=0.05)
    again = create_model(**model.config)
    assert again.config == model.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    direct = CCT(img_size=16, embedding_dim=32, num_heads=2, num_layers=1, kernel_size=3, stride=1, padding=1,
                 num_classes=3, in_channels=1)
    rebuilt = CCT.from_config(direct.config)
    assert rebuilt.config == direct.config and rebuilt.seq_len == direct.seq_len == 64


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="cct_7_3x1_32") as e:
        create_model("cct_99")
    assert "cct_2_3x1_8" in str(e.value)
    with pytest.raises(ValueError, match="known models"):
        model_config("nope")


def test_wrong_image_size_and_channels():
    model = create_model("cct_7_3x1_32")
    with pytest.raises(ValueError, match="img_size=32"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="3-channel"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 32, 32))
    free = create_model("cct_2_3x1_8", positional_embedding="none").eval()
    assert free(torch.randn(1, 1, 16, 16)).shape == (1, 10)  # no PE: any size


def test_bad_arguments():
    with pytest.raises(ValueError, match="positional_embedding"):
        create_model("cct_2_3x1_8", positional_embedding="rope")
    with pytest.raises(TypeError, match="unknown argument"):
        create_model("cct_2_3x1_8", embed_dim=64)
    with pytest.raises(ValueError, match="divisible"):
        create_model("cct_2_3x1_8", num_heads=3)
    with pytest.raises(ValueError, match="too small"):
        create_model("cct_2_3x1_8", img_size=2, padding=0)
    with pytest.raises(ValueError, match="img_size=8"):
        create_model("cct_2_3x1_8", padding=0)(torch.randn(1, 1, 2, 2))


@pytest.mark.parametrize("in_channels", [1, 3])
def test_cpu_training_keeps_conv_weights_channels_last_with_the_same_values_and_gradients(in_channels):
    """``model.train()`` on the CPU makes the tokenizer's conv weights channels-last in place (the
    same Parameter objects, the same values and state_dict; with one input channel too, where a
    weight is contiguous in both layouts and only its strides choose the kernel); a training
    step gives the NCHW model's loss and gradients."""
    torch.manual_seed(0)
    m = create_model("cct_2_3x2_32", num_classes=10, img_size=16, in_channels=in_channels).eval()
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    params = list(m.parameters())
    old = {n: p.detach().clone() for n, p in m.named_parameters()}
    nchw = create_model("cct_2_3x2_32", num_classes=10, img_size=16, in_channels=in_channels)
    nchw.load_state_dict(ref)
    m.train()
    convs = [c for c in m.tokenizer.conv_layers.modules() if isinstance(c, nn.Conv2d)]
    for c in convs:
        assert c.weight.stride() == torch.empty_like(c.weight, memory_format=torch.channels_last).stride()
    after = list(m.parameters())
    assert len(after) == len(params) and all(a is b for a, b in zip(after, params))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in ref.items())
    # the NCHW twin: same weights, conv weights left in the default layout (training flags set by hand)
    for mod in nchw.modules():
        mod.training = True
    assert not nchw.tokenizer.conv_layers[0][0].weight.is_contiguous(memory_format=torch.channels_last) \
        or in_channels == 1
    x, y = torch.randn(6, in_channels, 16, 16), torch.randint(0, 10, (6,))
    losses = []
    for model in (m, nchw):
        torch.manual_seed(1)   # the same dropout / stochastic-depth draws
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for (n, p), (_, q) in zip(m.named_parameters(), nchw.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
        assert torch.equal(p.detach(), old[n])
