"""ANDC pruning of a CCT from its SNP label sets, and the block-magnitude baseline.

SCIENCE.md section 5. For block b of a CCT with d stream channels, H heads of d_h dims and
d_ff FF units, the recognised label sets D (bool, (n_nodes, K)) used by each encoder linear:

    layer                        output nodes j             input nodes i
    blocks.b.self_attn.qkv       D_h of the row's head h    stream entering block b
                                 (q, k and v rows alike)    (tokens for b = 0, else stream_ff[b-1])
    blocks.b.self_attn.proj      stream_mha[b]              MHA nodes of block b
    blocks.b.linear1             FF nodes of block b        stream_mha[b]
    blocks.b.linear2             stream_ff[b]               FF nodes of block b
    classifier.fc (element mask) labels c                   final stream: keep W[c, n] iff c ∈ D_n

stream_mha[b] is the stream after ``norm1`` (the input of linear1), stream_ff[b] the block's
output. When the SNP result has no label sets for the tokens (the stream before block 0), every
token channel is taken to recognise every label: block 0's qkv then keeps exactly the rows of
heads with a non-empty D_h (documented choice; see :class:`RecognizedSets`).

Pipeline of :func:`prune_andc`: choose label-sorting permutations (stream, FF units, v dims
within heads; q/k rows of a head all share D_h, so their order does not matter and stays),
apply them to a copy of the model, score every connection, build the block masks (top blocks
by summed kept score at the target density, or kept fraction >= tau), mask the classifier, and
install the masks as :class:`MaskedLinear` layers (convert to ANDCLinear with
:func:`cctk.prune.convert.convert_to_andc`).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from cctk.checkpoint import replace_submodule as _set_submodule
from cctk.nn import MaskedLinear
from cctk.snp import analyze_group, load_recognized
from cctk.prune.masks import (
    andc_block_mask,
    block_reduce,
    classifier_keep,
    connection_keep,
    magnitude_block_mask,
    magnitude_element_mask,
    overlap_scores,
)
from cctk.prune.permute import label_order, permute_ff, permute_head_dims, permute_stream

__all__ = [
    "RecognizedSets",
    "PrunePlan",
    "encoder_linear_names",
    "layer_label_sets",
    "choose_permutations",
    "best_andc_permutations",
    "apply_permutations",
    "prune_andc",
    "prune_magnitude",
    "apply_masks",
    "final_stream_means",
    "final_stream_sets",
]

Density = Union[float, Mapping[str, float]]


def encoder_linear_names(model: nn.Module) -> List[str]:
    """Canonical module paths of every encoder linear (qkv, proj, linear1, linear2 per block)."""
    names = []
    for b in range(len(model.blocks)):
        p = f"classifier.blocks.{b}"
        names += [f"{p}.self_attn.qkv", f"{p}.self_attn.proj", f"{p}.linear1", f"{p}.linear2"]
    return names


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
    tokens: torch.Tensor               # (d, K): stream entering block 0
    tokens_assumed: bool = False       # True when tokens were not measured (all labels assumed)

    @property
    def num_labels(self) -> int:
        return int(self.final.shape[1])

    @classmethod
    def from_snp(cls, source: Union[str, Path, Mapping[str, torch.Tensor]], num_blocks: Optional[int] = None) -> "RecognizedSets":
        """From a ``cctk snp`` output directory, the dict ``cctk.snp.load_recognized`` returns, or
        an in-memory ``cctk.snp.SNPResult``.

        Keys ``b{b}_{g}_recognized`` for g in mha, ff, stream_mha, stream_ff; ``b{b}_heads_recognized``;
        ``final_recognized``; optionally ``tokens_recognized``.
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
        final = d["final_recognized"]
        tokens = d.get("tokens_recognized")
        assumed = tokens is None
        if assumed:
            tokens = torch.ones_like(final)
        g = lambda name: [d[f"b{b}_{name}_recognized"] for b in range(num_blocks)]  # noqa: E731
        return cls(heads=g("heads"), mha=g("mha"), ff=g("ff"), stream_mha=g("stream_mha"),
                   stream_ff=g("stream_ff"), final=final, tokens=tokens, tokens_assumed=assumed)

    def stream_counts(self) -> torch.Tensor:
        """C[n, k] = number of measured places of the stream where channel n recognises label k."""
        C = self.final.to(torch.int64).clone()
        for s in self.stream_mha + self.stream_ff:
            C += s.to(torch.int64)
        if not self.tokens_assumed:
            C += self.tokens.to(torch.int64)
        return C

    def stream_in(self, block: int) -> torch.Tensor:
        return self.tokens if block == 0 else self.stream_ff[block - 1]

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
            tokens=self.tokens[s],
            tokens_assumed=self.tokens_assumed,
        )


