"""ANDC connection scores, block masks and the block-magnitude baseline (SCIENCE.md section 5).

All functions here work on plain tensors; nothing knows about models.

* Overlap score of a linear from input nodes i to output nodes j, with recognised label sets
  D_i, D_j given as bool matrices (n_nodes, K):

      s_ji = |D_j intersect D_i| = sum_k D_j[k] * D_i[k]        (a bool matmul)

  and a connection is kept iff s_ji >= min_overlap (default 1). A node with an empty set has
  s = 0 with everyone: it loses all its connections.
* Block masks over square B x B tiles (partial edge tiles are zero-padded), shape
  (ceil(out/B), ceil(in/B)):
    - target density rho: keep the n_keep = round(rho * n_blocks) blocks of highest block score
      (ties broken by the block's weight L1 norm, then by position). The block score
      (``block_score``) is ``"kept-fraction"`` (SCIENCE.md 5, the default): the fraction of the
      block's connections the rule keeps, F_RC = (kept connections) / (real elements), each kept
      connection counting once whatever its overlap; or ``"sum"`` (cctk's first choice, kept for
      the ablation): S_RC = sum_{(j,i) in block RC} s_ji * keep_ji, which favours nodes that
      recognise many labels and so selects whole rows and columns;
    - threshold tau: keep every block whose kept fraction F_RC is >= tau and > 0.
* Baseline: block magnitude, S_RC = sum_{(j,i) in block RC} |W_ji|, keep the same number of
  blocks per layer.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from cctk.nn.masked_linear import expand_block_mask  # noqa: F401  (re-exported)

__all__ = [
    "overlap_scores",
    "connection_keep",
    "classifier_keep",
    "budget_block_mask",
    "block_reduce",
    "num_blocks_to_keep",
    "topk_block_mask",
    "BLOCK_SCORES",
    "kept_fraction",
    "andc_block_scores",
    "andc_block_mask",
    "magnitude_block_mask",
    "magnitude_element_mask",
    "expand_block_mask",
    "block_grid",
]


def _as_label_sets(sets: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(sets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of recognised label sets, got {type(sets).__name__}")
    if sets.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n_nodes, num_labels), got shape {tuple(sets.shape)}")
    return sets.to(torch.bool)


def overlap_scores(out_sets: torch.Tensor, in_sets: torch.Tensor) -> torch.Tensor:
    """s[j, i] = |D_j ∩ D_i| for out_sets (n_out, K) and in_sets (n_in, K) bool -> int64 (n_out, n_in)."""
    out_sets = _as_label_sets(out_sets, "out_sets")
    in_sets = _as_label_sets(in_sets, "in_sets")
    if out_sets.shape[1] != in_sets.shape[1]:
        raise ValueError(
            f"out_sets and in_sets must have the same number of labels, got {out_sets.shape[1]} "
            f"and {in_sets.shape[1]}"
        )
    # float64 matmul of 0/1 is exact for any realistic K
    return (out_sets.double() @ in_sets.double().t()).round().to(torch.int64)


def connection_keep(scores: torch.Tensor, min_overlap: int = 1) -> torch.Tensor:
    """keep[j, i] = s[j, i] >= min_overlap (min_overlap >= 1, so empty-label nodes lose everything)."""
    if min_overlap < 1:
        raise ValueError(f"min_overlap must be >= 1 (got {min_overlap}): 0 would keep every connection")
    return scores >= min_overlap


def classifier_keep(final_sets: torch.Tensor) -> torch.Tensor:
    """The paper's ANDC of the classifier: keep fc.W[c, n] iff c ∈ D_n of final-stream node n.

    final_sets (d, K) bool -> mask (K, d) bool.
    """
    return _as_label_sets(final_sets, "final_sets").t().contiguous()


def block_grid(shape, block_size: int):
    out_f, in_f = shape
    return math.ceil(out_f / block_size), math.ceil(in_f / block_size)


def block_reduce(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum of x (out, in) over each B x B tile (zero-padded edges) -> (ceil(out/B), ceil(in/B)) float64."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    out_f, in_f = x.shape
    nr, nc = block_grid(x.shape, block_size)
    padded = x.new_zeros((nr * block_size, nc * block_size), dtype=torch.float64)
    padded[:out_f, :in_f] = x.to(torch.float64)
    return padded.view(nr, block_size, nc, block_size).sum(dim=(1, 3))


def num_blocks_to_keep(density: float, n_blocks: int) -> int:
    """round(density * n_blocks), at least 1 when density > 0."""
    if not (0.0 <= density <= 1.0):
        raise ValueError(f"density must be in [0, 1], got {density}")
    n = int(round(density * n_blocks))
    if density > 0 and n == 0:
        n = 1
    return min(n, n_blocks)


def topk_block_mask(primary: torch.Tensor, n_keep: int, secondary: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool mask of the n_keep entries with the highest primary score (ties: secondary, then index)."""
    flat = primary.reshape(-1).to(torch.float64)
    order = torch.arange(flat.numel())
    if secondary is not None:
        sec = secondary.reshape(-1).to(torch.float64)
        order = torch.sort(-sec, stable=True).indices
    order = order[torch.sort(-flat[order], stable=True).indices]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:n_keep]] = True
    return mask.view(primary.shape)


