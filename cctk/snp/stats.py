"""The measurement pass: node outputs plus label-conditioned statistics in one forward
(SCIENCE.md sections 3.3 and 6).

:class:`LabelStatsTap` is a :class:`cctk.models.NodeTap`. For every block it computes

* the MHA nodes o = softmax(q k^T d_h^-1/2) v through ``cctk.ops.attention_label_stats`` and
  the FF nodes h = GELU(x W1^T + b1) through ``cctk.ops.linear_label_stats``: the fused ops
  return the node outputs (which the forward continues with) *and* their per-label sums;
* the stream nodes (the d channels after each sub-block, ``stream_mha`` / ``stream_ff``, and
  the stream entering block 0, ``(0, "tokens")``: tokenizer output plus positional embedding),
  summed per label with ``cctk.ops.label_sum``;

in ``mode="pooled"`` (sums[k, n] = sum over samples of label k of the token mean of node n) or
``mode="token"`` (sums[k, t, n], no token mean). Group keys are ``(block, group)`` with group in
``mha``, ``ff``, ``stream_mha``, ``stream_ff``. The label-conditioned means are
``sums / counts`` (rows of labels absent from the data are zero).

The tap can also keep each batch's per-sample features (the readout inputs: token means in
``pooled``, the flattened (T * N) node outputs in ``token``): ``features="pooled"|"token"``.

:func:`collect_label_stats` runs the pass over a loader (``model.forward_features`` with the tap
installed, then ``model.fc``), also summing the final pooled vector p(x) per label (the
final-stream nodes of section 5) and counting correct predictions; under
``torch.distributed`` (initialised) every sum and count is all-reduced (SUM) across ranks, so
each rank's loader should hold its own shard.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from cctk.models import NodeTap

__all__ = ["GROUPS", "NODE_GROUPS", "TOKENS", "measured_keys", "LabelStatsTap", "LabelStats", "collect_label_stats",
           "group_sizes", "mha_nodes"]

NODE_GROUPS = ("mha", "ff")                      # the sub-blocks' own nodes
GROUPS = ("mha", "ff", "stream_mha", "stream_ff")
#: the stream entering block 0 (tokenizer output + positional embedding): a place measured like
#: the others (SCIENCE.md section 5), keyed ``(0, TOKENS)``
TOKENS = "tokens"
MODES = ("pooled", "token")


def mha_nodes(o: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d_h) head outputs -> (B, T, H * d_h) nodes, node index h * d_h + j."""
    B, H, T, dh = o.shape
    return o.transpose(1, 2).reshape(B, T, H * dh)


def group_sizes(model) -> dict:
    """Number of nodes of each group in a block of ``model``."""
    return {"mha": model.num_heads * model.head_dim, "ff": model.ff_dim,
            "stream_mha": model.embed_dim, "stream_ff": model.embed_dim, TOKENS: model.embed_dim}


def measured_keys(num_blocks: int) -> list:
    """Every measured place: ``(block, group)`` for each block and group of GROUPS, and
    ``(0, TOKENS)``, the stream entering block 0."""
    return [(0, TOKENS)] + [(b, g) for b in range(num_blocks) for g in GROUPS]


def _fused_ops():
    """(linear_label_stats, attention_label_stats) of cctk.ops (imported when first used)."""
    from cctk.ops import attention_label_stats, linear_label_stats
    return linear_label_stats, attention_label_stats


def _is_plain_linear(module) -> bool:
    return type(module) is nn.Linear


