"""Node matrices -> recognised labels, greedy clusters and noise (SCIENCE.md section 3, steps 4-8).

For one K x K node matrix M (rows k: true label, columns c: readout label):

    Mhat      = M / max_{k,c} M[k,c]                  (a matrix whose max is <= 0 recognises nothing)
    B[k,c]    = 1  iff  Mhat[k,c] > threshold          (strict; threshold 0.3 by default)
    D         = { k : B[k,k] = 1 }                     (recognised labels, the "diagonal")
    clusters  = greedy cliques over D in ascending label order: seed a cluster with the smallest
                unused label of D, add each further unused label l of D (ascending) when B on
                cluster + {l} is all ones (B[i,l] and B[l,i] for every member i), drop the
                cluster's labels from D, repeat; singletons are clusters; the union is D
    noise     = (number of ones in B) - sum_C |C|^2    (above-threshold entries outside the
                diagonal cluster blocks)

``analyze_matrix`` is the literal, loop-based reading of that procedure for one matrix;
``analyze_matrices`` is the vectorised version for many nodes at once and gives identical
results. It uses the equivalent single-pass form of the greedy: visiting the labels of D in
ascending order, label l joins the first existing cluster (in creation order) all of whose
members (all < l) are mutually linked with l, else it seeds a new cluster. (Cluster j's members
below l are fixed by the time l is visited in both forms, and a label fitting no earlier cluster
is the smallest unused label when the next cluster is seeded, so both give the same clusters in
the same order.)

Both compute in float64 so that ties land the same way in both; the comparison is strict, so an
entry exactly at ``threshold * max`` is not a 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["NodeAnalysis", "BatchAnalysis", "analyze_matrix", "analyze_matrices"]


@dataclass
class NodeAnalysis:
    """The SNP analysis of one node (or head) matrix.

    ``recognized``: sorted list of labels in D; ``clusters``: list of label lists (ascending
    within, in creation order); ``noise``: int; ``binary``: (K, K) bool B; ``normalized``:
    (K, K) float64 Mhat (all zeros when max <= 0: there is nothing to normalise by).
    """
    recognized: list
    clusters: list
    noise: int
    binary: np.ndarray = field(repr=False)
    normalized: np.ndarray = field(repr=False)

    @property
    def num_clusters(self) -> int:
        return len(self.clusters)

    @property
    def cluster_square_sum(self) -> int:
        """sum_C |C|^2: the ones that lie in the diagonal cluster blocks (the 'signal')."""
        return int(sum(len(c) ** 2 for c in self.clusters))


def _as_float64_numpy(M) -> np.ndarray:
    if isinstance(M, torch.Tensor):
        M = M.detach().to("cpu", torch.float64).numpy()
    M = np.asarray(M, dtype=np.float64)
    return M


def analyze_matrix(M, threshold: float = 0.3) -> NodeAnalysis:
    """Analyse one K x K node matrix (SCIENCE.md section 3, steps 4-8; see the module doc).

    A matrix whose global maximum is <= 0 (or not finite) recognises nothing: empty
    ``recognized`` and ``clusters``, ``noise`` 0, all-zero ``binary`` and ``normalized``.
    """
    M = _as_float64_numpy(M)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"a node matrix must be square (K, K), got shape {M.shape}")
    K = M.shape[0]
    peak = M.max() if M.size else 0.0
    if not (np.isfinite(peak) and peak > 0):
        zeros = np.zeros((K, K))
        return NodeAnalysis([], [], 0, zeros.astype(bool), zeros)
    normalized = M / peak
    binary = normalized > threshold
    recognized = [k for k in range(K) if binary[k, k]]
    unused = list(recognized)
    clusters = []
    while unused:
        cluster = [unused[0]]
        for label in unused[1:]:
            if all(binary[i, label] and binary[label, i] for i in cluster):
                cluster.append(label)
        clusters.append(cluster)
        unused = [label for label in unused if label not in cluster]
    noise = int(binary.sum()) - sum(len(c) ** 2 for c in clusters)
    return NodeAnalysis(recognized, clusters, noise, binary, normalized)


@dataclass
class BatchAnalysis:
    """Vectorised analysis of n node matrices (n, K, K).

    ``recognized`` (n, K) bool; ``cluster_id`` (n, K) int16 (-1: label not recognised, else the
    index of the node's cluster holding it, in creation order); ``num_clusters`` (n,) int64;
    ``noise`` (n,) int64; ``cluster_square_sum`` (n,) int64 (sum_C |C|^2); ``ones`` (n,) int64
    (number of ones in B); ``peak`` (n,) float64 (the max used to normalise).
    """
    recognized: np.ndarray
    cluster_id: np.ndarray
    num_clusters: np.ndarray
    noise: np.ndarray
    cluster_square_sum: np.ndarray
    ones: np.ndarray
    peak: np.ndarray

    def __len__(self):
        return self.recognized.shape[0]

    def clusters(self, i: int) -> list:
        """Node i's clusters as label lists (the same lists ``analyze_matrix`` returns)."""
        cid = self.cluster_id[i]
        return [np.flatnonzero(cid == j).tolist() for j in range(int(self.num_clusters[i]))]

    def node(self, i: int) -> dict:
        return {"recognized": np.flatnonzero(self.recognized[i]).tolist(),
                "clusters": self.clusters(i), "noise": int(self.noise[i])}


def analyze_matrices(M, threshold: float = 0.3, chunk: int = 4096) -> BatchAnalysis:
    """Analyse many node matrices M (n, K, K) at once; identical to ``analyze_matrix`` per node.

    Work O(n K^2), one vectorised step per label. ``chunk`` bounds the nodes handled at once.
    """
    if isinstance(M, np.ndarray):
        M = torch.from_numpy(M)
    if not isinstance(M, torch.Tensor):
        M = torch.as_tensor(np.asarray(M))
    if M.dim() != 3 or M.shape[1] != M.shape[2]:
        raise ValueError(f"node matrices must have shape (n, K, K), got {tuple(M.shape)}")
    n, K, _ = M.shape
    parts = [_analyze_chunk(M[s:s + chunk], threshold) for s in range(0, n, chunk)]
    if not parts:
        e = np.zeros((0, K))
        return BatchAnalysis(e.astype(bool), e.astype(np.int16), np.zeros(0, np.int64),
                             np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                             np.zeros(0))
    return BatchAnalysis(*[np.concatenate([p[i] for p in parts]) for i in range(7)])


def _analyze_chunk(M: torch.Tensor, threshold: float):
    M = M.detach().to("cpu", torch.float64)
    n, K, _ = M.shape
    peak = M.reshape(n, -1).amax(1) if K else torch.zeros(n, dtype=torch.float64)
    valid = torch.isfinite(peak) & (peak > 0)
    safe_peak = torch.where(valid, peak, torch.ones_like(peak))
    binary = (M / safe_peak[:, None, None] > threshold) & valid[:, None, None]
    recognized = torch.diagonal(binary, dim1=1, dim2=2).clone()
    linked = binary & binary.transpose(1, 2)             # B[i,l] and B[l,i]
    cluster_id = torch.full((n, K), -1, dtype=torch.int64)
    num_clusters = torch.zeros(n, dtype=torch.int64)
    slots = torch.arange(K + 1)
    for label in range(K):
        rows = recognized[:, label]
        if not bool(rows.any()):
            continue
        # conflict[i, j] > 0: some member of cluster j (all < label) is not linked with label.
        conflict = torch.zeros(n, K + 1, dtype=torch.int64)
        if label:
            members = cluster_id[:, :label]
            not_linked = (~linked[:, :label, label]) & (members >= 0)
            conflict.scatter_add_(1, torch.where(members >= 0, members, K), not_linked.long())
        open_slot = (conflict == 0) & (slots[None, :] < num_clusters[:, None])
        fits = open_slot.any(1)
        target = torch.where(fits, open_slot.long().argmax(1), num_clusters)
        cluster_id[:, label] = torch.where(rows, target, cluster_id[:, label])
        num_clusters += (rows & ~fits).long()
    sizes = torch.zeros(n, K + 1, dtype=torch.int64)
    sizes.scatter_add_(1, torch.where(cluster_id >= 0, cluster_id, K),
                       (cluster_id >= 0).long())
    square_sum = (sizes[:, :K] ** 2).sum(1)
    ones = binary.reshape(n, -1).sum(1)
    return (recognized.numpy(), cluster_id.to(torch.int16).numpy(), num_clusters.numpy(),
            (ones - square_sum).numpy(), square_sum.numpy(), ones.numpy(), peak.numpy())
