"""ANDC's science: recognised label sets, the rule carried to blocks, label-sorting
permutations (SCIENCE.md section 5). The pruner (:mod:`cctk.prune.pruner`) applies it through
:class:`cctk.prune.importance.AndcImportance`.

For block b of a CCT with d stream channels, H heads of d_h dims and d_ff FF units, the
recognised label sets D (bool, (n_nodes, K)) used by each encoder linear:

    layer                        output nodes j                 input nodes i
    blocks.b.self_attn.qkv       q, k rows: D_h of the row's    stream entering block b
                                 head h; v rows: the MHA node   (tokens for b = 0, else
                                 (h, j) they produce (``v_sets``  stream_ff[b-1])
                                 "node"; "head": D_h as q, k)
    blocks.b.self_attn.proj      stream_mha[b]                  MHA nodes of block b
    blocks.b.linear1             FF nodes of block b            stream_mha[b]
    blocks.b.linear2             stream_ff[b]                   FF nodes of block b
    classifier.fc (element mask) labels c                       final stream: keep W[c, n] iff c ∈ D_n

stream_mha[b] is the stream after ``norm1`` (the input of linear1), stream_ff[b] the block's
output, tokens the stream entering block 0 (tokenizer output plus positional embedding), which
``cctk snp`` measures like every other place. Every input set is measured, never assumed: SNP
results without token sets are refused (:class:`MissingTokenSets`) unless the rule asks for the
old assumption explicitly (``token_sets="assume-all"``: every token channel recognises every
label, which makes block 0's qkv rule a no-op and hands its budget to the head recognising
the most labels).

:class:`AndcRule` holds the rule's choices: ``min_overlap``, ``block_score`` (``kept-fraction``:
the fraction of a block's connections the rule keeps, ties by L1, the default; ``sum``: summed
overlap counts, cctk's first choice), ``v_sets`` (``node`` / ``head``), ``token_sets``
(``measured`` / ``assume-all``), the node ``order`` and ``permute``. :data:`OLD_RULE` is cctk's
first rule (sum, head, assume-all), kept so that an ablation can run it.

SCIENCE.md asks for "a per-layer target density"; the fused qkv is three linear maps in one
tensor, and cctk gives each of q, k and v the density (:data:`cctk.prune.plan.DEFAULT_QKV_BUDGET`,
``Target.qkv_budget="split"``). With one budget over the fused tensor (``"fused"``) the q and k
rows (head sets, nearly all connections kept) out-score the v rows (node sets) and v can lose
every block: on the Fashion-MNIST study it did, on every seed (docs/FINDINGS.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Union

import torch
import torch.nn as nn

from cctk.prune.masks import BLOCK_SCORES, andc_block_mask, block_reduce, connection_keep, overlap_scores
from cctk.prune.permute import label_order, permute_ff, permute_head_dims, permute_stream
from cctk.prune.plan import Permutations, Target, encoder_linear_names
from cctk.snp import analyze_group, load_recognized

__all__ = [
    "RecognizedSets",
    "MissingTokenSets",
    "AndcRule",
    "OLD_RULE",
    "V_SETS",
    "TOKEN_SETS",
    "layer_label_sets",
    "choose_permutations",
    "best_andc_permutations",
    "apply_permutations",
    "layer_connections",
    "rule_stats",
    "andc_layer_masks",
    "shuffle_label_sets",
    "final_stream_means",
    "final_stream_sets",
]

V_SETS = ("node", "head")
TOKEN_SETS = ("measured", "assume-all")


class MissingTokenSets(ValueError):
    """SNP results without the token label sets (``tokens_recognized``), used where the rule needs them."""


@dataclass(frozen=True)
class AndcRule:
    """The choices of ANDC's rule carried to blocks (see the module docstring)."""

    min_overlap: int = 1
    block_score: str = "kept-fraction"
    v_sets: str = "node"
    token_sets: str = "measured"
    order: str = "auto"
    permute: bool = True

    def __post_init__(self):
        if self.min_overlap < 1:
            raise ValueError(f"min_overlap must be >= 1, got {self.min_overlap}")
        for name, allowed in (("block_score", BLOCK_SCORES), ("v_sets", V_SETS), ("token_sets", TOKEN_SETS),
                              ("order", ("auto", "dominant", "lexicographic", "identity"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


#: cctk's first rule (the Fashion-MNIST study of docs/FINDINGS.md): summed overlap, head sets
#: for v rows, token channels assumed to recognise every label
OLD_RULE = AndcRule(block_score="sum", v_sets="head", token_sets="assume-all")


def _block_of(name: str) -> int:
    return int(name.split(".")[2])


@dataclass
class RecognizedSets:
    """Recognised label sets (bool (n_nodes, K)) of every node group a pruning decision needs."""

    heads: List[torch.Tensor]          # (H, K) per block
    mha: List[torch.Tensor]            # (d, K) per block, node h*d_h + j
    ff: List[torch.Tensor]             # (d_ff, K) per block
    stream_mha: List[torch.Tensor]     # (d, K) per block: after norm1
    stream_ff: List[torch.Tensor]      # (d, K) per block: block output
    final: torch.Tensor                # (d, K): pooled vector after the final LayerNorm
    tokens: Optional[torch.Tensor]     # (d, K): stream entering block 0 (None: not measured)
    tokens_assumed: bool = False       # True when ``tokens`` are the all-labels assumption

    @property
    def num_labels(self) -> int:
        return int(self.final.shape[1])

    @classmethod
    def from_snp(cls, source: Union[str, Path, Mapping[str, torch.Tensor]], num_blocks: Optional[int] = None) -> "RecognizedSets":
        """From a ``cctk snp`` output directory, the dict ``cctk.snp.load_recognized`` returns, or
        an in-memory ``cctk.snp.SNPResult``.

        Keys ``b{b}_{g}_recognized`` for g in mha, ff, stream_mha, stream_ff; ``b{b}_heads_recognized``;
        ``final_recognized``; ``tokens_recognized`` (absent from SNP results of cctk before
        the tokens were measured: ``tokens`` is then None, and the ANDC rule refuses them unless
        asked to assume, :meth:`with_token_sets`).
        """
        if isinstance(source, (str, Path)):
            source = load_recognized(source)
        elif not isinstance(source, Mapping) and hasattr(source, "recognized"):  # a cctk.snp.SNPResult
            rec = source.recognized
            source = rec() if callable(rec) else rec
        d = {k: torch.as_tensor(v).to(torch.bool).cpu() for k, v in source.items()}
        if num_blocks is None:
            num_blocks = 0
            while f"b{num_blocks}_mha_recognized" in d:
                num_blocks += 1
        if num_blocks == 0:
            raise ValueError(f"no per-block recognised sets found (keys: {sorted(d)[:8]}...)")
        need = [f"b{b}_{g}_recognized" for b in range(num_blocks) for g in ("mha", "ff", "stream_mha", "stream_ff", "heads")]
        need.append("final_recognized")
        missing = [k for k in need if k not in d]
        if missing:
            raise ValueError(f"SNP result lacks recognised sets {missing[:6]}; rerun `cctk snp` with this cctk version")
        g = lambda name: [d[f"b{b}_{name}_recognized"] for b in range(num_blocks)]  # noqa: E731
        return cls(heads=g("heads"), mha=g("mha"), ff=g("ff"), stream_mha=g("stream_mha"),
                   stream_ff=g("stream_ff"), final=d["final_recognized"], tokens=d.get("tokens_recognized"))

    def with_token_sets(self, token_sets: str = "measured") -> "RecognizedSets":
        """The sets the rule uses for the stream entering block 0: ``"measured"`` (refused with
        :class:`MissingTokenSets` when the SNP result has none) or ``"assume-all"`` (every token
        channel recognises every label: the old assumption, measured sets or not)."""
        if token_sets == "assume-all":
            return dataclasses.replace(self, tokens=torch.ones_like(self.final), tokens_assumed=True)
        if token_sets != "measured":
            raise ValueError(f"token_sets must be one of {', '.join(TOKEN_SETS)}, got {token_sets!r}")
        if self.tokens is None or self.tokens_assumed:
            raise MissingTokenSets("the SNP result has no label sets for the tokens (tokens_recognized: "
                                   "written by an older cctk): rerun `cctk snp`, or ask for the old "
                                   "assumption explicitly (--token-sets assume-all)")
        return self

    def stream_counts(self) -> torch.Tensor:
        """C[n, k] = number of measured places of the stream where channel n recognises label k."""
        C = self.final.to(torch.int64).clone()
        for s in self.stream_mha + self.stream_ff:
            C += s.to(torch.int64)
        if self.tokens is not None and not self.tokens_assumed:
            C += self.tokens.to(torch.int64)
        return C

    def stream_in(self, block: int) -> torch.Tensor:
        if block > 0:
            return self.stream_ff[block - 1]
        if self.tokens is None:
            self.with_token_sets("measured")   # raises MissingTokenSets
        return self.tokens

    def select_nodes(self, ff_keep: Mapping[int, torch.Tensor], head_dims_keep: Mapping[int, torch.Tensor],
                     head_dim: int) -> "RecognizedSets":
        """The label sets of the nodes a structured pruning kept (:func:`cctk.prune.remove_nodes`
        with the same ``ff_keep`` and ``head_dims_keep``; ``head_dim``: the full model's d_h)."""
        ff = [f[torch.sort(torch.as_tensor(ff_keep[b])).values] if b in ff_keep else f for b, f in enumerate(self.ff)]
        mha = []
        for b, m in enumerate(self.mha):
            if b in head_dims_keep:
                k = torch.as_tensor(head_dims_keep[b])
                m = m[torch.cat([h * head_dim + torch.sort(k[h]).values for h in range(k.shape[0])])]
            mha.append(m)
        return dataclasses.replace(self, ff=ff, mha=mha)

    def permuted(self, perms: "Permutations") -> "RecognizedSets":
        """The label sets re-indexed to the permuted model (new node i = old node perm[i])."""
        s = perms.stream
        mha = [m[perms.v_index(b, m.shape[0], self.heads[b].shape[0])] for b, m in enumerate(self.mha)]
        return RecognizedSets(
            heads=[h.clone() for h in self.heads],
            mha=mha,
            ff=[f[p] for f, p in zip(self.ff, perms.ff)],
            stream_mha=[x[s] for x in self.stream_mha],
            stream_ff=[x[s] for x in self.stream_ff],
            final=self.final[s],
            tokens=None if self.tokens is None else self.tokens[s],
            tokens_assumed=self.tokens_assumed,
        )


def layer_label_sets(sets: RecognizedSets, name: str, head_dim: int, v_sets: str = "node"):
    """(out_sets, in_sets) of the encoder linear ``name`` (see the module docstring's table):
    q and k rows use their head's set D_h; v rows their own MHA node's set (``v_sets="node"``)
    or the head's (``"head"``)."""
    b = _block_of(name)
    if name.endswith("self_attn.qkv"):
        qk = sets.heads[b].repeat_interleave(head_dim, 0)
        if v_sets == "node":
            v = sets.mha[b]
        elif v_sets == "head":
            v = qk
        else:
            raise ValueError(f"v_sets must be one of {', '.join(V_SETS)}, got {v_sets!r}")
        if v.shape[0] != qk.shape[0]:
            raise ValueError(f"{name}: {v.shape[0]} MHA node sets for {qk.shape[0]} v rows")
        return torch.cat([qk, qk, v]), sets.stream_in(b)
    if name.endswith("self_attn.proj"):
        return sets.stream_mha[b], sets.mha[b]
    if name.endswith("linear1"):
        return sets.ff[b], sets.stream_mha[b]
    if name.endswith("linear2"):
        return sets.stream_ff[b], sets.ff[b]
    raise ValueError(f"not an encoder linear: {name}")


def choose_permutations(model: nn.Module, sets: RecognizedSets, order: str = "dominant") -> Permutations:
    """Label-sorting permutations: one for the stream (from every measured stream place), one per
    FF sub-block (from the FF nodes' sets), and per head a v-dim order (from the MHA nodes' sets);
    q/k dims keep their order (all rows of a head share D_h)."""
    H, dh = model.num_heads, model.head_dim
    stream = label_order(sets.stream_counts(), order)
    ff = [label_order(f, order) for f in sets.ff]
    qk = [[torch.arange(dh) for _ in range(H)] for _ in sets.mha]
    v = [[label_order(m[h * dh:(h + 1) * dh], order) for h in range(H)] for m in sets.mha]
    return Permutations(stream=stream, ff=ff, qk=qk, v=v, order=order)


def apply_permutations(model: nn.Module, perms: Permutations) -> None:
    """Apply ``perms`` to ``model`` in place (function preserving)."""
    permute_stream(model, perms.stream)
    for b in range(len(model.blocks)):
        permute_ff(model, b, perms.ff[b])
        for h in range(model.num_heads):
            permute_head_dims(model, b, h, perm_qk=perms.qk[b][h], perm_v=perms.v[b][h])


def layer_connections(model: nn.Module, sets: RecognizedSets, name: str, rule: AndcRule):
    """(s, keep) of the encoder linear ``name``: overlap counts s_ji = |D_j ∩ D_i| and the rule's
    kept connections s_ji >= min_overlap, (out, in) like its weight."""
    out_sets, in_sets = layer_label_sets(sets, name, model.head_dim, rule.v_sets)
    scores = overlap_scores(out_sets, in_sets)
    shape = tuple(model.get_submodule(name).weight.shape)
    if tuple(scores.shape) != shape:
        raise ValueError(f"label sets give a {tuple(scores.shape)} score matrix for {name}, whose weight is {shape}")
    return scores, connection_keep(scores, rule.min_overlap)


def rule_stats(scores: torch.Tensor, keep: torch.Tensor, block_mask: torch.Tensor, rule: AndcRule,
               block_size: int) -> dict:
    """``connection_keep_fraction`` (connections the rule keeps) and ``captured_fraction`` (the
    share of the rule's block mass, kept connections for ``kept-fraction`` or kept overlap for
    ``sum``, that the blocks of ``block_mask`` hold)."""
    mass = block_reduce(keep.double() if rule.block_score == "kept-fraction" else scores.double() * keep, block_size)
    total = float(mass.sum())
    return {"connection_keep_fraction": float(keep.double().mean()),
            "captured_fraction": float(mass[block_mask].sum()) / total if total > 0 else 0.0}


def andc_layer_masks(model: nn.Module, sets: RecognizedSets, rule: AndcRule, target: Target,
                     use_weights: bool = True):
    """({layer: block mask}, {layer: :func:`rule_stats`}) of every encoder linear of ``model``
    (already permuted; ``sets`` indexed like it) by ``rule`` at ``target`` (density or tau);
    ``use_weights``: break score ties by block L1 norm."""
    B = target.block_size
    masks, stats = {}, {}
    for name in encoder_linear_names(model):
        scores, keep = layer_connections(model, sets, name, rule)
        weight = model.get_submodule(name).weight.detach().cpu() if use_weights else None
        density = None if target.tau is not None else target.layer_density(name)
        masks[name] = andc_block_mask(scores, keep, B, density=density, tau=target.tau, weight=weight,
                                      block_score=rule.block_score, groups=target.budget_groups(name))
        stats[name] = rule_stats(scores, keep, masks[name], rule, B)
    return masks, stats


def best_andc_permutations(model: nn.Module, sets: RecognizedSets, rule: AndcRule, target: Target) -> Permutations:
    """The label-sorting permutations ANDC uses: ``rule.order`` ("dominant", "lexicographic",
    "identity"), or "auto": try the three, keep the one whose block masks capture the largest
    share of the rule's block mass over all layers (scores alone; weights only break ties)."""
    candidates = ["dominant", "lexicographic", "identity"] if rule.order == "auto" else [rule.order]
    best = None
    for method in candidates:
        p = choose_permutations(model, sets, method)
        _, stats = andc_layer_masks(model, sets.permuted(p), rule, target, use_weights=False)
        captured = sum(s["captured_fraction"] for s in stats.values())
        if best is None or captured > best[0] + 1e-12:
            best = (captured, p)
    return best[1]


def shuffle_label_sets(sets: RecognizedSets, seed: int = 0) -> RecognizedSets:
    """Each node group's label sets permuted across its nodes (one seeded permutation per
    group): every node keeps a real label set, but not its own."""
    g = torch.Generator().manual_seed(int(seed))

    def sh(x: torch.Tensor) -> torch.Tensor:
        return x[torch.randperm(x.shape[0], generator=g)]

    return RecognizedSets(heads=[sh(h) for h in sets.heads], mha=[sh(m) for m in sets.mha],
                          ff=[sh(f) for f in sets.ff], stream_mha=[sh(s) for s in sets.stream_mha],
                          stream_ff=[sh(s) for s in sets.stream_ff], final=sh(sets.final),
                          tokens=sets.tokens if sets.tokens is None or sets.tokens_assumed else sh(sets.tokens),
                          tokens_assumed=sets.tokens_assumed)


@torch.no_grad()
def final_stream_means(model: nn.Module, loader, num_labels: int, device="cpu") -> torch.Tensor:
    """Zbar[k, n] = mean over the samples of label k of p_n(x), the pooled vector after the final
    LayerNorm (the classifier's input), over ``loader``."""
    device = torch.device(device)
    was = model.training
    model.eval().to(device)
    sums = torch.zeros(num_labels, model.embed_dim, dtype=torch.float64)
    counts = torch.zeros(num_labels, dtype=torch.float64)
    try:
        for x, y in loader:
            p = model.forward_features(x.to(device)).double().cpu()
            sums.index_add_(0, y.cpu(), p)
            counts += torch.bincount(y.cpu(), minlength=num_labels).double()
    finally:
        model.train(was)
    return (sums / counts.clamp_min(1)[:, None]).float()


def final_stream_sets(model: nn.Module, means: torch.Tensor, threshold: float) -> torch.Tensor:
    """Recognised sets (d, K) of the final-stream nodes at ``threshold``, the model's own head as
    the readout: f_{n,c}(x) = fc.W[c, n] p_n(x), M_n[k, c] = fc.W[c, n] Zbar[k, n], analysed by
    ``cctk.snp.analyze_group`` (normalise by the max, threshold, diagonal), exactly as the SNP
    pass does for its ``final_recognized`` (which uses the SNP threshold)."""
    fc = model.get_submodule("classifier.fc")
    W = (fc.masked_weight() if hasattr(fc, "masked_weight") else fc.weight).detach().float().cpu()
    analysis = analyze_group(W, means.float().cpu(), threshold)
    return torch.as_tensor(analysis.recognized).to(torch.bool)
