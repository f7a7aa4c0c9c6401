"""Importances: what decides which blocks or nodes a pruning keeps (Torch-Pruning's pluggable
importance objects, SCIENCE.md sections 5 and 7). The pruner (:mod:`cctk.prune.pruner`) asks
them; they hold no state between its calls (the permutations the pruner applied are handed
back to them explicitly).

Block importances (:class:`BlockImportance`) score the B x B blocks of every encoder linear of a
(possibly permuted) CCT, may ask for function-preserving permutations first, and may give the
classifier an element mask of their own:

* :class:`AndcImportance` (``andc``): the SNP label-set rule (:class:`cctk.prune.andc.AndcRule`):
  overlap s_ji = |D_j ∩ D_i|, kept iff s_ji >= min_overlap, block score the kept fraction (ties by
  L1) or the summed overlap, label-sorted permutations, the classifier by the label-set rule;
  with ``shuffle_seed`` (``andc-shuffled``) every node group's label sets are permuted across its
  nodes first: the control separating "label-aware" from "any structured mask";
* :class:`AndcMagnitudeImportance` (``andc-magnitude``): ANDC's permutations, keep rule and
  classifier; block score sum over the block of keep_ji * |W_ji| (``kept-fraction``) or
  s_ji * keep_ji * |W_ji| (``sum``);
* :class:`MagnitudeImportance` (``magnitude``): block L1 norm, norm-sorted permutations (the
  same freedom ANDC gets);
* :class:`WandaImportance` (``wanda``): sum over the block of |W_ji| * ||x_i||_2, input norms on
  calibration images (training split), norm-sorted permutations;
* :class:`RandomImportance` (``random``): seeded random block scores, no permutation.

Node importances (:class:`NodeImportance`, structured pruning: whole FF units and head dims):

* :class:`SNPNodeImportance` (``snp``): |D_n| (nodes recognising fewer labels go first), ties by
  activation norm;
* :class:`ActivationNodeImportance` (``activation``): activation norm ||h_n||_2 on calibration images.

Nothing here reads a test split: the label sets come from the SNP pass (on validation data in
``cctk study``) and the calibration images from the training split.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from cctk.prune.andc import (AndcRule, RecognizedSets, andc_layer_masks, best_andc_permutations,
                             layer_connections, rule_stats, shuffle_label_sets)
from cctk.prune.masks import (andc_block_scores, block_grid, block_reduce, classifier_keep, magnitude_element_mask,
                              topk_block_mask)
from cctk.prune.plan import Permutations, Target, encoder_linear_names

__all__ = ["BlockImportance", "AndcImportance", "AndcMagnitudeImportance", "MagnitudeImportance",
           "WandaImportance", "RandomImportance", "NodeImportance", "SNPNodeImportance",
           "ActivationNodeImportance", "input_norms", "norm_permutations", "layer_weight"]


def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The (masked) weight of the linear ``name``, float on the CPU."""
    m = model.get_submodule(name)
    w = m.masked_weight() if hasattr(m, "masked_weight") else m.weight
    return w.detach().float().cpu()


