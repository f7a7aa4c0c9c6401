"""Compact Convolutional Transformer (CCT) of Hassani et al. 2021, with node taps.

Architecture, parameter names/shapes, initialisation and defaults follow the reference
implementation (SHI-Labs/Compact-Transformers, ``src/cct.py``, ``src/utils/tokenizer.py``,
``src/utils/transformers.py``), so its checkpoints load with a strict ``load_state_dict``::

    tokens   z_0 = flatten(maxpool(relu(conv(x))) ...)^T + E_pos        (B, T, d)
    block l  z' = z + DropPath(MHA(LN_pre(z)))            MHA: softmax(q k^T / sqrt(d_h)) v, proj
             z' = LN_1(z')                                (norm AFTER the attention residual)
             z  = z' + DropPath(Drop(W_2 Drop(GELU(W_1 z' + b_1)) + b_2))
    pool     p  = softmax_T(w_pool . LN(z) + b_pool)^T LN(z)                (B, d)
    logits   y  = W_fc p + b_fc

Node taps (see :class:`NodeTap`) expose, per block, the attention heads' outputs before the
output projection (MHA nodes, index h*d_h + j) and the FF hidden units after GELU (FF nodes),
and let those two computations be swapped (fused kernels). With no tap set the forward is the
plain computation: one ``tap is None`` check per sub-block.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from cctk._library import exporting
from cctk.nn.fused import linear_gelu, linear_residual
from cctk.ops.fused_attention import attention as cctk_attention
from cctk.ops.conv_pool import conv_relu_maxpool

POSITIONAL_EMBEDDINGS = ("learnable", "sine", "none")


# ----------------------------------------------------------------------------------------------
# plain computations (shared by the no-tap path and the NodeTap defaults)
# ----------------------------------------------------------------------------------------------
def attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                           scale: Optional[float] = None) -> torch.Tensor:
    """o = Dropout_p(softmax(q k^T * scale)) v, explicitly (q, k, v: (B, H, T, d_h); scale
    defaults to d_h**-0.5): the training form with the reference's dropout (the twin of the fused
    inference kernel is ``cctk.ops.attention_ref``).

    This is the reference's order of operations, dropout on the attention probabilities; the
    random numbers drawn match the reference's ``nn.Dropout`` on the same generator state.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    return attn @ v


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample: x * floor(keep + U[0,1)) / keep, keep = 1 - drop_prob.

    Same formula and random draw (one uniform per sample, shape (B, 1, ..., 1)) as the
    reference's ``DropPath`` (taken from timm).
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    """Stochastic depth module (reference ``src/utils/stochastic_depth.py``)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class NodeTap:
    """Base class of node taps: every method does the plain computation.

    Subclasses override only what they need (record, replace by a fused kernel, ...). ``block``
    is the integer block index.

    * ``attention(block, q, k, v, dropout_p) -> o``: q, k, v (B, H, T, d_h);
      o = softmax(q k^T * d_h**-0.5) v (dropout_p on the probabilities, > 0 only in training),
      shape (B, H, T, d_h). These are the MHA nodes (node h*d_h + j) before the projection.
    * ``ff_hidden(block, x, linear1) -> h``: x (B, T, d) the FF input (after norm1);
      h = GELU_erf(linear1(x)) (B, T, d_ff): the FF nodes.
    * ``stream(block, where, x)``: observes the residual stream; where="mha": after
      ``norm1(x + attn)``; where="ff": the block output; where="tokens" (block 0 only): the
      stream entering block 0 (tokenizer output plus positional embedding).
    """

    def attention(self, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  dropout_p: float) -> torch.Tensor:
        return attention_with_dropout(q, k, v, dropout_p)

    def ff_hidden(self, block: int, x: torch.Tensor, linear1: nn.Module) -> torch.Tensor:
        return F.gelu(linear1(x))

    def stream(self, block: int, where: str, x: torch.Tensor) -> None:
        return None


# ----------------------------------------------------------------------------------------------
# modules (reference names and registration order, so seeded inits match the reference)
# ----------------------------------------------------------------------------------------------
def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return max(0, (n + 2 * padding - kernel) // stride + 1)


class Tokenizer(nn.Module):
    """Convolutional tokenizer: n_conv_layers x [Conv2d(bias=False) -> ReLU -> MaxPool2d], then
    flatten the spatial grid into T tokens: (B, C, H, W) -> (B, T, d).

    Intermediate layers have ``in_planes`` (64) channels, as in the reference.
    """

    def __init__(self, kernel_size: int, stride: int, padding: int, pooling_kernel_size: int = 3,
                 pooling_stride: int = 2, pooling_padding: int = 1, n_conv_layers: int = 1,
                 n_input_channels: int = 3, n_output_channels: int = 64, in_planes: int = 64,
                 activation=nn.ReLU, max_pool: bool = True, conv_bias: bool = False):
        super().__init__()
        channels = [n_input_channels] + [in_planes] * (n_conv_layers - 1) + [n_output_channels]
        self.conv_layers = nn.Sequential(*[
            nn.Sequential(
                nn.Conv2d(channels[i], channels[i + 1], kernel_size=(kernel_size, kernel_size),
                          stride=(stride, stride), padding=(padding, padding), bias=conv_bias),
                nn.Identity() if activation is None else activation(),
                nn.MaxPool2d(kernel_size=pooling_kernel_size, stride=pooling_stride,
                             padding=pooling_padding) if max_pool else nn.Identity(),
            )
            for i in range(n_conv_layers)
        ])
        self.flattener = nn.Flatten(2, 3)
        self._geometry = (n_conv_layers, kernel_size, stride, padding, max_pool,
                          pooling_kernel_size, pooling_stride, pooling_padding)
        # set by cctk.optimize: on the CPU without autograd, each conv -> ReLU -> max-pool stage
        # runs as one cctk::conv_relu_maxpool pass (see fused_stages)
        self.fused = False
        self.apply(self.init_weight)

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size after the conv stack (closed form of the conv/pool output sizes)."""
        n, k, s, p, max_pool, pk, ps, pp = self._geometry
        for _ in range(n):
            height, width = _conv_out(height, k, s, p), _conv_out(width, k, s, p)
            if max_pool:
                height, width = _conv_out(height, pk, ps, pp), _conv_out(width, pk, ps, pp)
        return height, width

    def sequence_length(self, height: int = 224, width: int = 224) -> int:
        h, w = self.output_hw(height, width)
        return h * w

    def train(self, mode: bool = True) -> "Tokenizer":
        """Training on the CPU keeps the convolution weights channels-last (in place, the same
        Parameter objects): oneDNN then runs the convolutions and max-pooling vectorised over
        channels, forward and backward (cct_2_3x2_28, one core: a training step about 1.3x faster;
        docs/BENCHMARKS.md). The values, and what state_dict() holds, are unchanged."""
        super().train(mode)
        if mode:
            for conv in self.conv_layers.modules():
                w = getattr(conv, "weight", None) if isinstance(conv, nn.Conv2d) else None
                if w is None or w.device.type != "cpu":
                    continue
                # (strides compared, not is_contiguous: with one input channel a weight is both
                # layouts at once, and torch picks the kernel from the strides)
                cl = torch.empty_like(w.data, memory_format=torch.channels_last)
                if w.stride() != cl.stride():
                    w.data = cl.copy_(w.data)
        return self

    def fused_stages(self):
        """Per stage (conv weight, stride, padding, pool kernel, pool stride, pool padding) when
        every stage is Conv2d (no bias, square, groups 1, dilation 1) + ReLU + MaxPool2d (square,
        no dilation or ceil mode) in either order of ReLU and pool; else None."""
        stages = []
        for stage in self.conv_layers:
            mods = list(stage) if isinstance(stage, nn.Sequential) else []
            convs = [m for m in mods if isinstance(m, nn.Conv2d)]
            pools = [m for m in mods if isinstance(m, nn.MaxPool2d)]
            relus = [m for m in mods if isinstance(m, nn.ReLU)]
            if len(mods) != 3 or len(convs) != 1 or len(pools) != 1 or len(relus) != 1 or mods[0] is not convs[0]:
                return None
            c, p = convs[0], pools[0]
            square = lambda v: v[0] if isinstance(v, tuple) and len(set(v)) == 1 else v  # noqa: E731
            geo = [square(c.stride), square(c.padding), square(p.kernel_size), square(p.stride), square(p.padding)]
            if (c.bias is not None or c.groups != 1 or square(c.dilation) != 1 or c.kernel_size[0] != c.kernel_size[1]
                    or not all(isinstance(g, int) for g in geo) or isinstance(c.padding, str)
                    or p.dilation not in (1, (1, 1)) or p.ceil_mode or p.return_indices):
                return None
            stages.append((c.weight, *geo))
        return stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.device.type == "cpu" and not torch.is_grad_enabled():
            stages = self.fused_stages()
            if stages is not None:
                for weight, s, p, pk, ps, pp in stages:
                    x = conv_relu_maxpool(x, weight, s, p, pk, ps, pp)
                return self.flattener(x).transpose(-2, -1)
        return self.flattener(self.conv_layers(x)).transpose(-2, -1)

    @staticmethod
    def init_weight(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)