@dataclass
class Permutations:
    """The permutations applied to a model: new index i holds old index perm[i]."""

    stream: torch.Tensor
    ff: List[torch.Tensor]
    qk: List[List[torch.Tensor]]
    v: List[List[torch.Tensor]]
    order: str = "dominant"

    def v_index(self, block: int, d: int, num_heads: int) -> torch.Tensor:
        dh = d // num_heads
        return torch.cat([h * dh + p for h, p in enumerate(self.v[block])])

    def to_dict(self) -> dict:
        return {"stream": self.stream, "ff": list(self.ff), "qk": [list(x) for x in self.qk],
                "v": [list(x) for x in self.v], "order": self.order}

    @classmethod
    def from_dict(cls, d: dict) -> "Permutations":
        return cls(stream=d["stream"], ff=list(d["ff"]), qk=[list(x) for x in d["qk"]],
                   v=[list(x) for x in d["v"]], order=d.get("order", "dominant"))


def layer_label_sets(sets: RecognizedSets, name: str, head_dim: int):
    """(out_sets, in_sets) of the encoder linear ``name`` (see the module docstring's table)."""
    b = _block_of(name)
    if name.endswith("self_attn.qkv"):
        out = sets.heads[b].repeat_interleave(head_dim, 0).repeat(3, 1)
        return out, sets.stream_in(b)
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