class BlockImportance:
    """Base class of block importances. Subclasses set ``name`` and implement
    :meth:`block_scores`; :meth:`permutations` (None: none), :meth:`tau_masks` (a keep rule of
    their own) and :meth:`classifier_mask` (None: the pruner's count rule) are optional."""

    name = "block"
    #: the ANDC rule's choices, for importances that read label sets (recorded in the plan)
    rule: Optional[AndcRule] = None

    def permutations(self, model: nn.Module, target: Target) -> Optional[Permutations]:
        return None

    def block_scores(self, model: nn.Module, perms: Optional[Permutations], block_size: int) -> Dict[str, torch.Tensor]:
        """{layer: (ceil(out/B), ceil(in/B)) scores} of every encoder linear of the permuted model."""
        raise NotImplementedError

    def tau_masks(self, model: nn.Module, perms: Optional[Permutations], target: Target):
        raise ValueError(f"importance {self.name!r} has no keep rule; give a density, not tau")

    def layer_stats(self, model: nn.Module, perms: Optional[Permutations], masks: Mapping[str, torch.Tensor],
                    block_size: int) -> Dict[str, dict]:
        """Per-layer facts about the chosen ``masks`` worth recording (ANDC: what its rule keeps)."""
        return {}

    def classifier_mask(self, model: nn.Module, perms: Optional[Permutations],
                        n_keep: Optional[int]) -> Optional[torch.Tensor]:
        """Element mask of classifier.fc keeping ``n_keep`` weights (None: dense); by magnitude
        unless the importance has a rule of its own."""
        if n_keep is None:
            return None
        return magnitude_element_mask(layer_weight(model, "classifier.fc"), int(n_keep))


class AndcImportance(BlockImportance):
    """ANDC's rule (:class:`cctk.prune.andc.AndcRule`) on the SNP label sets ``sets``.
    ``classifier_sets`` (d, K) replaces the final-stream sets; ``prune_classifier`` False leaves
    the classifier dense; ``shuffle_seed``: the shuffled-label-sets control."""

    name = "andc"

    def __init__(self, sets: RecognizedSets, rule: AndcRule = AndcRule(), prune_classifier: bool = True,
                 classifier_sets: Optional[torch.Tensor] = None, shuffle_seed: Optional[int] = None):
        if classifier_sets is not None:
            if tuple(classifier_sets.shape) != tuple(sets.final.shape):
                raise ValueError(f"classifier_sets must have shape {tuple(sets.final.shape)}, "
                                 f"got {tuple(classifier_sets.shape)}")
            sets = dataclasses.replace(sets, final=classifier_sets.to(torch.bool).cpu())
        if shuffle_seed is not None:
            sets = shuffle_label_sets(sets, shuffle_seed)
            self.name = "andc-shuffled"
        self.sets = sets.with_token_sets(rule.token_sets)   # measured sets, or the explicit assumption
        self.rule, self.prune_classifier = rule, prune_classifier

    def _sets(self, model: nn.Module, perms: Optional[Permutations]) -> RecognizedSets:
        """The label sets indexed like the (permuted) model."""
        if len(self.sets.ff) != len(model.blocks):
            raise ValueError(f"label sets describe {len(self.sets.ff)} blocks, the model has {len(model.blocks)}")
        return self.sets if perms is None else self.sets.permuted(perms)

    def permutations(self, model, target):
        self._sets(model, None)
        return best_andc_permutations(model, self.sets, self.rule, target) if self.rule.permute else None

    def _connections(self, model, perms, name):
        return layer_connections(model, self._sets(model, perms), name, self.rule)

    def block_scores(self, model, perms, block_size):
        return {name: andc_block_scores(*self._connections(model, perms, name), block_size, self.rule.block_score)
                for name in encoder_linear_names(model)}

    def tau_masks(self, model, perms, target):
        return andc_layer_masks(model, self._sets(model, perms), self.rule, target)[0]

    def layer_stats(self, model, perms, masks, block_size):
        return {name: rule_stats(*self._connections(model, perms, name), bm, self.rule, block_size)
                for name, bm in masks.items()}

    def classifier_mask(self, model, perms, n_keep):
        return classifier_keep(self._sets(model, perms).final) if self.prune_classifier else None