def budget_block_mask(primary: torch.Tensor, density, secondary: Optional[torch.Tensor] = None,
                      groups: int = 1) -> torch.Tensor:
    """Keep round(density * n) of a layer's blocks by ``primary`` (ties: ``secondary``), the budget
    met separately in each of ``groups`` equal bands of block rows (3 for a fused qkv whose q, k
    and v each get the density: ``Target.qkv_budget == "split"``); groups=1 is the whole layer.
    ``density``: one float for every band, or one per band (e.g. another plan's q, k, v densities)."""
    rows = primary.shape[0]
    if groups < 1 or rows % groups:
        raise ValueError(f"a layer of {rows} block rows cannot be split into {groups} equal budgets "
                         f"(the block size must divide each part's rows)")
    per_band = [float(density)] * groups if isinstance(density, (int, float)) else [float(d) for d in density]
    if len(per_band) != groups:
        raise ValueError(f"{len(per_band)} densities for {groups} budget bands")
    step = rows // groups
    parts = []
    for g, d in enumerate(per_band):
        band = slice(g * step, (g + 1) * step)
        sec = None if secondary is None else secondary[band]
        parts.append(topk_block_mask(primary[band], num_blocks_to_keep(d, primary[band].numel()), sec))
    return torch.cat(parts, 0)


BLOCK_SCORES = ("kept-fraction", "sum")


def kept_fraction(keep: torch.Tensor, block_size: int) -> torch.Tensor:
    """F_RC = kept connections / real elements of each B x B block (edge blocks: their real size)."""
    kept = block_reduce(keep.to(torch.float64), block_size)
    real = block_reduce(torch.ones(keep.shape, dtype=torch.float64), block_size)
    return kept / real


def andc_block_scores(scores: torch.Tensor, keep: torch.Tensor, block_size: int,
                      block_score: str = "kept-fraction") -> torch.Tensor:
    """The ANDC score of every block (see the module docstring): ``"kept-fraction"`` F_RC or
    ``"sum"`` S_RC = sum of s_ji * keep_ji over the block."""
    if scores.shape != keep.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and keep {tuple(keep.shape)} differ in shape")
    if block_score == "kept-fraction":
        return kept_fraction(keep, block_size)
    if block_score == "sum":
        return block_reduce(scores.to(torch.float64) * keep, block_size)
    raise ValueError(f"block_score must be one of {', '.join(BLOCK_SCORES)}, got {block_score!r}")


def andc_block_mask(
    scores: torch.Tensor,
    keep: torch.Tensor,
    block_size: int,
    density: Optional[float] = None,
    tau: Optional[float] = None,
    weight: Optional[torch.Tensor] = None,
    block_score: str = "kept-fraction",
    groups: int = 1,
) -> torch.Tensor:
    """ANDC block mask from the element scores/keep matrix (see module docstring).

    Exactly one of ``density`` (keep the top round(density * n_blocks) blocks by ``block_score``,
    in each of ``groups`` bands of block rows: :func:`budget_block_mask`) and ``tau`` (keep every
    block with kept fraction >= tau) must be given. ``weight`` (same shape) breaks score ties by
    block L1 norm.
    """
    if (density is None) == (tau is None):
        raise ValueError("give exactly one of density and tau")
    if tau is not None:
        if not (0.0 <= tau <= 1.0):
            raise ValueError(f"tau must be in [0, 1], got {tau}")
        frac = kept_fraction(keep, block_size)
        return (frac >= tau) & (frac > 0)
    primary = andc_block_scores(scores, keep, block_size, block_score)
    tie = block_reduce(weight.detach().abs(), block_size) if weight is not None else None
    return budget_block_mask(primary, density, tie, groups)


def magnitude_block_mask(weight: torch.Tensor, block_size: int, density: Optional[float] = None,
                         n_keep: Optional[int] = None) -> torch.Tensor:
    """Block-magnitude baseline: keep the blocks of highest L1 norm sum |W| (n_keep or density)."""
    if (density is None) == (n_keep is None):
        raise ValueError("give exactly one of density and n_keep")
    norms = block_reduce(weight.detach().abs(), block_size)
    if n_keep is None:
        n_keep = num_blocks_to_keep(density, norms.numel())
    return topk_block_mask(norms, int(n_keep))


def magnitude_element_mask(weight: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Element-wise magnitude mask keeping the n_keep largest |W| (the classifier baseline)."""
    return topk_block_mask(weight.detach().abs(), int(n_keep))