@dataclass
class PrunePlan:
    """Everything that defines a pruned model besides its weights."""

    method: str
    block_size: int
    block_masks: Dict[str, torch.Tensor]
    classifier_mask: Optional[torch.Tensor]
    permutations: Optional[Permutations] = None
    min_overlap: int = 1
    density: Optional[Density] = None
    tau: Optional[float] = None
    tokens_assumed: bool = False
    layer_stats: Dict[str, dict] = field(default_factory=dict)
    #: structured pruning: the kept widths per block, {"0": {"ff": d_ff', "head_dim": d_h'}, ...}
    #: (the model is a smaller dense CCT; no block masks)
    structured: Optional[Dict[str, Dict[str, int]]] = None

    def blocks_kept(self) -> Dict[str, int]:
        return {k: int(v.sum()) for k, v in self.block_masks.items()}

    def to_dict(self) -> dict:
        """A torch.save-able dict (tensors kept as tensors)."""
        return {
            "method": self.method,
            "block_size": self.block_size,
            "block_masks": dict(self.block_masks),
            "classifier_mask": self.classifier_mask,
            "permutations": self.permutations.to_dict() if self.permutations is not None else None,
            "min_overlap": self.min_overlap,
            "density": dict(self.density) if isinstance(self.density, Mapping) else self.density,
            "tau": self.tau,
            "tokens_assumed": self.tokens_assumed,
            "layer_stats": self.layer_stats,
            "structured": self.structured,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        perms = d.get("permutations")
        return cls(method=d["method"], block_size=int(d["block_size"]), block_masks=dict(d["block_masks"]),
                   classifier_mask=d.get("classifier_mask"),
                   permutations=Permutations.from_dict(perms) if perms is not None else None,
                   min_overlap=d.get("min_overlap", 1), density=d.get("density"), tau=d.get("tau"),
                   tokens_assumed=d.get("tokens_assumed", False), layer_stats=d.get("layer_stats", {}),
                   structured=d.get("structured"))


def _density_for(density: Optional[Density], name: str) -> Optional[float]:
    if density is None or isinstance(density, (int, float)):
        return density
    for key in (name, name.split(".")[-1], name.replace("classifier.", "")):
        if key in density:
            return float(density[key])
    raise KeyError(f"no target density for layer {name} (give a float or a dict keyed by layer name)")


def _andc_masks(model: nn.Module, sets: RecognizedSets, block_size: int, density, tau, min_overlap,
                use_weights: bool = True):
    masks, stats = {}, {}
    for name in encoder_linear_names(model):
        weight = model.get_submodule(name).weight.detach().cpu()
        out_sets, in_sets = layer_label_sets(sets, name, model.head_dim)
        scores = overlap_scores(out_sets, in_sets)
        if tuple(scores.shape) != tuple(weight.shape):
            raise ValueError(f"label sets give a {tuple(scores.shape)} score matrix for {name}, whose weight is {tuple(weight.shape)}")
        keep = connection_keep(scores, min_overlap)
        bm = andc_block_mask(scores, keep, block_size, density=_density_for(density, name), tau=tau,
                             weight=weight if use_weights else None)
        kept_score = block_reduce(scores.double() * keep, block_size)
        total = float(kept_score.sum())
        masks[name] = bm
        stats[name] = {
            "connection_keep_fraction": float(keep.double().mean()),
            "captured_score_fraction": float(kept_score[bm].sum()) / total if total > 0 else 0.0,
        }
    return masks, stats


def best_andc_permutations(model: nn.Module, sets: RecognizedSets, block_size: int, density, tau,
                           min_overlap: int = 1, order: str = "auto") -> Permutations:
    """The label-sorting permutations ANDC uses: ``order`` ("dominant", "lexicographic",
    "identity"), or "auto": try the three, keep the one whose block masks capture the largest
    share of the kept connections' score over all layers (scores alone; weights only break ties)."""
    candidates = ["dominant", "lexicographic", "identity"] if order == "auto" else [order]
    best = None
    for method in candidates:
        p = choose_permutations(model, sets, method)
        _, stats = _andc_masks(model, sets.permuted(p), block_size, density, tau, min_overlap, use_weights=False)
        captured = sum(s["captured_score_fraction"] for s in stats.values())
        if best is None or captured > best[0] + 1e-12:
            best = (captured, p)
    return best[1]


def prune_andc(model: nn.Module, sets: Union[RecognizedSets, str, Path, Mapping], block_size: int = 32,
               density: Optional[Density] = 0.25, tau: Optional[float] = None, min_overlap: int = 1,
               order: str = "auto", permute: bool = True, prune_classifier: bool = True,
               classifier_sets: Optional[torch.Tensor] = None):
    """ANDC-prune a copy of ``model``; returns (pruned model with MaskedLinear layers, PrunePlan).

    ``density`` (float or {layer name: float}) or ``tau`` selects the block-mask rule (give one;
    with tau set, density is ignored). ``order``: "dominant", "lexicographic", "identity" or
    "auto" (try the first three, keep the one whose block masks capture the largest share of
    the kept connections' score over all layers). ``classifier_sets`` (d, K) replaces the SNP's
    final-stream sets (e.g. :func:`final_stream_sets` at another threshold).
    """
    if not isinstance(sets, RecognizedSets):
        sets = RecognizedSets.from_snp(sets, num_blocks=len(model.blocks))
    if classifier_sets is not None:
        if tuple(classifier_sets.shape) != tuple(sets.final.shape):
            raise ValueError(f"classifier_sets must have shape {tuple(sets.final.shape)}, got {tuple(classifier_sets.shape)}")
        sets = dataclasses.replace(sets, final=classifier_sets.to(torch.bool).cpu())
    if len(sets.ff) != len(model.blocks):
        raise ValueError(f"label sets describe {len(sets.ff)} blocks, the model has {len(model.blocks)}")
    if tau is not None:
        density = None
    pruned = copy.deepcopy(model)
    perms = None
    if permute:
        perms = best_andc_permutations(pruned, sets, block_size, density, tau, min_overlap, order)
        apply_permutations(pruned, perms)
        sets = sets.permuted(perms)
    masks, stats = _andc_masks(pruned, sets, block_size, density, tau, min_overlap)
    cls_mask = classifier_keep(sets.final) if prune_classifier else None
    plan = PrunePlan(method="andc", block_size=block_size, block_masks=masks, classifier_mask=cls_mask,
                     permutations=perms, min_overlap=min_overlap, density=density, tau=tau,
                     tokens_assumed=sets.tokens_assumed, layer_stats=stats)
    apply_masks(pruned, plan)
    return pruned, plan


def prune_magnitude(model: nn.Module, block_size: int = 32, density: Optional[Density] = None,
                    blocks_kept: Optional[Mapping[str, int]] = None, classifier_kept: Optional[int] = None):
    """Block-magnitude baseline on a copy of ``model`` (no permutation): per encoder linear keep
    the blocks of largest L1 norm, ``blocks_kept[name]`` of them (the ANDC plan's counts: same
    per-layer densities) or a ``density``; the classifier keeps its ``classifier_kept`` largest
    |W| elements (None: classifier left dense)."""
    if (density is None) == (blocks_kept is None):
        raise ValueError("give exactly one of density and blocks_kept")
    pruned = copy.deepcopy(model)
    masks = {}
    for name in encoder_linear_names(pruned):
        w = pruned.get_submodule(name).weight.detach().cpu()
        if blocks_kept is not None:
            masks[name] = magnitude_block_mask(w, block_size, n_keep=blocks_kept[name])
        else:
            masks[name] = magnitude_block_mask(w, block_size, density=_density_for(density, name))
    cls_mask = None
    if classifier_kept is not None:
        cls_mask = magnitude_element_mask(pruned.classifier.fc.weight.detach().cpu(), classifier_kept)
    plan = PrunePlan(method="magnitude", block_size=block_size, block_masks=masks, classifier_mask=cls_mask,
                     density=density)
    apply_masks(pruned, plan)
    return pruned, plan


def apply_masks(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Install the plan's masks in place: every masked encoder linear becomes a MaskedLinear with
    its block mask, the classifier a MaskedLinear with its element mask."""

    for name, bm in plan.block_masks.items():
        lin = model.get_submodule(name)
        _set_submodule(model, name, MaskedLinear.from_linear(lin, block_mask=bm, block_size=plan.block_size))
    if plan.classifier_mask is not None:
        fc = model.get_submodule("classifier.fc")
        _set_submodule(model, "classifier.fc", MaskedLinear.from_linear(fc, mask=plan.classifier_mask))
    return model


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