class AndcMagnitudeImportance(AndcImportance):
    """Label-aware magnitude: ANDC's permutations, keep rule (tau too) and classifier; block
    score sum over the block of keep_ji * |W_ji| (``kept-fraction``: each kept connection
    counts by its magnitude) or s_ji * keep_ji * |W_ji| (``sum``)."""

    name = "andc-magnitude"

    def element_scores(self, model, perms, name):
        s, keep = self._connections(model, perms, name)
        counted = keep.double() if self.rule.block_score == "kept-fraction" else s.double() * keep
        return counted * layer_weight(model, name).abs().double()

    def block_scores(self, model, perms, block_size):
        return {name: block_reduce(self.element_scores(model, perms, name), block_size)
                for name in encoder_linear_names(model)}


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
        qkv, proj = layer_weight(model, f"{p}.self_attn.qkv"), layer_weight(model, f"{p}.self_attn.proj")
        l1, l2 = layer_weight(model, f"{p}.linear1"), layer_weight(model, f"{p}.linear2")
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


class MagnitudeImportance(BlockImportance):
    """Block L1 norm; ``permute``: norm-sorted permutations first."""

    name = "magnitude"

    def __init__(self, permute: bool = True):
        self.permute = permute

    def permutations(self, model, target):
        return norm_permutations(model) if self.permute else None

    def block_scores(self, model, perms, block_size):
        return {name: block_reduce(layer_weight(model, name).abs(), block_size) for name in encoder_linear_names(model)}


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


class WandaImportance(BlockImportance):
    """|W_ji| * ||x_i||_2 summed over a block; input norms from ``calibration`` (an iterable of
    training-split image batches), measured on the model as the pruner hands it over (before
    the permutation for choosing it, after it for the scores: function preserving, so the norms
    permute along)."""

    name = "wanda"

    def __init__(self, calibration: Iterable, device="cpu", permute: bool = True):
        self.calibration, self.device, self.permute = calibration, device, permute

    def norms(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        return input_norms(model, self.calibration, encoder_linear_names(model) + ["classifier.fc"], self.device)

    def permutations(self, model, target):
        return norm_permutations(model, self.norms(model)) if self.permute else None

    def element_scores(self, model, name, norms):
        return layer_weight(model, name).abs() * norms[name][None, :]

    def block_scores(self, model, perms, block_size):
        norms = self.norms(model)
        return {name: block_reduce(self.element_scores(model, name, norms), block_size)
                for name in encoder_linear_names(model)}

    def classifier_mask(self, model, perms, n_keep):
        if n_keep is None:
            return None
        return topk_block_mask(self.element_scores(model, "classifier.fc", self.norms(model)), int(n_keep))


class RandomImportance(BlockImportance):
    """Seeded uniform random block scores (and a random classifier mask of the same count)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def block_scores(self, model, perms, block_size):
        out = {}
        for i, name in enumerate(encoder_linear_names(model)):
            g = torch.Generator().manual_seed(self.seed * 1009 + i)
            out[name] = torch.rand(block_grid(layer_weight(model, name).shape, block_size), generator=g,
                                   dtype=torch.float64)
        return out

    def classifier_mask(self, model, perms, n_keep):
        if n_keep is None:
            return None
        g = torch.Generator().manual_seed(self.seed * 1009 + 997)
        return topk_block_mask(torch.rand(layer_weight(model, "classifier.fc").shape, generator=g), int(n_keep))


# ---------------------------------------------------------------------------------------------
# node importances: structured pruning


class NodeImportance:
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


class ActivationNodeImportance(NodeImportance):
    """||h_n||_2 over the calibration images' tokens (FF: GELU output; MHA: head output)."""

    name = "activation"

    def __init__(self, calibration, device="cpu"):
        if calibration is None:
            raise ValueError("structured pruning needs calibration images (training split)")
        self.calibration, self.device = calibration, device

    def scores(self, model):
        return _node_norms(model, self.calibration, self.device)


class SNPNodeImportance(NodeImportance):
    """|D_n| (number of recognised labels); activation norm breaks ties (scaled below 1)."""

    name = "snp"

    def __init__(self, sets: RecognizedSets, calibration, device="cpu"):
        if sets is None:
            raise ValueError("node importance 'snp' needs the SNP label sets")
        if calibration is None:
            raise ValueError("structured pruning needs calibration images (training split)")
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