class LabelStatsTap(NodeTap):
    """Node tap that accumulates per-label sums of every node group (see the module doc).

    ``num_labels``: K. ``mode``: ``"pooled"`` or ``"token"`` (statistics layout).
    ``backend``: passed to the fused ops (``"auto"``, ``"triton"``, ``"torch"``).
    ``stats``: accumulate the sums (False: only keep features). ``stream``: also the stream
    nodes. ``features``: None, ``"pooled"`` or ``"token"``: keep this batch's per-sample
    features in ``self.batch_features[(block, group)]`` (B, F) (cleared by ``begin_batch``).

    Call ``begin_batch(labels)`` before each forward; labels (B,) int64 in [0, K).
    """

    def __init__(self, num_labels: int, mode: str = "pooled", backend: str = "auto",
                 stats: bool = True, stream: bool = True, features: Optional[str] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if features not in (None,) + MODES:
            raise ValueError(f"features must be None or one of {MODES}, got {features!r}")
        self.num_labels = int(num_labels)
        self.mode = mode
        self.backend = backend
        self.stats = stats
        self.stream_nodes = stream
        self.features = features
        self.labels: Optional[torch.Tensor] = None
        self.sums: dict = {}
        self.counts: Optional[torch.Tensor] = None
        self.batch_features: dict = {}

    # -- per batch --
    def begin_batch(self, labels: Optional[torch.Tensor]) -> None:
        self.labels = labels
        self.batch_features = {}
        if self.stats:
            if labels is None:
                raise ValueError("LabelStatsTap(stats=True) needs the batch's labels")
            counts = torch.bincount(labels, minlength=self.num_labels)
            if counts.numel() > self.num_labels:
                raise ValueError(f"labels must lie in [0, {self.num_labels}); "
                                 f"found {int(labels.max())}")
            self.counts = counts if self.counts is None else self.counts + counts

    def _add(self, key, sums: torch.Tensor) -> None:
        acc = self.sums.get(key)
        self.sums[key] = sums if acc is None else acc.add_(sums)

    def _keep(self, key, nodes: torch.Tensor) -> None:
        """nodes (B, T, N) -> per-sample features (B, N) token mean or (B, T * N)."""
        if self.features == "pooled":
            self.batch_features[key] = nodes.mean(1)
        else:
            self.batch_features[key] = nodes.reshape(nodes.shape[0], -1)

    def _label_sum(self, nodes: torch.Tensor) -> torch.Tensor:
        from cctk.ops import label_sum
        x = nodes.mean(1) if self.mode == "pooled" else nodes.reshape(nodes.shape[0], -1)
        sums, _ = label_sum(x, self.labels, self.num_labels)
        return sums if self.mode == "pooled" else sums.view(self.num_labels, *nodes.shape[1:])

    # -- NodeTap --
    def attention(self, block, q, k, v, dropout_p):
        if self.stats:
            attention_label_stats = _fused_ops()[1]
            if dropout_p:
                raise RuntimeError("the SNP measurement pass needs the model in eval mode "
                                   "(attention dropout is active)")
            o, sums, _ = attention_label_stats(q, k, v, self.labels, self.num_labels,
                                               mode=self.mode, backend=self.backend)
            self._add((block, "mha"), sums)
        else:
            o = super().attention(block, q, k, v, dropout_p)
        if self.features:
            self._keep((block, "mha"), mha_nodes(o))
        return o

    def ff_hidden(self, block, x, linear1):
        if self.stats and _is_plain_linear(linear1):
            linear_label_stats = _fused_ops()[0]
            h, sums, _ = linear_label_stats(x, linear1.weight, linear1.bias, self.labels,
                                            self.num_labels, activation="gelu", mode=self.mode,
                                            backend=self.backend)
            self._add((block, "ff"), sums)
        else:
            # a replaced linear1 (e.g. a sparse ANDCLinear): its own forward, then the sums
            h = F.gelu(linear1(x))
            if self.stats:
                self._add((block, "ff"), self._label_sum(h))
        if self.features:
            self._keep((block, "ff"), h)
        return h

    def stream(self, block, where, x):
        if not self.stream_nodes:
            return None
        key = (block, TOKENS if where == TOKENS else "stream_" + where)
        if self.stats:
            self._add(key, self._label_sum(x))
        if self.features:
            self._keep(key, x)
        return None


@dataclass
class LabelStats:
    """Per-label sums of a pass. ``sums[(block, group)]``: (K, N) pooled or (K, T, N) token,
    fp32; ``final_sums`` (K, d): sums of the final pooled vector p(x); ``counts`` (K,) int64;
    ``correct`` / ``total``: the model's own predictions; ``features`` / ``labels``: the kept
    per-sample features (CPU) when asked for."""
    mode: str
    num_labels: int
    sums: dict
    counts: torch.Tensor
    final_sums: torch.Tensor
    correct: int
    total: int
    features: dict = field(default_factory=dict)
    labels: Optional[torch.Tensor] = None

    def means(self, key, mode: Optional[str] = None) -> torch.Tensor:
        """Label-conditioned means sums / counts (zero rows for labels with no sample).

        ``mode="pooled"`` on token statistics gives the pooled means (the token mean of the
        token sums: sum_b mean_t h = (1/T) sum_t sum_b h), so one token pass serves both."""
        sums = self.final_sums if key == "final" else self.sums[key]
        if mode not in (None, self.mode) and key != "final":
            if mode != "pooled":
                raise ValueError(f"{self.mode} statistics cannot give {mode!r} means")
            sums = sums.mean(1)
        denom = self.counts.clamp(min=1).to(sums.dtype).view(-1, *([1] * (sums.dim() - 1)))
        return sums / denom

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


def _reduce(tensors: list) -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


@torch.no_grad()
def collect_label_stats(model, loader, num_labels: int, mode: str = "pooled",
                        backend: str = "auto", device=None, stream: bool = True,
                        features: Optional[str] = None, stats: bool = True,
                        max_batches: Optional[int] = None, reduce: bool = True) -> LabelStats:
    """One pass over ``loader`` ((images, labels) batches) collecting :class:`LabelStats`.

    The model is put in eval mode for the pass (and restored after). ``features`` keeps the
    per-sample readout features (CPU) of every group. Under an initialised torch.distributed,
    sums, counts and correct/total are all-reduced (SUM) when ``reduce``.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tap = LabelStatsTap(num_labels, mode=mode, backend=backend, stats=stats, stream=stream,
                        features=features)
    was_training = model.training
    model.eval()
    final_sums = None
    correct = total = 0
    kept: dict = {}
    kept_labels = []
    try:
        with model.tapped(tap):
            for i, (images, labels) in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, torch.int64, non_blocking=True)
                tap.begin_batch(labels)
                pooled = model.forward_features(images)
                logits = model.fc(pooled)
                correct += int((logits.argmax(1) == labels).sum())
                total += labels.numel()
                if stats:
                    from cctk.ops import label_sum
                    s, _ = label_sum(pooled.float(), labels, num_labels)
                    final_sums = s if final_sums is None else final_sums.add_(s)
                if features:
                    for key, f in tap.batch_features.items():
                        kept.setdefault(key, []).append(f.float().cpu())
                    kept.setdefault("final", []).append(pooled.float().cpu())
                    kept_labels.append(labels.cpu())
    finally:
        model.train(was_training)
    counts = tap.counts if tap.counts is not None else torch.zeros(num_labels, dtype=torch.int64,
                                                                    device=device)
    if final_sums is None:
        final_sums = torch.zeros(num_labels, getattr(model, "embed_dim", 0), device=device)
    sums = dict(sorted(tap.sums.items()))
    ct = torch.tensor([correct, total], dtype=torch.int64, device=device)
    if reduce:
        _reduce(list(sums.values()) + [final_sums, counts, ct])
    return LabelStats(mode=mode, num_labels=num_labels, sums=sums, counts=counts.cpu(),
                      final_sums=final_sums, correct=int(ct[0]), total=int(ct[1]),
                      features={k: torch.cat(v) for k, v in kept.items()},
                      labels=torch.cat(kept_labels) if kept_labels else None)
