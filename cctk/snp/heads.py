"""The heads of an MHA sub-block: coverage, single-head performance, specialisation and its null
model (SCIENCE.md section 4).

Node n = h * d_h + j belongs to head h.

    coverage      c_h[k] = #{ n in head h : k in D_n }
    SHP           M_h = sum_{n in h} M_n, analysed exactly as a node matrix (D_h, clusters, noise)
    share_k       = max_h c_h[k] / sum_h c_h[k], for the labels with sum_h c_h[k] > 0
    share_mean    = the mean of share_k over those labels (None when no node recognises anything)
    jaccard_mean  = mean over head pairs (h < h') of |D_h & D_h'| / |D_h | D_h'|, over the pairs
                    whose union is non-empty (None when there is no such pair)
    unique_labels = number of labels k in exactly one head's D_h (SHP)
    null model    = the nodes' recognised sets are re-assigned to heads at random (a uniform random
                    permutation of the nodes, heads keep their sizes), share_mean recomputed, over
                    ``draws`` seeded draws: z = (observed - mean_null) / std_null (None when
                    std_null = 0), p = (1 + #{null >= observed}) / (1 + draws).
The label set entering share_mean is the same in every draw (sum_h c_h[k] is permutation
invariant), so observed and null means average over the same labels.
"""
from __future__ import annotations

import numpy as np
import torch

from cctk.snp.clusters import analyze_matrix

__all__ = ["head_coverage", "specialisation", "mean_share", "jaccard_mean", "null_model",
           "analyze_heads"]


def head_coverage(recognized, num_heads: int) -> np.ndarray:
    """c (H, K) int: c[h, k] = number of head h's nodes whose D_n holds k; recognized (n, K)."""
    recognized = np.asarray(recognized, dtype=bool)
    n, K = recognized.shape
    if n % num_heads:
        raise ValueError(f"{n} nodes do not split into {num_heads} heads of equal size")
    return recognized.reshape(num_heads, n // num_heads, K).sum(1).astype(np.int64)


def specialisation(coverage):
    """share_k = max_h c_h[k] / sum_h c_h[k] (NaN where sum_h c_h[k] = 0), shape (K,)."""
    coverage = np.asarray(coverage, dtype=np.float64)
    total = coverage.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, coverage.max(0) / np.where(total > 0, total, 1), np.nan)


def mean_share(coverage):
    """Mean of share_k over the labels with sum_h c_h[k] > 0; None when there are none."""
    share = specialisation(coverage)
    ok = ~np.isnan(share)
    return float(share[ok].mean()) if ok.any() else None


def jaccard_mean(head_sets) -> float | None:
    """Mean pairwise Jaccard |A & B| / |A | B| over head pairs with a non-empty union."""
    sets = [set(s) for s in head_sets]
    values = []
    for a in range(len(sets)):
        for b in range(a + 1, len(sets)):
            union = sets[a] | sets[b]
            if union:
                values.append(len(sets[a] & sets[b]) / len(union))
    return float(np.mean(values)) if values else None


def null_model(recognized, num_heads: int, draws: int = 1000, seed: int = 0, chunk: int = 100):
    """share_mean of ``draws`` random node-to-head assignments (same head sizes), seeded.

    Returns a float64 array (draws,) (NaN entries when no node recognises anything).
    """
    rec = torch.as_tensor(np.asarray(recognized, dtype=bool))
    n, K = rec.shape
    if n % num_heads:
        raise ValueError(f"{n} nodes do not split into {num_heads} heads of equal size")
    gen = torch.Generator().manual_seed(int(seed))
    total = rec.sum(0).double()                       # invariant under re-assignment
    ok = total > 0
    out = np.full(draws, np.nan)
    if not bool(ok.any()):
        return out
    recf = rec.double()
    for start in range(0, draws, chunk):
        m = min(chunk, draws - start)
        perm = torch.argsort(torch.rand(m, n, generator=gen), dim=1)
        cov = recf[perm].reshape(m, num_heads, n // num_heads, K).sum(2)   # (m, H, K)
        share = cov.amax(1)[:, ok] / total[ok]
        out[start:start + m] = share.mean(1).numpy()
    return out


def analyze_heads(head_matrices, recognized, threshold: float = 0.3, draws: int = 1000,
                  seed: int = 0) -> dict:
    """Everything section 4 reports for one MHA sub-block.

    ``head_matrices`` (H, K, K): the SHP matrices M_h = sum_{n in h} M_n; ``recognized`` (n, K)
    bool: D_n of the sub-block's nodes (n = H * d_h, node h * d_h + j in head h).
    Returns a JSON-ready dict plus the arrays ``coverage`` (H, K) and ``heads_recognized`` (H, K)
    under the keys ``_coverage`` / ``_heads_recognized`` (the caller stores them in nodes.npz).
    """
    M = torch.as_tensor(np.asarray(head_matrices) if not isinstance(head_matrices, torch.Tensor)
                        else head_matrices).double()
    num_heads, K, _ = M.shape
    coverage = head_coverage(recognized, num_heads)
    heads = []
    heads_recognized = np.zeros((num_heads, K), dtype=bool)
    for h in range(num_heads):
        shp = analyze_matrix(M[h], threshold)
        heads_recognized[h, shp.recognized] = True
        heads.append({"recognized": shp.recognized, "clusters": shp.clusters, "noise": shp.noise,
                      "num_clusters": len(shp.clusters),
                      "coverage_labels": int((coverage[h] > 0).sum()),
                      "coverage_total": int(coverage[h].sum())})
    observed = mean_share(coverage)
    null = null_model(recognized, num_heads, draws=draws, seed=seed) if draws > 0 else np.array([])
    finite = null[~np.isnan(null)]
    if observed is None or finite.size == 0:
        z = p = null_mean = null_std = None
    else:
        null_mean, null_std = float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0
        z = (observed - null_mean) / null_std if null_std > 0 else None
        p = float((1 + np.sum(finite >= observed - 1e-12)) / (1 + finite.size))
    share = specialisation(coverage)
    return {
        "num_heads": num_heads,
        "share_mean": observed,
        "share": [None if np.isnan(s) else float(s) for s in share],
        "null_mean": null_mean, "null_std": null_std, "null_z": z, "p_value": p,
        "null_draws": int(draws), "null_seed": int(seed),
        "jaccard_mean": jaccard_mean([h["recognized"] for h in heads]),
        "unique_labels": int((heads_recognized.sum(0) == 1).sum()),
        "unique_labels_coverage": int(((coverage > 0).sum(0) == 1).sum()),
        "heads": heads,
        "_coverage": coverage, "_heads_recognized": heads_recognized,
    }