class Attention(nn.Module):
    """Multi-head self-attention: qkv = x W_qkv (no bias), split per head, o = softmax(q k^T /
    sqrt(d_h)) v, out = Drop(proj(concat_h o_h)).

    The inner width (H x head dims) is read off the qkv output at run time, so a structurally pruned
    layer (fewer dims per head: ``cctk.prune.remove_nodes``) keeps working; ``scale`` stays the
    trained model's ``d_h**-0.5``.
    """

    def __init__(self, dim: int, num_heads: int = 8, attention_dropout: float = 0.1,
                 projection_dropout: float = 0.1):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embedding_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.attn_drop = nn.Dropout(attention_dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(projection_dropout)
        # Switched on by cctk.optimize (or by hand): inference (no autograd) then runs
        # cctk.ops.attention, the fused CPU kernel. Off (the default), the model is stock
        # PyTorch (F.scaled_dot_product_attention) in every mode. Why the fused op lives only
        # inside cctk.optimize rather than decomposing "when traced": a model as built, trained
        # or loaded is then an ordinary torch module that torch.onnx.export (both exporters),
        # torch.export, torch.jit.trace and openvino.convert_model take as it is, with or
        # without no_grad, with no flag of torch's tracing internals to get right per exporter
        # (and no "graphs differed across invocations" from a forward that depends on the grad
        # mode); the fast path is asked for where speed is asked for. An optimized model still
        # decomposes the op if it is traced for export (cctk._library.exporting).
        self.fused_attention = False

    def split_heads(self, x: torch.Tensor):
        """qkv(x) (B, T, 3 H d_h) -> q, k, v each (B, H, T, d_h)."""
        B, N, _ = x.shape
        qkv = self.qkv(x)
        qkv = qkv.reshape(B, N, 3, self.num_heads, qkv.shape[-1] // (3 * self.num_heads)).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor, tap: Optional[NodeTap] = None, block: int = 0,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``proj(concat_h o_h)``, or ``residual + proj(...)`` (one fused epilogue where the
        projection has one) when ``residual`` is given (inference only: no projection dropout)."""
        B, N, _ = x.shape
        q, k, v = self.split_heads(x)
        p = self.attn_drop.p if self.training else 0.0
        if tap is None:
            if p > 0.0:
                o = attention_with_dropout(q, k, v, p, scale=self.scale)  # reference dropout on the probabilities
            elif (not self.fused_attention or (torch.is_grad_enabled() and x.requires_grad)
                  or exporting()):
                o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # stock torch; training
            else:
                o = cctk_attention(q, k, v, scale=self.scale)  # cctk.optimize: cctk's CPU kernel (else SDPA)
        else:
            o = tap.attention(block, q, k, v, p)
        x = o.transpose(1, 2).reshape(B, N, o.shape[1] * o.shape[3])
        if residual is not None:
            return linear_residual(self.proj, x, residual)
        return self.proj_drop(self.proj(x))


class TransformerEncoderLayer(nn.Module):
    """CCT encoder layer (reference order: the FF residual is added to the *normed* stream)::

        x = x + DropPath(MHA(pre_norm(x)))
        x = norm1(x)
        x = x + DropPath(dropout2(linear2(dropout1(GELU(linear1(x))))))
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 attention_dropout: float = 0.1, drop_path_rate: float = 0.1):
        super().__init__()
        self.pre_norm = nn.LayerNorm(d_model)
        self.self_attn = Attention(dim=d_model, num_heads=nhead, attention_dropout=attention_dropout,
                                   projection_dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        # set by cctk.optimize: in eval mode without a tap, run the residual adds and the GELU as
        # epilogues of the linears (the same function, in fewer passes over memory)
        self.fused_epilogues = False

    def forward_fused(self, src: torch.Tensor) -> torch.Tensor:
        """Inference forward with the epilogues fused: the same function as ``forward`` in eval mode."""
        src = self.self_attn(self.pre_norm(src), residual=src)
        src = self.norm1(src)
        return linear_residual(self.linear2, linear_gelu(self.linear1, src), src)

    def forward(self, src: torch.Tensor, tap: Optional[NodeTap] = None, block: int = 0) -> torch.Tensor:
        if self.fused_epilogues and tap is None and not self.training:
            return self.forward_fused(src)
        src = src + self.drop_path(self.self_attn(self.pre_norm(src), tap, block))
        src = self.norm1(src)
        if tap is None:
            hidden = F.gelu(self.linear1(src))
        else:
            tap.stream(block, "mha", src)
            hidden = tap.ff_hidden(block, src, self.linear1)
        src = src + self.drop_path(self.dropout2(self.linear2(self.dropout1(hidden))))
        if tap is not None:
            tap.stream(block, "ff", src)
        return src


def sinusoidal_embedding(n_positions: int, dim: int) -> torch.Tensor:
    """E[p, i] = sin(p / 10000^(2*floor(i/2)/dim)) for even i, cos(...) for odd i; (1, P, dim).

    Angles are computed in float64 and rounded to float32 before sin/cos, like the reference
    (Python floats -> FloatTensor -> torch.sin).
    """
    p = torch.arange(n_positions, dtype=torch.float64)[:, None]
    i = torch.arange(dim, dtype=torch.float64)[None, :]
    pe = (p / torch.pow(10000.0, 2.0 * torch.div(i, 2, rounding_mode="floor") / dim)).float()
    pe[:, 0::2] = torch.sin(pe[:, 0::2])
    pe[:, 1::2] = torch.cos(pe[:, 1::2])
    return pe.unsqueeze(0)


class TransformerClassifier(nn.Module):
    """Positional embedding + encoder blocks + final LayerNorm + sequence pooling + fc.

    ``positional_emb``: 'learnable' = Parameter (1, T, d), trunc_normal(std=0.2);
    'sine' = Parameter(requires_grad=False) holding :func:`sinusoidal_embedding` (in the state
    dict and in ``parameters()``, as in the reference); 'none' = None.
    Stochastic depth rate of block l: linspace(0, stochastic_depth, num_layers)[l].
    """

    def __init__(self, embedding_dim: int = 768, num_layers: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, num_classes: int = 1000, dropout: float = 0.1,
                 attention_dropout: float = 0.1, stochastic_depth: float = 0.1,
                 positional_embedding: str = "sine", sequence_length: Optional[int] = None):
        super().__init__()
        if positional_embedding not in POSITIONAL_EMBEDDINGS:
            raise ValueError(f"positional_embedding must be one of {POSITIONAL_EMBEDDINGS}, "
                             f"got {positional_embedding!r}")
        if sequence_length is None and positional_embedding != "none":
            raise ValueError(f"positional_embedding={positional_embedding!r} needs sequence_length")
        dim_feedforward = int(embedding_dim * mlp_ratio)
        self.embedding_dim = embedding_dim
        self.sequence_length = sequence_length
        self.seq_pool = True
        self.attention_pool = nn.Linear(embedding_dim, 1)
        if positional_embedding == "learnable":
            self.positional_emb = nn.Parameter(torch.zeros(1, sequence_length, embedding_dim),
                                               requires_grad=True)
            nn.init.trunc_normal_(self.positional_emb, std=0.2)
        elif positional_embedding == "sine":
            self.positional_emb = nn.Parameter(sinusoidal_embedding(sequence_length, embedding_dim),
                                               requires_grad=False)
        else:
            self.positional_emb = None
        self.dropout = nn.Dropout(p=dropout)
        dpr = [r.item() for r in torch.linspace(0, stochastic_depth, num_layers, device="cpu")]
        self.blocks = nn.ModuleList([
            TransformerEncoderLayer(d_model=embedding_dim, nhead=num_heads,
                                    dim_feedforward=dim_feedforward, dropout=dropout,
                                    attention_dropout=attention_dropout, drop_path_rate=dpr[i])
            for i in range(num_layers)])
        self.norm = nn.LayerNorm(embedding_dim)
        self.fc = nn.Linear(embedding_dim, num_classes)
        self.apply(self.init_weight)

    @staticmethod
    def init_weight(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Tokenizer output (B, T, d) -> x + E_pos, dropout: the input of block 0."""
        if self.positional_emb is not None:
            x = x + self.positional_emb
        return self.dropout(x)

    def encode(self, x: torch.Tensor, tap: Optional[NodeTap] = None) -> torch.Tensor:
        """Blocks, final LayerNorm and sequence pooling: (B, T, d) -> p (B, d)."""
        if tap is not None:
            tap.stream(0, "tokens", x)
        for i, blk in enumerate(self.blocks):
            x = blk(x, tap, i)
        return self.pool(self.norm(x))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence pooling p = softmax_T(attention_pool(x))^T x: (B, T, d) -> (B, d)."""
        w = F.softmax(self.attention_pool(x), dim=1)  # (B, T, 1)
        return torch.matmul(w.transpose(-1, -2), x).squeeze(-2)

    def forward(self, x: torch.Tensor, tap: Optional[NodeTap] = None) -> torch.Tensor:
        return self.fc(self.encode(self.embed(x), tap))


class CCT(nn.Module):
    """Compact Convolutional Transformer (reference ``src/cct.py`` ``CCT``).

    Arguments follow the reference's names, except ``in_channels`` (reference
    ``n_input_channels``). ``name`` only labels the model (kept in ``config``).
    ``model.config`` holds every argument: ``create_model(**model.config)`` (named models) or
    ``CCT.from_config(model.config)`` (any model) rebuilds the same architecture.
    """

    _ALIASES = ("blocks", "fc")

    def __init__(self, img_size: int = 224, embedding_dim: int = 768, in_channels: int = 3,
                 n_conv_layers: int = 1, kernel_size: int = 7, stride: int = 2, padding: int = 3,
                 pooling_kernel_size: int = 3, pooling_stride: int = 2, pooling_padding: int = 1,
                 dropout: float = 0.0, attention_dropout: float = 0.1, stochastic_depth: float = 0.1,
                 num_layers: int = 14, num_heads: int = 6, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, positional_embedding: str = "learnable",
                 name: Optional[str] = None):
        super().__init__()
        for key, val in (("img_size", img_size), ("embedding_dim", embedding_dim),
                         ("in_channels", in_channels), ("n_conv_layers", n_conv_layers),
                         ("num_layers", num_layers), ("num_heads", num_heads),
                         ("num_classes", num_classes)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{key} must be a positive int, got {val!r}")
        if positional_embedding not in POSITIONAL_EMBEDDINGS:
            raise ValueError(f"positional_embedding must be one of {POSITIONAL_EMBEDDINGS}, "
                             f"got {positional_embedding!r}")
        self.config = dict(name=name, img_size=img_size, embedding_dim=embedding_dim,
                           in_channels=in_channels, n_conv_layers=n_conv_layers,
                           kernel_size=kernel_size, stride=stride, padding=padding,
                           pooling_kernel_size=pooling_kernel_size, pooling_stride=pooling_stride,
                           pooling_padding=pooling_padding, dropout=dropout,
                           attention_dropout=attention_dropout, stochastic_depth=stochastic_depth,
                           num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, positional_embedding=positional_embedding)
        self.tokenizer = Tokenizer(n_input_channels=in_channels, n_output_channels=embedding_dim,
                                   kernel_size=kernel_size, stride=stride, padding=padding,
                                   pooling_kernel_size=pooling_kernel_size,
                                   pooling_stride=pooling_stride, pooling_padding=pooling_padding,
                                   max_pool=True, activation=nn.ReLU, n_conv_layers=n_conv_layers,
                                   conv_bias=False)
        seq_len = self.tokenizer.sequence_length(img_size, img_size)
        if seq_len < 1:
            raise ValueError(f"img_size={img_size} is too small for this tokenizer "
                             f"({n_conv_layers} conv layers, kernel {kernel_size}, stride {stride})")
        self.classifier = TransformerClassifier(
            sequence_length=seq_len, embedding_dim=embedding_dim, dropout=dropout,
            attention_dropout=attention_dropout, stochastic_depth=stochastic_depth,
            num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio,
            num_classes=num_classes, positional_embedding=positional_embedding)
        self.name = name
        self.img_size = img_size
        self.in_channels = in_channels
        self.positional_embedding = positional_embedding
        self.num_blocks = num_layers
        self.num_heads = num_heads
        self.embed_dim = embedding_dim
        self.head_dim = embedding_dim // num_heads
        self.ff_dim = int(embedding_dim * mlp_ratio)
        self.num_classes = num_classes
        self.seq_len = seq_len
        self._tap: Optional[NodeTap] = None

    # -- aliases: properties (not registered twice, so the state dict keeps reference keys) --
    @property
    def blocks(self) -> nn.ModuleList:
        return self.classifier.blocks

    @property
    def fc(self) -> nn.Module:
        return self.classifier.fc

    def __setattr__(self, name, value):
        if name in CCT._ALIASES and "classifier" in self._modules:
            setattr(self.classifier, name, value)
        else:
            super().__setattr__(name, value)

    @classmethod
    def from_config(cls, config: dict) -> "CCT":
        return cls(**config)

    def refresh_widths(self) -> None:
        """Set ``ff_dim`` and ``head_dim`` from the blocks' layers when every block has the same
        (after structured pruning made them narrower: what code reading the model-level widths,
        such as ANDC pruning and the SNP, then sees); blocks of different widths leave them."""
        ff = {blk.linear1.out_features for blk in self.blocks}
        dh = {blk.self_attn.qkv.out_features // 3 // blk.self_attn.num_heads for blk in self.blocks}
        if len(ff) == 1:
            self.ff_dim = ff.pop()
        if len(dh) == 1:
            self.head_dim = dh.pop()

    # -- taps --
    @property
    def tap(self) -> Optional[NodeTap]:
        return self._tap

    def set_tap(self, tap: Optional[NodeTap]) -> None:
        """Install a node tap (any object with NodeTap's methods); None removes it."""
        if tap is not None:
            missing = [m for m in ("attention", "ff_hidden", "stream") if not callable(getattr(tap, m, None))]
            if missing:
                raise TypeError(f"tap {type(tap).__name__} lacks method(s) {missing}; "
                                "subclass cctk.models.NodeTap")
        self._tap = tap

    @contextlib.contextmanager
    def tapped(self, tap: Optional[NodeTap]):
        """``with model.tapped(tap): ...`` installs tap, restores the previous one on exit."""
        previous = self._tap
        self.set_tap(tap)
        try:
            yield tap
        finally:
            self._tap = previous

    # -- forward --
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError for a batch the model cannot take (cheap: shape arithmetic only)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"model {self.name or 'CCT'} takes {self.in_channels}-channel images, "
                             f"got {x.shape[1]} channels (shape {tuple(x.shape)}); rebuild with "
                             f"in_channels={x.shape[1]} or convert the images")
        if self.classifier.positional_emb is not None:
            t = self.tokenizer.sequence_length(x.shape[2], x.shape[3])
            if t != self.seq_len:
                raise ValueError(
                    f"model {self.name or 'CCT'} was built for img_size={self.img_size} "
                    f"({self.seq_len} tokens, {self.positional_embedding} positional embedding); "
                    f"images of {x.shape[2]}x{x.shape[3]} give {t} tokens. Resize the images or "
                    f"create the model with img_size={x.shape[2]}")

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, T, d): tokenizer + positional embedding (+dropout), block 0 input."""
        self.check_input(x)
        return self.classifier.embed(self.tokenizer(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> p (B, d): sequence-pooled vector after the final LayerNorm."""
        return self.classifier.encode(self.tokens(x), self._tap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.fc(self.forward_features(x))

    def extra_repr(self) -> str:
        return (f"name={self.name}, img_size={self.img_size}, seq_len={self.seq_len}, "
                f"positional_embedding={self.positional_embedding!r}")
