"""One pruning API: pluggable scorers, one function from scores to block masks, one from node
scores to a smaller dense model (SCIENCE.md sections 5 and 7; in the spirit of Torch-Pruning's
importance callables).

A *block scorer* scores every connection (or directly every B x B block) of each encoder linear
of a (possibly permuted) CCT, may ask for function-preserving permutations first, and may give
the classifier an element mask. :func:`prune_blocks` turns any block scorer into block masks at a
per-layer density (the same ``round(density * n_blocks)`` per layer for every scorer, so all
methods meet equal per-layer densities) and a :class:`cctk.prune.andc.PrunePlan`.

Block scorers (``make_scorer(name, ...)``):

* ``andc``: SNP label-set overlap s_ji = |D_j ∩ D_i|, kept iff s_ji >= min_overlap, label-sorted
  permutations (the paper's keep rule with ``tau``; top blocks by kept score with ``density``).
* ``andc-shuffled``: ``andc`` with every node group's label sets permuted across its nodes
  (seeded): the control separating "label-aware" from "any structured mask". The classifier's
  sets are shuffled too, so its kept count equals ANDC's.
* ``magnitude``: block L1 norm sum |W_ji|, with norm-sorted permutations (stream channels, FF
  units and v dims ordered by the norm of the weights they touch), the same freedom ANDC gets.
* ``wanda``: sum over the block of |W_ji| * ||x_i||_2, the input norms measured on calibration
  images (training split), norm-sorted permutations as for magnitude.
* ``random``: seeded random block scores, no permutation.
* ``andc-magnitude`` (a hybrid, label-aware magnitude): ANDC's permutations and keep rule, block
  score sum over the block of s_ji * keep_ji * |W_ji| (overlap x magnitude); not in ``all``.

Node scorers (``make_node_scorer(name, ...)``) for :func:`prune_nodes` (structured pruning: whole
FF units and head dims removed, :func:`cctk.prune.structured.remove_nodes` builds the smaller
dense model):

* ``snp``: nodes with fewer recognised labels go first (|D_n| ascending; ties by activation norm);
* ``activation``: nodes with the smallest activation norm ||h_n||_2 on calibration images go first.

The hybrid ``structured-andc`` (:func:`cctk.prune.workflow.prune_model`) removes nodes by ``snp``
and then prunes the smaller model's linears into ANDC blocks (the kept nodes' label sets,
:meth:`cctk.prune.andc.RecognizedSets.select_nodes`).

Nothing here reads a test split: the label sets come from the SNP pass (on validation data in
``cctk study``) and the calibration images from the training split.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from cctk.prune.andc import (Permutations, PrunePlan, RecognizedSets, _andc_masks, _density_for,
                             apply_masks, apply_permutations, best_andc_permutations,
                             encoder_linear_names, layer_label_sets)
from cctk.prune.masks import (block_grid, block_reduce, classifier_keep, connection_keep,
                              magnitude_element_mask, num_blocks_to_keep, overlap_scores, topk_block_mask)
from cctk.prune.structured import remove_nodes

__all__ = ["BlockScorer", "AndcScorer", "AndcMagnitudeScorer", "MagnitudeScorer", "WandaScorer", "RandomScorer",
           "BLOCK_METHODS", "NODE_METHODS", "STUDY_METHODS", "ALL_METHODS", "make_scorer", "shuffle_label_sets",
           "input_norms", "norm_permutations", "prune_blocks", "NodeScorer", "make_node_scorer",
           "prune_nodes"]

BLOCK_METHODS = ("andc", "magnitude", "wanda", "random", "andc-shuffled", "andc-magnitude")
NODE_METHODS = ("snp", "activation")
# the study's method names: the block scorers, structured removal ranked by SNP / activation, and
# the hybrid structured-andc (SNP-ranked node removal, then ANDC blocks in the smaller model)
STUDY_METHODS = BLOCK_METHODS + ("structured", "structured-activation", "structured-andc")
# what ``--methods all`` runs: the six methods and structured's activation baseline
ALL_METHODS = ("andc", "magnitude", "wanda", "random", "andc-shuffled", "structured", "structured-activation")


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    m = model.get_submodule(name)
    w = m.masked_weight() if hasattr(m, "masked_weight") else m.weight
    return w.detach().float().cpu()


class BlockScorer:
    """Base class. Subclasses set ``name`` and implement :meth:`element_scores` (or override
    :meth:`layer_masks`); :meth:`permutations` (None: no permutation) and
    :meth:`classifier_mask` (None: classifier left dense) are optional."""

    name = "scorer"

    def permutations(self, model: nn.Module, block_size: int, density, tau) -> Optional[Permutations]:
        return None

    def element_scores(self, model: nn.Module, name: str) -> torch.Tensor:
        raise NotImplementedError

    def block_scores(self, model: nn.Module, name: str, block_size: int) -> torch.Tensor:
        return block_reduce(self.element_scores(model, name), block_size)

    def layer_masks(self, model: nn.Module, block_size: int, density, tau) -> Tuple[Dict[str, torch.Tensor], Dict[str, dict]]:
        if tau is not None:
            raise ValueError(f"scorer {self.name!r} has no keep rule; give a density, not tau")
        masks = {}
        for name in encoder_linear_names(model):
            scores = self.block_scores(model, name, block_size)
            tie = block_reduce(_weight(model, name).abs(), block_size)
            n_keep = num_blocks_to_keep(_density_for(density, name), scores.numel())
            masks[name] = topk_block_mask(scores, n_keep, tie)
        return masks, {}

    def classifier_mask(self, model: nn.Module, n_keep: Optional[int]) -> Optional[torch.Tensor]:
        """Element mask of classifier.fc keeping ``n_keep`` weights (None: dense)."""
        if n_keep is None:
            return None
        return magnitude_element_mask(_weight(model, "classifier.fc"), int(n_keep))


class AndcScorer(BlockScorer):
    """ANDC through :func:`prune_blocks`: the same permutations, masks and classifier mask as
    :func:`cctk.prune.andc.prune_andc` (tested). ``classifier_sets`` (d, K) replaces the
    final-stream sets."""

    name = "andc"

    def __init__(self, sets: RecognizedSets, min_overlap: int = 1, order: str = "auto",
                 permute: bool = True, prune_classifier: bool = True,
                 classifier_sets: Optional[torch.Tensor] = None):
        if classifier_sets is not None:
            if tuple(classifier_sets.shape) != tuple(sets.final.shape):
                raise ValueError(f"classifier_sets must have shape {tuple(sets.final.shape)}, "
                                 f"got {tuple(classifier_sets.shape)}")
            sets = dataclasses.replace(sets, final=classifier_sets.to(torch.bool).cpu())
        self.sets, self.min_overlap, self.order = sets, min_overlap, order
        self.permute, self.prune_classifier = permute, prune_classifier
        self._active = sets  # the sets re-indexed to the permuted model

    def permutations(self, model, block_size, density, tau):
        if len(self.sets.ff) != len(model.blocks):
            raise ValueError(f"label sets describe {len(self.sets.ff)} blocks, the model has {len(model.blocks)}")
        self._active = self.sets
        if not self.permute:
            return None
        perms = best_andc_permutations(model, self.sets, block_size, density, tau, self.min_overlap, self.order)
        self._active = self.sets.permuted(perms)
        return perms

    def layer_masks(self, model, block_size, density, tau):
        return _andc_masks(model, self._active, block_size, density, tau, self.min_overlap)

    def classifier_mask(self, model, n_keep):
        return classifier_keep(self._active.final) if self.prune_classifier else None


class AndcMagnitudeScorer(AndcScorer):
    """Label-aware magnitude: ANDC's permutations, classifier and keep rule; block score
    sum s_ji * keep_ji * |W_ji| at the target density (the tau rule stays ANDC's own)."""

    name = "andc-magnitude"

    def layer_masks(self, model, block_size, density, tau):
        if tau is not None:
            return super().layer_masks(model, block_size, density, tau)
        return BlockScorer.layer_masks(self, model, block_size, density, tau)

    def element_scores(self, model, name):
        out_sets, in_sets = layer_label_sets(self._active, name, model.head_dim)
        s = overlap_scores(out_sets, in_sets)
        return (s * connection_keep(s, self.min_overlap)).double() * _weight(model, name).abs().double()


def shuffle_label_sets(sets: RecognizedSets, seed: int = 0) -> RecognizedSets:
    """Each node group's label sets permuted across its nodes (one seeded permutation per
    group): every node keeps a real label set, but not its own."""
    g = torch.Generator().manual_seed(int(seed))

    def sh(x: torch.Tensor) -> torch.Tensor:
        return x[torch.randperm(x.shape[0], generator=g)]

    return RecognizedSets(heads=[sh(h) for h in sets.heads], mha=[sh(m) for m in sets.mha],
                          ff=[sh(f) for f in sets.ff], stream_mha=[sh(s) for s in sets.stream_mha],
                          stream_ff=[sh(s) for s in sets.stream_ff], final=sh(sets.final),
                          tokens=sets.tokens if sets.tokens_assumed else sh(sets.tokens),
                          tokens_assumed=sets.tokens_assumed)


def _descending(norms: torch.Tensor) -> torch.Tensor:
    return torch.sort(-norms.double(), stable=True).indices


def norm_permutations(model: nn.Module, node_norms: Optional[Mapping[str, torch.Tensor]] = None) -> Permutations:
    """Norm-sorted permutations (largest first): stream channels by the summed column norms of
    every linear reading the stream and row norms of every linear writing it; FF units by
    ||W1 row|| * ||W2 column||; v dims of each head by ||v row|| * ||proj column||.
    ``node_norms`` ({layer name: input norms}, e.g. :func:`input_norms`) multiplies in the
    inputs' activation norms (wanda)."""
    H, dh = model.num_heads, model.head_dim
    stream = torch.zeros(model.embed_dim, dtype=torch.float64)
    ff, qk, v = [], [], []
    for b in range(len(model.blocks)):
        p = f"classifier.blocks.{b}"
        qkv, proj = _weight(model, f"{p}.self_attn.qkv"), _weight(model, f"{p}.self_attn.proj")
        l1, l2 = _weight(model, f"{p}.linear1"), _weight(model, f"{p}.linear2")
        stream += qkv.norm(dim=0).double() + l1.norm(dim=0).double()
        stream += proj.norm(dim=1).double() + l2.norm(dim=1).double()
        u = l1.norm(dim=1) * l2.norm(dim=0)
        if node_norms is not None and f"{p}.linear2" in node_norms:
            u = u * node_norms[f"{p}.linear2"]
        ff.append(_descending(u))
        d = qkv.shape[0] // 3   # the inner width H * d_h
        vn = qkv[2 * d:].norm(dim=1) * proj.norm(dim=0)
        if node_norms is not None and f"{p}.self_attn.proj" in node_norms:
            vn = vn * node_norms[f"{p}.self_attn.proj"]
        qk.append([torch.arange(dh) for _ in range(H)])
        v.append([_descending(vn[h * dh:(h + 1) * dh]) for h in range(H)])
    return Permutations(stream=_descending(stream), ff=ff, qk=qk, v=v, order="norm")


class MagnitudeScorer(BlockScorer):
    """Block L1 norm; ``permute``: norm-sorted permutations first."""

    name = "magnitude"

    def __init__(self, permute: bool = True):
        self.permute = permute

    def permutations(self, model, block_size, density, tau):
        return norm_permutations(model) if self.permute else None

    def element_scores(self, model, name):
        return _weight(model, name).abs()


@torch.no_grad()
def input_norms(model: nn.Module, images: Iterable, names: Sequence[str], device="cpu") -> Dict[str, torch.Tensor]:
    """{name: ||x_i||_2} of the input features of each named linear over every token of every
    calibration image (``images``: an iterable of image batches, or of (images, labels))."""
    device = torch.device(device)
    sums = {n: None for n in names}
    hooks = []

    def hook_for(n):
        def hook(_m, inp):
            x = inp[0].detach().double()
            s = x.pow(2).reshape(-1, x.shape[-1]).sum(0).cpu()
            sums[n] = s if sums[n] is None else sums[n] + s
        return hook

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook_for(n)))
    was = model.training
    model.eval().to(device)
    seen = 0
    try:
        for batch in images:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            seen += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if seen == 0:
        raise ValueError("no calibration images: the calibration loader is empty")
    return {n: s.sqrt().float() for n, s in sums.items()}


