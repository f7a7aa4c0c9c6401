"""Node matrices from label-conditioned means and readout weights, and the per-sub-block
summary (SCIENCE.md sections 3.2-3.3 and 3.9).

Because the single-node field f_{n,c}(x) is linear in the node's activations, its label mean is
a product of the readout weights with the label-conditioned means:

    pooled:  M_n[k, c] = W[c, n] * Zbar[k, n]                  W (K, N), Zbar (K, N)
    token:   M_n[k, c] = sum_t W[c, t, n] * Hbar[k, t, n]      W (K, T, N), Hbar (K, T, N)

and for a set S of nodes (a head: section 4) M_S = sum_{n in S} M_n.

Sub-block summary over its n nodes (``summarize``):

    mean_recognized    = mean_n |D_n|
    mean_clusters      = mean_n (#clusters of n)
    mean_cluster_size  = (sum_n |D_n|) / (sum_n #clusters): the mean size over all clusters of
                         the sub-block (None when no node has a cluster);
                         ``mean_cluster_size_per_node`` is the other reading: the mean over nodes
                         with >= 1 cluster of |D_n| / #clusters_n
    mean_noise         = mean of N_n over the nodes with >= 1 cluster (None if there are none)
    frac_no_cluster    = fraction of nodes with no cluster (empty D_n)
    snr                = mean_n(sum_C |C|^2) / mean_n(N_n), both means over ALL the nodes of the
                         sub-block. When mean_n(N_n) = 0 the ratio is undefined: ``snr`` is None
                         (JSON null) and ``snr_infinite`` is True if the signal is > 0 (noise-free
                         clusters), False if the signal is 0 too.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from cctk.snp.clusters import BatchAnalysis, analyze_matrices

__all__ = ["node_matrices", "set_matrix", "analyze_group", "summarize"]


def _check(W: torch.Tensor, means: torch.Tensor) -> None:
    if W.shape[0] != means.shape[0] or W.shape[1:] != means.shape[1:]:
        raise ValueError(f"readout weight {tuple(W.shape)} and label means {tuple(means.shape)} "
                         "must be (K, N) and (K, N) (pooled) or (K, T, N) and (K, T, N) (token)")


def node_matrices(W: torch.Tensor, means: torch.Tensor, nodes: Optional[slice] = None) -> torch.Tensor:
    """M (n, K, K) of the nodes ``nodes`` (default all), float64. W and means: (K, N) pooled or
    (K, T, N) token (see the module doc)."""
    _check(W, means)
    W = W.detach().double().cpu()
    means = means.detach().double().cpu()
    nodes = nodes if nodes is not None else slice(None)
    if W.dim() == 2:
        w, z = W[:, nodes], means[:, nodes]
        return z.t()[:, :, None] * w.t()[:, None, :]
    w, h = W[:, :, nodes], means[:, :, nodes]
    return torch.einsum("ktn,ctn->nkc", h, w)


def set_matrix(W: torch.Tensor, means: torch.Tensor, node_index) -> torch.Tensor:
    """M_S = sum_{n in S} M_n (K, K) for the nodes ``node_index`` (slice or index tensor)."""
    _check(W, means)
    W = W.detach().double().cpu()
    means = means.detach().double().cpu()
    K = W.shape[0]
    w = W[..., node_index].reshape(K, -1)
    z = means[..., node_index].reshape(K, -1)
    return z @ w.t()


def analyze_group(W: torch.Tensor, means: torch.Tensor, threshold: float = 0.3,
                  chunk: int = 256) -> BatchAnalysis:
    """Analyse every node of a group (chunks of ``chunk`` nodes keep the (n, K, K) matrices small)."""
    N = W.shape[-1]
    parts = [analyze_matrices(node_matrices(W, means, slice(s, s + chunk)), threshold)
             for s in range(0, N, chunk)]
    if not parts:
        return analyze_matrices(torch.zeros(0, W.shape[0], W.shape[0]), threshold)
    fields = ("recognized", "cluster_id", "num_clusters", "noise", "cluster_square_sum", "ones",
              "peak")
    return BatchAnalysis(*[np.concatenate([getattr(p, f) for p in parts]) for f in fields])


def summarize(analysis: BatchAnalysis) -> dict:
    """The per-sub-block averages of section 3.9 (see the module doc for each definition)."""
    n = len(analysis)
    sizes = analysis.recognized.sum(1).astype(np.float64)          # |D_n| = sum of cluster sizes
    nclu = analysis.num_clusters.astype(np.float64)
    noise = analysis.noise.astype(np.float64)
    signal = analysis.cluster_square_sum.astype(np.float64)
    has = nclu > 0
    out = {"num_nodes": int(n)}
    if n == 0:
        out.update(mean_recognized=None, mean_clusters=None, mean_cluster_size=None,
                   mean_cluster_size_per_node=None, mean_noise=None, frac_no_cluster=None,
                   snr=None, snr_infinite=False, mean_signal=None, mean_noise_all=None)
        return out
    mean_signal, mean_noise_all = float(signal.mean()), float(noise.mean())
    out.update(
        mean_recognized=float(sizes.mean()),
        mean_clusters=float(nclu.mean()),
        mean_cluster_size=float(sizes.sum() / nclu.sum()) if nclu.sum() > 0 else None,
        mean_cluster_size_per_node=float((sizes[has] / nclu[has]).mean()) if has.any() else None,
        mean_noise=float(noise[has].mean()) if has.any() else None,
        frac_no_cluster=float((~has).mean()),
        mean_signal=mean_signal,
        mean_noise_all=mean_noise_all,
        snr=mean_signal / mean_noise_all if mean_noise_all > 0 else None,
        snr_infinite=bool(mean_noise_all == 0 and mean_signal > 0),
    )
    return out
