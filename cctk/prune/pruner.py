"""The pruner: one registry of methods, one function from a block importance to block masks,
one from a node importance to a smaller dense CCT, one entry point for every method
(Torch-Pruning's shape: importances are pluggable objects, :mod:`cctk.prune.importance`).

* :data:`METHODS`: name -> :class:`Method` (its importance, its kind ``block``, ``node`` or
  ``hybrid``, whether ``--methods all`` runs it, whether it reads the SNP label sets, and the
  ANDC-rule choices it fixes: the ablation variants ``andc-old*``).
* :func:`prune_blocks` (model, block importance, :class:`cctk.prune.plan.Target`): permute if the
  importance asks, keep the top ``round(density * n_blocks)`` blocks of every encoder linear by
  its scores (ties by block L1 norm; the same count for every importance, so all methods meet
  equal per-layer densities) or its own tau rule, mask the classifier; -> (pruned copy, PrunePlan).
* :func:`prune_nodes` (model, node importance, kept fraction): a smaller dense CCT.
* :func:`prune_model` (model, :class:`PruneSpec`, sets, calibration): any method of the registry.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from cctk.prune.andc import OLD_RULE, AndcRule, RecognizedSets, apply_permutations
from cctk.prune.convert import relative_linear_density
from cctk.prune.importance import (ActivationNodeImportance, AndcImportance, AndcMagnitudeImportance,
                                   BlockImportance, MagnitudeImportance, NodeImportance, RandomImportance,
                                   SNPNodeImportance, WandaImportance, layer_weight)
from cctk.prune.masks import block_grid, block_reduce, budget_block_mask, classifier_keep
from cctk.prune.plan import DEFAULT_QKV_BUDGET, PrunePlan, Target, apply_masks, budget_groups, encoder_linear_names
from cctk.prune.structured import remove_nodes

__all__ = ["Method", "METHODS", "ALL_METHODS", "STRUCTURED_METHODS", "PruneSpec", "method_rule", "prune_blocks",
           "prune_nodes", "prune_model", "prune_andc", "prune_magnitude", "hybrid_node_fraction"]


@dataclass(frozen=True)
class PruneSpec:
    """One pruning run: the method and its target (``density`` or ``tau``, ``block_size``), the
    ANDC ``rule`` (for the methods that read label sets; a method of the registry may fix some
    of its choices), the classifier (``classifier`` False: dense; ``classifier_sets``: (d, K)
    sets replacing the SNP's final-stream sets), ``seed`` (random, andc-shuffled), and the
    fine-tune that :func:`cctk.prune.workflow.prune_and_finetune` runs after it
    (``finetune_epochs``, ``lr``, ``sparse_finetune``, ``convert`` to ANDCLinear)."""

    method: str = "andc"
    density: Optional[float] = 0.25
    tau: Optional[float] = None
    block_size: int = 32
    rule: AndcRule = field(default_factory=AndcRule)
    classifier: bool = True
    classifier_sets: Optional[torch.Tensor] = None
    seed: int = 0
    qkv_budget: str = DEFAULT_QKV_BUDGET
    finetune_epochs: int = 5
    lr: float = 1e-3
    sparse_finetune: bool = False
    convert: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")


@dataclass(frozen=True)
class Method:
    """A registered pruning method. ``build(rule, spec, sets, calibration, device)`` returns its
    importance (a BlockImportance for ``block``, a NodeImportance for ``node`` and ``hybrid``);
    ``in_all``: run by ``--methods all``; ``needs_sets``: reads the SNP label sets;
    ``needs_calibration``: reads training images; ``uses_rule``: prunes by the ANDC rule;
    ``rule``: the ANDC-rule choices the method fixes over the spec's (``{}``: none)."""

    name: str
    kind: str
    in_all: bool
    needs_sets: bool
    build: Callable
    rule: Mapping[str, object] = field(default_factory=dict)
    uses_rule: bool = False
    needs_calibration: bool = False
    help: str = ""


def _andc(cls=AndcImportance, shuffled=False):
    def build(rule, spec, sets, calibration, device):
        return cls(sets, rule, prune_classifier=spec.classifier, classifier_sets=spec.classifier_sets,
                   shuffle_seed=spec.seed if shuffled else None)
    return build


def _snp_nodes(rule, spec, sets, calibration, device):
    return SNPNodeImportance(sets, calibration, device)


def _old(**fix):
    """The old rule (:data:`cctk.prune.andc.OLD_RULE`) with the given choices of the new one."""
    return {k: getattr(OLD_RULE, k) for k in ("block_score", "v_sets", "token_sets")} | fix


_REGISTRY = [
    Method("andc", "block", True, True, _andc(), uses_rule=True,
           help="the SNP label-set rule (kept-fraction blocks, node sets for v, measured token sets)"),
    Method("magnitude", "block", True, False, lambda r, s, sets, c, d: MagnitudeImportance(),
           help="block L1 norm, norm-sorted permutations (the baseline)"),
    Method("wanda", "block", True, False, lambda r, s, sets, c, d: WandaImportance(c, device=d),
           needs_calibration=True, help="|W| x input norm on calibration images"),
    Method("random", "block", True, False, lambda r, s, sets, c, d: RandomImportance(s.seed),
           help="seeded random blocks"),
    Method("andc-shuffled", "block", True, True, _andc(shuffled=True), uses_rule=True,
           help="andc with every node group's label sets shuffled across its nodes (control)"),
    Method("structured", "node", True, True, _snp_nodes, needs_calibration=True,
           help="whole FF units and head dims removed, fewest recognised labels first"),
    Method("structured-activation", "node", True, False,
           lambda r, s, sets, c, d: ActivationNodeImportance(c, d), needs_calibration=True,
           help="whole nodes removed, smallest activation norm first"),
    Method("andc-magnitude", "block", False, True, _andc(AndcMagnitudeImportance), uses_rule=True,
           help="andc's keep rule, blocks scored by kept |W|"),
    Method("structured-andc", "hybrid", False, True, _snp_nodes, uses_rule=True, needs_calibration=True,
           help="SNP-ranked node removal, then andc blocks in the smaller model"),
    # the ablation of issue 18: cctk's first rule, and that rule with each fix alone
    Method("andc-old", "block", False, True, _andc(), rule=_old(), uses_rule=True,
           help="cctk's first rule: summed overlap, head sets for v, token channels assumed to recognise every label"),
    Method("andc-old+tokens", "block", False, True, _andc(), rule=_old(token_sets="measured"), uses_rule=True,
           help="the first rule with measured token sets"),
    Method("andc-old+kept-fraction", "block", False, True, _andc(), rule=_old(block_score="kept-fraction"),
           uses_rule=True, help="the first rule with kept-fraction block scores"),
    Method("andc-old+node-v", "block", False, True, _andc(), rule=_old(v_sets="node"), uses_rule=True,
           help="the first rule with node sets for v rows"),
]
#: every pruning method, by name
METHODS: Dict[str, Method] = {m.name: m for m in _REGISTRY}
#: what ``--methods all`` runs
ALL_METHODS = tuple(m.name for m in _REGISTRY if m.in_all)
#: the methods that remove whole nodes (a smaller dense model, maybe with blocks after)
STRUCTURED_METHODS = tuple(m.name for m in _REGISTRY if m.kind != "block")


def method_rule(method: str, rule: AndcRule) -> Optional[AndcRule]:
    """The ANDC rule ``method`` prunes by (``rule`` with the method's fixed choices), or None for
    a method that reads no label-set rule."""
    m = METHODS[method]
    return dataclasses.replace(rule, **m.rule) if m.uses_rule else None


def prune_blocks(model: nn.Module, importance: BlockImportance, target: Target) -> Tuple[nn.Module, PrunePlan]:
    """Prune a copy of ``model`` by ``importance`` at ``target`` (see the module docstring).
    Returns (pruned model with MaskedLinear layers, PrunePlan)."""
    if not isinstance(importance, BlockImportance):
        raise TypeError(f"importance must be a cctk.prune.importance.BlockImportance, got {type(importance).__name__}")
    B = target.block_size
    pruned = copy.deepcopy(model)
    perms = importance.permutations(pruned, target)
    if perms is not None:
        apply_permutations(pruned, perms)
    if target.tau is not None:
        masks = importance.tau_masks(pruned, perms, target)
    else:
        scores = importance.block_scores(pruned, perms, B)
        masks = {}
        for name in encoder_linear_names(pruned):
            tie = block_reduce(layer_weight(pruned, name).abs(), B)
            masks[name] = budget_block_mask(scores[name], target.layer_density(name), tie,
                                            target.budget_groups(name))
    plan = PrunePlan(method=importance.name, block_size=B, block_masks=masks,
                     classifier_mask=importance.classifier_mask(pruned, perms, target.classifier_kept),
                     permutations=perms, density=target.density, tau=target.tau,
                     rule=importance.rule.as_dict() if importance.rule is not None else None,
                     layer_stats=importance.layer_stats(pruned, perms, masks, B))
    apply_masks(pruned, plan)
    return pruned, plan


def _descending(scores: torch.Tensor) -> torch.Tensor:
    return torch.sort(-scores.double(), stable=True).indices


def prune_nodes(model: nn.Module, importance: NodeImportance, keep_fraction: float):
    """Keep the top ``round(keep_fraction * n)`` FF units of every block and head dims of every
    head (at least one), by ``importance``; returns (smaller dense CCT, {"ff_keep", "head_dims_keep"})."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
    ff_scores, head_scores = importance.scores(model)
    ff_keep, head_keep = {}, {}
    for b, s in ff_scores.items():
        k = max(1, round(keep_fraction * s.numel()))
        ff_keep[b] = torch.sort(_descending(s)[:k]).values
    for b, s in head_scores.items():
        k = max(1, round(keep_fraction * s.shape[1]))
        head_keep[b] = torch.stack([torch.sort(_descending(s[h])[:k]).values for h in range(s.shape[0])])
    return remove_nodes(model, ff_keep, head_keep), {"ff_keep": ff_keep, "head_dims_keep": head_keep}


def _structured_plan(model: nn.Module, method: str, density: float, block_size: int) -> PrunePlan:
    """The PrunePlan of a structurally pruned (smaller dense) CCT: no masks, the kept widths."""
    widths = {str(b): {"ff": blk.linear1.out_features, "head_dim": blk.self_attn.qkv.out_features // 3 // blk.self_attn.num_heads}
              for b, blk in enumerate(model.blocks)}
    return PrunePlan(method=method, block_size=block_size, block_masks={}, classifier_mask=None, density=density,
                     structured=widths)


def hybrid_node_fraction(model: nn.Module, density: float, block_size: int) -> float:
    """The node fraction f of ``structured-andc`` at a target linear density: the fraction on a
    1/8 grid nearest sqrt(density) (half the pruning by node removal, half by blocks) among
    those that keep every FF width and every head's inner width a multiple of the block size
    (so the smaller layers tile into whole blocks); sqrt(density) itself when none does."""
    target = math.sqrt(density)
    H = model.num_heads

    def tiles(f):
        ok = all(round(f * blk.linear1.out_features) % block_size == 0 for blk in model.blocks)
        return ok and all(H * round(f * blk.self_attn.qkv.out_features // 3 // H) % block_size == 0
                          for blk in model.blocks)
    grid = [k / 8 for k in range(1, 9) if tiles(k / 8) and k / 8 >= density]
    return min(grid, key=lambda f: abs(f - target)) if grid else target


def prune_model(model: nn.Module, spec: PruneSpec, sets: Union[RecognizedSets, str, Mapping, None] = None,
                calibration=None, device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, PrunePlan]:
    """(pruned copy of ``model``, PrunePlan) by the registered method ``spec.method``.

    Block methods give MaskedLinear layers at equal per-layer block densities (``spec.density``;
    or ANDC's ``tau`` rule, whose per-layer densities every other block method then meets too).
    The classifier: label-set methods keep its weights by the label-set rule (``spec.classifier``
    True); the other block methods keep as many of its weights as that rule keeps when ``sets``
    are given, else leave it dense. Node methods remove whole FF units and head dims (the kept
    fraction ``spec.density``) and return a smaller dense CCT; the hybrid ``structured-andc``
    then prunes the smaller model's linears into ANDC blocks down to ``spec.density`` of the
    input model's linear weights. ``sets``: the SNP label sets (a RecognizedSets, an SNP
    directory or its arrays); ``calibration``: training-split image batches (wanda, node methods)."""
    method = METHODS[spec.method]
    if sets is not None and not isinstance(sets, RecognizedSets):   # an SNP directory or its arrays
        sets = RecognizedSets.from_snp(sets, num_blocks=len(model.blocks))
    if method.needs_sets and sets is None:
        raise ValueError(f"method {method.name!r} needs the SNP label sets")
    rule = method_rule(method.name, spec.rule)
    B = spec.block_size
    if method.kind != "block":
        if spec.tau is not None or spec.density is None:
            raise ValueError(f"{method.name} takes a density (the kept fraction of FF units and head dims), not tau")
        nodes = method.build(rule, spec, sets, calibration, device)
        if method.kind == "node":
            pruned, _ = prune_nodes(model, nodes, spec.density)
            return pruned, _structured_plan(pruned, method.name, spec.density, B)
        # the hybrid: SNP-ranked node removal to the node fraction f, then ANDC blocks in the smaller
        # model (its nodes' label sets) down to the target linear density
        small, keep = prune_nodes(model, nodes, hybrid_node_fraction(model, spec.density, B))
        sub = sets.select_nodes(keep["ff_keep"], keep["head_dims_keep"], head_dim=model.head_dim)
        block_density = min(1.0, spec.density / relative_linear_density(model, small))
        imp = AndcImportance(sub, rule, prune_classifier=spec.classifier, classifier_sets=spec.classifier_sets)
        pruned, plan = prune_blocks(small, imp, Target(B, block_density, qkv_budget=spec.qkv_budget))
        plan.method, plan.structured = method.name, _structured_plan(small, method.name, spec.density, B).structured
        return pruned, plan
    density = spec.density
    if not method.uses_rule and spec.tau is not None:   # meet ANDC's per-layer densities at tau
        if sets is None:
            raise ValueError(f"{method.name} with tau needs the SNP label sets (it meets ANDC's per-layer densities)")
        _, ref = prune_blocks(model, AndcImportance(sets, spec.rule, prune_classifier=False), Target(B, tau=spec.tau))
        # (a split qkv: q, k and v each meet ANDC's own count)
        density = {n: tuple(float(b.float().mean()) for b in m.chunk(budget_groups(spec.qkv_budget, n), 0))
                   for n, m in ref.block_masks.items()}
    cls_sets = spec.classifier_sets if spec.classifier_sets is not None else (sets.final if sets is not None else None)
    n_cls = int(classifier_keep(cls_sets).sum()) if (spec.classifier and cls_sets is not None) else None
    target = Target(B, density, spec.tau if method.uses_rule else None, n_cls, spec.qkv_budget)
    pruned, plan = prune_blocks(model, method.build(rule, spec, sets, calibration, device), target)
    plan.method = method.name   # (the ablation variants share andc's importance)
    return pruned, plan


def prune_andc(model: nn.Module, sets, block_size: int = 32, density=0.25, tau: Optional[float] = None,
               prune_classifier: bool = True, classifier_sets: Optional[torch.Tensor] = None, **rule):
    """ANDC-prune a copy of ``model`` (``rule``: :class:`cctk.prune.andc.AndcRule` fields);
    returns (pruned model with MaskedLinear layers, PrunePlan)."""
    sets = sets if isinstance(sets, RecognizedSets) else RecognizedSets.from_snp(sets, num_blocks=len(model.blocks))
    imp = AndcImportance(sets, AndcRule(**rule), prune_classifier=prune_classifier, classifier_sets=classifier_sets)
    return prune_blocks(model, imp, Target(block_size, density, tau))


def prune_magnitude(model: nn.Module, block_size: int = 32, density=None,
                    blocks_kept: Optional[Mapping[str, int]] = None, classifier_kept: Optional[int] = None):
    """Block-magnitude baseline on a copy of ``model`` without permutation: ``blocks_kept[name]``
    blocks (e.g. an ANDC plan's counts: whole-layer counts, so a fused qkv meets its count over the
    layer) or a ``density`` per encoder linear (q, k and v each meet it: :data:`DEFAULT_QKV_BUDGET`);
    the classifier keeps its ``classifier_kept`` largest |W| (None: dense)."""
    if (density is None) == (blocks_kept is None):
        raise ValueError("give exactly one of density and blocks_kept")
    budget = DEFAULT_QKV_BUDGET
    if blocks_kept is not None:   # the counts as per-layer densities (round(k / n * n) = k)
        density = {n: blocks_kept[n] / math.prod(block_grid(model.get_submodule(n).weight.shape, block_size))
                   for n in encoder_linear_names(model)}
        budget = "fused"
    return prune_blocks(model, MagnitudeImportance(permute=False), Target(block_size, density, None, classifier_kept, budget))