class WandaScorer(BlockScorer):
    """|W_ji| * ||x_i||_2 summed over a block; input norms from ``calibration`` (an iterable of
    training-split image batches), measured on the permuted model."""

    name = "wanda"

    def __init__(self, calibration: Iterable, device="cpu", permute: bool = True):
        self.calibration, self.device, self.permute = calibration, device, permute
        self._norms: Dict[str, torch.Tensor] = {}

    def _measure(self, model):
        names = encoder_linear_names(model) + ["classifier.fc"]
        self._norms = input_norms(model, self.calibration, names, self.device)

    def permutations(self, model, block_size, density, tau):
        self._measure(model)
        if not self.permute:
            return None
        return norm_permutations(model, self._norms)

    def layer_masks(self, model, block_size, density, tau):
        self._measure(model)  # on the permuted model (function preserving: norms permute along)
        return super().layer_masks(model, block_size, density, tau)

    def element_scores(self, model, name):
        return _weight(model, name).abs() * self._norms[name][None, :]

    def classifier_mask(self, model, n_keep):
        if n_keep is None:
            return None
        return topk_block_mask(self.element_scores(model, "classifier.fc"), int(n_keep))


class RandomScorer(BlockScorer):
    """Seeded uniform random block scores (and a random classifier mask of the same count)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def block_scores(self, model, name, block_size):
        names = encoder_linear_names(model)
        g = torch.Generator().manual_seed(self.seed * 1009 + names.index(name))
        return torch.rand(block_grid(_weight(model, name).shape, block_size), generator=g, dtype=torch.float64)

    def classifier_mask(self, model, n_keep):
        if n_keep is None:
            return None
        g = torch.Generator().manual_seed(self.seed * 1009 + 997)
        return topk_block_mask(torch.rand(_weight(model, "classifier.fc").shape, generator=g), int(n_keep))


def make_scorer(method: str, sets: Optional[RecognizedSets] = None, calibration=None, seed: int = 0,
                device="cpu", **andc_options) -> BlockScorer:
    """The block scorer called ``method`` (one of :data:`BLOCK_METHODS`). ``sets``: the SNP label
    sets (andc, andc-shuffled); ``calibration``: training-split image batches (wanda); ``seed``:
    random and andc-shuffled; ``andc_options``: :class:`AndcScorer` keywords."""
    if method not in BLOCK_METHODS:
        raise ValueError(f"unknown block-pruning method {method!r}; choose from {', '.join(BLOCK_METHODS)}")
    if method in ("andc", "andc-shuffled", "andc-magnitude"):
        if sets is None:
            raise ValueError(f"method {method!r} needs the SNP label sets")
        if method == "andc-magnitude":
            sc = AndcMagnitudeScorer(sets, **andc_options)
            return sc
        if method == "andc-shuffled":
            cs = andc_options.pop("classifier_sets", None)
            sets = shuffle_label_sets(sets if cs is None else dataclasses.replace(sets, final=cs.to(torch.bool)), seed)
            sc = AndcScorer(sets, **andc_options)
            sc.name = "andc-shuffled"
            return sc
        return AndcScorer(sets, **andc_options)
    if method == "magnitude":
        return MagnitudeScorer()
    if method == "wanda":
        if calibration is None:
            raise ValueError("method 'wanda' needs calibration images (training split)")
        return WandaScorer(calibration, device=device)
    return RandomScorer(seed)


def prune_blocks(model: nn.Module, scorer: BlockScorer, density=0.25, block_size: int = 32,
                 tau: Optional[float] = None, classifier_kept: Optional[int] = None):
    """Prune a copy of ``model`` with ``scorer``: permute (if the scorer asks), score, keep the
    top ``round(density * n_blocks)`` blocks of every encoder linear (``density``: float or
    {layer: float}; or ANDC's ``tau`` rule), mask the classifier (the scorer's rule, keeping
    ``classifier_kept`` weights where the scorer has no rule of its own; None: dense).
    Returns (pruned model with MaskedLinear layers, PrunePlan)."""
    if not isinstance(scorer, BlockScorer):
        raise TypeError(f"scorer must be a cctk.prune.scorers.BlockScorer, got {type(scorer).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if tau is not None:
        density = None
    elif density is None:
        raise ValueError("give a density (or tau for ANDC)")
    pruned = copy.deepcopy(model)
    perms = scorer.permutations(pruned, block_size, density, tau)
    if perms is not None:
        apply_permutations(pruned, perms)
    masks, stats = scorer.layer_masks(pruned, block_size, density, tau)
    cls_mask = scorer.classifier_mask(pruned, classifier_kept)
    sets = getattr(scorer, "_active", None)
    plan = PrunePlan(method=scorer.name, block_size=block_size, block_masks=masks, classifier_mask=cls_mask,
                     permutations=perms, min_overlap=getattr(scorer, "min_overlap", 1), density=density,
                     tau=tau, tokens_assumed=bool(sets.tokens_assumed) if sets is not None else False,
                     layer_stats=stats)
    apply_masks(pruned, plan)
    return pruned, plan


# ---------------------------------------------------------------------------------------------
# structured: node scores -> a smaller dense model


class NodeScorer:
    """Scores (higher = more important) of every FF unit and head dim: ``scores(model)`` returns
    ({block: (d_ff,)}, {block: (H, d_h)})."""

    name = "node"

    def scores(self, model: nn.Module):
        raise NotImplementedError


def _node_norms(model, calibration, device):
    names = []
    for b in range(len(model.blocks)):
        names += [f"classifier.blocks.{b}.linear2", f"classifier.blocks.{b}.self_attn.proj"]
    n = input_norms(model, calibration, names, device)
    H, dh = model.num_heads, model.head_dim
    ff = {b: n[f"classifier.blocks.{b}.linear2"].double() for b in range(len(model.blocks))}
    heads = {b: n[f"classifier.blocks.{b}.self_attn.proj"].double().view(H, dh) for b in range(len(model.blocks))}
    return ff, heads


class ActivationNodeScorer(NodeScorer):
    """||h_n||_2 over the calibration images' tokens (FF: GELU output; MHA: head output)."""

    name = "activation"

    def __init__(self, calibration, device="cpu"):
        self.calibration, self.device = calibration, device

    def scores(self, model):
        return _node_norms(model, self.calibration, self.device)


