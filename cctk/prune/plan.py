"""The shared vocabulary of pruning: what is pruned (:func:`encoder_linear_names`), what the
pruner is asked for (:class:`Target`: block size, density or tau, classifier count; it travels
down once, from the caller to the importances), the permutations applied to a model
(:class:`Permutations`) and what defines a pruned model besides its weights
(:class:`PrunePlan`, installed by :func:`apply_masks`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from cctk.checkpoint import replace_submodule as _set_submodule
from cctk.nn import MaskedLinear

__all__ = ["Density", "Target", "QKV_BUDGETS", "DEFAULT_QKV_BUDGET", "budget_groups", "Permutations", "PrunePlan", "encoder_linear_names", "apply_masks"]

#: one density for every layer, or per layer name: a float, or one per budget band (q, k, v of a
#: split qkv: :meth:`Target.budget_groups`)
Density = Union[float, Mapping[str, Union[float, Sequence[float]]]]


def encoder_linear_names(model: nn.Module) -> List[str]:
    """Canonical module paths of every encoder linear (qkv, proj, linear1, linear2 per block)."""
    names = []
    for b in range(len(model.blocks)):
        p = f"classifier.blocks.{b}"
        names += [f"{p}.self_attn.qkv", f"{p}.self_attn.proj", f"{p}.linear1", f"{p}.linear2"]
    return names


#: how a fused qkv's block budget is met: over the whole layer, or by q, k and v each
QKV_BUDGETS = ("fused", "split")
#: q, k and v are three linear maps that happen to share a weight tensor: each meets the density.
#: One budget for the fused tensor lets one of them take the others' blocks: on the Fashion-MNIST
#: study ANDC's q/k rows (head-wide label sets) took every v block, switching attention off
#: (docs/FINDINGS.md, issue 18). "fused" stays for the studies that ran with it.
DEFAULT_QKV_BUDGET = "split"


@dataclass(frozen=True)
class Target:
    """What a block pruning is asked for: ``block_size``, and either a ``density`` (float, or
    {layer name: float}: keep round(density * n_blocks) blocks of every encoder linear) or ANDC's
    ``tau`` rule (keep every block whose kept-connection fraction is >= tau); ``classifier_kept``:
    how many classifier weights a method without a rule of its own keeps (None: dense);
    ``qkv_budget``: a fused qkv's density met by q, k and v each (``"split"``, default: three
    layers, as in models with separate projections) or over the whole layer (``"fused"``)."""

    block_size: int = 32
    density: Optional[Density] = 0.25
    tau: Optional[float] = None
    classifier_kept: Optional[int] = None
    qkv_budget: str = DEFAULT_QKV_BUDGET

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.qkv_budget not in QKV_BUDGETS:
            raise ValueError(f"qkv_budget must be one of {', '.join(QKV_BUDGETS)}, got {self.qkv_budget!r}")
        if self.tau is not None:
            if not 0.0 <= self.tau <= 1.0:
                raise ValueError(f"tau must be in [0, 1], got {self.tau}")
            object.__setattr__(self, "density", None)   # tau rules; density is not used
        elif self.density is None:
            raise ValueError("give a density (or tau for ANDC)")

    def layer_density(self, name: str) -> Union[float, tuple]:
        """The target density of the encoder linear ``name`` (a tuple: one per budget band)."""
        d = self.density
        if isinstance(d, (int, float)):
            return float(d)
        for key in (name, name.split(".")[-1], name.replace("classifier.", "")):
            if key in d:
                v = d[key]
                return float(v) if isinstance(v, (int, float)) else tuple(float(x) for x in v)
        raise KeyError(f"no target density for layer {name} (give a float or a dict keyed by layer name)")

    def budget_groups(self, name: str) -> int:
        """How many separate budgets the layer ``name``'s density is met in (3: q, k, v of a split qkv)."""
        return budget_groups(self.qkv_budget, name)


def budget_groups(qkv_budget: str, name: str) -> int:
    """How many separate budgets the encoder linear ``name`` meets its density in under
    ``qkv_budget``: 3 (q, k, v) for a fused qkv with a split budget, else 1."""
    return 3 if qkv_budget == "split" and name.endswith("self_attn.qkv") else 1


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


@dataclass
class PrunePlan:
    """Everything that defines a pruned model besides its weights. ``rule``: the ANDC rule's
    choices ({"min_overlap", "block_score", "v_sets", "token_sets", ...}) for methods that read
    label sets, else None."""

    method: str
    block_size: int
    block_masks: Dict[str, torch.Tensor]
    classifier_mask: Optional[torch.Tensor]
    permutations: Optional[Permutations] = None
    density: Optional[Density] = None
    tau: Optional[float] = None
    rule: Optional[dict] = None
    layer_stats: Dict[str, dict] = field(default_factory=dict)
    #: structured pruning: the kept widths per block, {"0": {"ff": d_ff', "head_dim": d_h'}, ...}
    #: (the model is a smaller dense CCT; no block masks)
    structured: Optional[Dict[str, Dict[str, int]]] = None

    def blocks_kept(self) -> Dict[str, int]:
        return {k: int(v.sum()) for k, v in self.block_masks.items()}

    @property
    def tokens_assumed(self) -> bool:
        """True when block 0's qkv was pruned with every token channel assumed to recognise
        every label (the old rule), not with measured token sets."""
        return bool(self.rule) and self.rule.get("token_sets") == "assume-all"

    def to_dict(self) -> dict:
        """A torch.save-able dict (tensors kept as tensors)."""
        return {
            "method": self.method,
            "block_size": self.block_size,
            "block_masks": dict(self.block_masks),
            "classifier_mask": self.classifier_mask,
            "permutations": self.permutations.to_dict() if self.permutations is not None else None,
            "density": dict(self.density) if isinstance(self.density, Mapping) else self.density,
            "tau": self.tau,
            "rule": self.rule,
            "min_overlap": (self.rule or {}).get("min_overlap", 1),
            "tokens_assumed": self.tokens_assumed,
            "layer_stats": self.layer_stats,
            "structured": self.structured,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        perms = d.get("permutations")
        rule = d.get("rule")
        if rule is None and str(d.get("method", "")).startswith("andc"):
            # plans written before the rule was recorded: cctk's first rule
            rule = {"min_overlap": d.get("min_overlap", 1), "block_score": "sum", "v_sets": "head",
                    "token_sets": "assume-all" if d.get("tokens_assumed", True) else "measured"}
        return cls(method=d["method"], block_size=int(d["block_size"]), block_masks=dict(d["block_masks"]),
                   classifier_mask=d.get("classifier_mask"),
                   permutations=Permutations.from_dict(perms) if perms is not None else None,
                   density=d.get("density"), tau=d.get("tau"), rule=rule,
                   layer_stats=d.get("layer_stats", {}), structured=d.get("structured"))


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