class SNPNodeScorer(NodeScorer):
    """|D_n| (number of recognised labels); activation norm breaks ties (scaled below 1)."""

    name = "snp"

    def __init__(self, sets: RecognizedSets, calibration, device="cpu"):
        self.sets, self.calibration, self.device = sets, calibration, device

    def scores(self, model):
        if len(self.sets.ff) != len(model.blocks):
            raise ValueError(f"label sets describe {len(self.sets.ff)} blocks, the model has {len(model.blocks)}")
        ff_n, head_n = _node_norms(model, self.calibration, self.device)
        H, dh = model.num_heads, model.head_dim
        tie = lambda x: x / (x.max() + 1) * 0.5  # noqa: E731  (in [0, 0.5): never beats one label
        ff = {b: self.sets.ff[b].sum(1).double() + tie(ff_n[b]) for b in ff_n}
        heads = {b: self.sets.mha[b].sum(1).double().view(H, dh) + tie(head_n[b]) for b in head_n}
        return ff, heads


def make_node_scorer(method: str, sets: Optional[RecognizedSets] = None, calibration=None,
                     device="cpu") -> NodeScorer:
    if method not in NODE_METHODS:
        raise ValueError(f"unknown node-scoring method {method!r}; choose from {', '.join(NODE_METHODS)}")
    if calibration is None:
        raise ValueError("structured pruning needs calibration images (training split)")
    if method == "snp":
        if sets is None:
            raise ValueError("node scores 'snp' need the SNP label sets")
        return SNPNodeScorer(sets, calibration, device)
    return ActivationNodeScorer(calibration, device)


def prune_nodes(model: nn.Module, scorer: NodeScorer, keep_fraction: float):
    """Keep the top ``round(keep_fraction * n)`` FF units of every block and head dims of every
    head (at least one), by ``scorer``; returns (smaller dense CCT, {"ff_keep", "head_dims_keep"})."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
    ff_scores, head_scores = scorer.scores(model)
    ff_keep, head_keep = {}, {}
    for b, s in ff_scores.items():
        k = max(1, round(keep_fraction * s.numel()))
        ff_keep[b] = torch.sort(_descending(s)[:k]).values
    for b, s in head_scores.items():
        k = max(1, round(keep_fraction * s.shape[1]))
        head_keep[b] = torch.stack([torch.sort(_descending(s[h])[:k]).values for h in range(s.shape[0])])
    return remove_nodes(model, ff_keep, head_keep), {"ff_keep": ff_keep, "head_dims_keep": head_keep}
