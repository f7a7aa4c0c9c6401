"""The whole SNP analysis of a trained CCT: ``run_snp`` -> :class:`SNPResult`, ``save`` /
``load_snp`` / ``load_recognized``.

Steps (SCIENCE.md sections 3-5):
1. training split: one frozen pass caching the readout features of every group (token means in
   ``pooled`` mode, flattened (T * N) node outputs in ``token`` mode); when the cache would
   exceed ``cache_limit_bytes`` the readouts are trained on features streamed from the model
   each epoch instead;
2. analysed split (``test`` by default): one measurement pass with :class:`LabelStatsTap` (the
   fused ops): label-conditioned sums of every group, of the final pooled vector p(x), counts,
   the model's accuracy, and (cached case) the readout features for the readout accuracies;
3. one readout per (block, group), group in mha, ff, stream_mha, stream_ff, and one for the
   stream entering block 0 (``tokens``: tokenizer output plus positional embedding);
4. node matrices M_n from the readout weights and the label means, analysed (recognised
   labels, greedy clusters, noise), summarised per sub-block;
5. heads of each MHA sub-block: coverage, SHP, specialisation and its null model;
6. final-stream nodes: f_{n,c} = fc.W[c, n] p_n(x) with the model's own head.

Files written by :func:`save` (schema in the README):
* ``snp.json``: ``config``, ``model_accuracy``, ``label_counts``, ``blocks`` [{"mha", "ff",
  "stream_mha", "stream_ff"}: summary + ``readout_accuracy``], ``heads`` [one per block],
  ``stream`` [{"mha": acc, "ff": acc}], ``tokens`` (the stream entering block 0: summary +
  ``readout_accuracy``), ``final``;
* ``nodes.npz``: per block b and group g: ``b{b}_{g}_recognized`` (n, K) bool,
  ``b{b}_{g}_num_clusters`` (n,), ``b{b}_{g}_noise`` (n,), ``b{b}_{g}_cluster_id`` (n, K) int16
  (-1 none, else the node's cluster index holding the label); ``b{b}_heads_recognized`` (H, K),
  ``b{b}_coverage`` (H, K); ``tokens_recognized`` (d, K), ``tokens_num_clusters``,
  ``tokens_noise``, ``tokens_cluster_id`` (the stream entering block 0); ``final_recognized`` (d, K), ``final_num_clusters``,
  ``final_noise``, ``final_cluster_id``; ``example_b{b}_{g}_n{n}`` (K, K) example node matrices;
* plots (PNG): ``node_matrices.png``, ``blocks.png``, ``heads_block{b}.png``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from cctk.checkpoint import atomic_write_files
from cctk.snp.clusters import BatchAnalysis
from cctk.snp.heads import analyze_heads
from cctk.snp.matrices import analyze_group, node_matrices, set_matrix, summarize
from cctk.snp.readout import (ReadoutConfig, make_seqpool_readouts, readout_accuracy, train_readouts,
                              train_readouts_streaming)
from cctk.snp.stats import GROUPS, TOKENS, LabelStatsTap, collect_label_stats, group_sizes, measured_keys

__all__ = ["SNPResult", "run_snp", "save", "load_snp", "load_recognized", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


@dataclass
class SNPResult:
    """``summary``: the snp.json content; ``arrays``: the nodes.npz content (name -> array);
    ``analyses``: in memory only, {(block, group) or "final": BatchAnalysis}."""
    summary: dict
    arrays: dict
    analyses: dict = field(default_factory=dict, repr=False)

    @property
    def blocks(self):
        return self.summary["blocks"]

    @property
    def heads(self):
        return self.summary["heads"]

    def recognized(self) -> dict:
        """The boolean recognised-label matrices (the keys ``load_recognized`` returns)."""
        return {k: v for k, v in self.arrays.items() if k.endswith("_recognized")}


def _dataset_len(loader) -> Optional[int]:
    try:
        return len(loader.dataset)
    except Exception:
        return None


def _feature_dims(model, mode: str) -> dict:
    sizes = group_sizes(model)
    tokens = model.seq_len if mode == "token" else 1
    return {key: sizes[key[1]] * tokens for key in measured_keys(model.num_blocks)}


def _streamed_features(model, loader, num_labels, mode, device):
    """A callable yielding ({key: (B, F)}, labels) per batch of a frozen pass (one epoch)."""
    def batches():
        tap = LabelStatsTap(num_labels, mode=mode, stats=False, features=mode)
        model.eval()
        with model.tapped(tap):
            for images, labels in loader:
                tap.begin_batch(None)
                with torch.no_grad():         # not around the yield: grad mode is thread state
                    model.forward_features(images.to(device))
                yield dict(tap.batch_features), labels
    return batches


def _streamed_accuracy(readouts, batches) -> dict:
    correct = {k: 0 for k in readouts}
    total = 0
    with torch.no_grad():
        for feats, labels in batches():
            labels = labels.to(torch.int64)
            total += labels.numel()
            for key, lin in readouts.items():
                pred = lin(feats[key].to(lin.weight.device).float()).argmax(1).cpu()
                correct[key] += int((pred == labels).sum())
    return {k: c / max(total, 1) for k, c in correct.items()}


READOUT_MODES = ("pooled", "token", "seqpool")


def _readout_weight(lin, mode: str, num_nodes: int) -> torch.Tensor:
    W = lin.weight.detach().cpu()
    return W if mode == "pooled" else W.view(W.shape[0], -1, num_nodes)


def _pick_examples(analysis: BatchAnalysis, count: int) -> list:
    """Up to ``count`` nodes with at least one recognised label (else the first nodes)."""
    with_labels = np.flatnonzero(analysis.recognized.any(1))
    chosen = list(with_labels[:count]) if with_labels.size else []
    if len(chosen) < count:
        chosen += [i for i in range(len(analysis)) if i not in chosen][:count - len(chosen)]
    return [int(i) for i in chosen]


def _store_analysis(arrays: dict, prefix: str, analysis: BatchAnalysis) -> None:
    K = analysis.recognized.shape[1]
    arrays[f"{prefix}_recognized"] = analysis.recognized.astype(bool)
    arrays[f"{prefix}_num_clusters"] = analysis.num_clusters.astype(np.int16 if K < 32768 else np.int32)
    arrays[f"{prefix}_noise"] = analysis.noise.astype(np.int32)
    arrays[f"{prefix}_cluster_id"] = analysis.cluster_id.astype(np.int8 if K <= 127 else np.int16)


def run_snp_thresholds(model, train_loader, test_loader, num_classes: int, thresholds: Sequence[float] = (0.3,),
            readout_mode: str = "pooled", readout_epochs: int = 10, backend: str = "auto",
            null_draws: int = 1000, seed: int = 0, device=None, readout_optimizer: str = "adam",
            readout_lr: float = 1e-2, readout_batch_size: int = 256,
            readout_weight_decay: Optional[float] = None, cache_limit_bytes: int = 2 << 30,
            example_nodes: int = 3, split: str = "test", dataset: Optional[str] = None,
            model_name: Optional[str] = None, extra_config: Optional[dict] = None,
            verbose: bool = False) -> Dict[float, SNPResult]:
    """The SNP analysis (see the module doc) at every threshold of ``thresholds`` from one
    measurement: the readouts and the per-label statistics do not depend on the threshold, so
    they are computed once; {threshold: SNPResult}, each equal to :func:`run_snp` at that
    threshold. ``test_loader`` is the analysed split."""
    if readout_mode not in READOUT_MODES:
        raise ValueError(f"readout_mode must be one of {', '.join(READOUT_MODES)}, got {readout_mode!r}")
    seqpool = readout_mode == "seqpool"
    feature_mode = "token" if seqpool else readout_mode   # seqpool learns its pooling over tokens
    thresholds = [float(t) for t in thresholds]
    if not thresholds:
        raise ValueError("give at least one threshold")
    for threshold in thresholds:
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    K = int(num_classes)
    cfg = ReadoutConfig(epochs=readout_epochs, optimizer=readout_optimizer, lr=readout_lr,
                        batch_size=readout_batch_size, weight_decay=readout_weight_decay,
                        seed=seed)
    dims = _feature_dims(model, feature_mode)
    per_sample_bytes = 4 * sum(dims.values())
    n_train, n_test = _dataset_len(train_loader), _dataset_len(test_loader)
    cache = (n_train is not None and n_test is not None
             and max(n_train, n_test) * per_sample_bytes <= cache_limit_bytes)
    log = print if verbose else (lambda *a, **k: None)

    # 1-3: readouts (train split) and the measurement pass (analysed split)
    seq_means: dict = {}
    if seqpool and not cache:
        raise ValueError("seqpool readouts need the token features in memory: raise cache_limit_bytes "
                         "(--cache-limit-gb) or analyse a subset")
    if seqpool:
        log(f"[snp] caching token features of {n_train} training samples (sequence-pooling readouts)")
        train = collect_label_stats(model, train_loader, K, mode="token", backend=backend, device=device,
                                    stats=False, features="token", reduce=False)
        feats = {k: v for k, v in train.features.items() if k != "final"}
        sizes0 = group_sizes(model)
        readouts = train_readouts(feats, train.labels, K, cfg, device=device, readouts=make_seqpool_readouts(
            {k: sizes0[k[1]] for k in feats}, model.seq_len, K, device=device, bias=cfg.bias))
        del train, feats
        log("[snp] measurement pass")
        stats = collect_label_stats(model, test_loader, K, mode="pooled", backend=backend, device=device,
                                    features="token")
        accuracy = readout_accuracy(readouts, stats.features, stats.labels)
        counts = torch.bincount(stats.labels, minlength=K).clamp(min=1).double()
        with torch.no_grad():
            for key, ro in readouts.items():
                z = ro.pool(stats.features[key].to(device).float()).double().cpu()
                seq_means[key] = (torch.zeros(K, z.shape[1], dtype=torch.float64).index_add_(0, stats.labels, z)
                                  / counts[:, None]).float()
        stats.features = {}
    elif cache:
        log(f"[snp] caching {readout_mode} features of {n_train} training samples")
        train = collect_label_stats(model, train_loader, K, mode=readout_mode, backend=backend,
                                    device=device, stats=False, features=readout_mode,
                                    reduce=False)
        feats = {k: v for k, v in train.features.items() if k != "final"}
        readouts = train_readouts(feats, train.labels, K, cfg, device=device)
        del train, feats
        log("[snp] measurement pass")
        stats = collect_label_stats(model, test_loader, K, mode=readout_mode, backend=backend,
                                    device=device, features=readout_mode)
        accuracy = readout_accuracy(readouts, stats.features, stats.labels)
        stats.features = {}
    else:
        log("[snp] features too large to cache: streaming them for the readouts")
        readouts = train_readouts_streaming(
            _streamed_features(model, train_loader, K, readout_mode, device), dims, K, cfg,
            device=device)
        accuracy = _streamed_accuracy(
            readouts, _streamed_features(model, test_loader, K, readout_mode, device))
        stats = collect_label_stats(model, test_loader, K, mode=readout_mode, backend=backend,
                                    device=device)

    def analyse(threshold: float) -> SNPResult:
        # 4-5: node matrices, analyses, heads
        sizes = group_sizes(model)
        H = model.num_heads
        L = model.num_blocks
        arrays: dict = {}
        analyses: dict = {}
        blocks, heads_out, stream_acc = [], [], []
        example_blocks = sorted({0, L - 1})

        def place(key, prefix):
            """One measured place: its readout's node matrices analysed, stored under ``prefix``."""
            W = _readout_weight(readouts[key], "pooled" if seqpool else readout_mode, sizes[key[1]])
            means = seq_means[key] if seqpool else stats.means(key).cpu()
            analysis = analyze_group(W, means, threshold)
            _store_analysis(arrays, prefix, analysis)
            return W, means, analysis, dict(readout_accuracy=accuracy[key], **summarize(analysis))

        # the stream entering block 0, measured like every other place (block 0's qkv reads it)
        _, _, analyses[TOKENS], tokens_entry = place((0, TOKENS), TOKENS)
        for b in range(L):
            entry = {}
            for g in GROUPS:
                W, means, analysis, entry[g] = place((b, g), f"b{b}_{g}")
                analyses[(b, g)] = analysis
                if g in ("mha", "ff") and b in example_blocks:
                    for n in _pick_examples(analysis, example_nodes):
                        arrays[f"example_b{b}_{g}_n{n}"] = node_matrices(W, means, slice(n, n + 1))[0].numpy()
                if g == "mha":
                    dh = sizes["mha"] // H
                    head_M = torch.stack([set_matrix(W, means, slice(h * dh, (h + 1) * dh))
                                          for h in range(H)])
                    heads = analyze_heads(head_M, analysis.recognized, threshold=threshold,
                                          draws=null_draws, seed=seed + b)
                    arrays[f"b{b}_coverage"] = heads.pop("_coverage").astype(np.int32)
                    arrays[f"b{b}_heads_recognized"] = heads.pop("_heads_recognized")
                    heads["block"] = b
                    heads_out.append(heads)
            blocks.append(entry)
            stream_acc.append({"mha": accuracy[(b, "stream_mha")], "ff": accuracy[(b, "stream_ff")]})
            log(f"[snp] block {b}: mha acc {accuracy[(b, 'mha')]:.3f}  ff acc {accuracy[(b, 'ff')]:.3f}")

        # 6: final-stream nodes through the model's own head
        fc_weight = model.fc.weight.detach().float().cpu()
        final_analysis = analyze_group(fc_weight, stats.means("final").cpu(), threshold)
        analyses["final"] = final_analysis
        _store_analysis(arrays, "final", final_analysis)
        final = dict(summarize(final_analysis), model_accuracy=stats.accuracy,
                     fc_kept_fraction=float(final_analysis.recognized.mean()))

        summary = {
            "schema_version": SCHEMA_VERSION,
            "config": {
                "threshold": threshold, "readout_mode": readout_mode, "readout": cfg.as_dict(),
                "readout_features_cached": bool(cache), "backend": backend, "null_draws": null_draws,
                "seed": seed, "null_seeds": [seed + b for b in range(L)], "split": split,
                "dataset": dataset, "model": model_name or getattr(model, "name", None),
                "model_config": _jsonable(getattr(model, "config", None)),
                "num_classes": K, "num_blocks": L, "num_heads": H, "head_dim": sizes["mha"] // H,
                "ff_dim": sizes["ff"], "embed_dim": sizes["stream_ff"],
                "tokens": getattr(model, "seq_len", None), **(extra_config or {}),
            },
            "model_accuracy": stats.accuracy,
            "num_samples": stats.total,
            "label_counts": stats.counts.tolist(),
            "blocks": blocks,
            "heads": heads_out,
            "stream": stream_acc,
            "tokens": tokens_entry,
            "final": final,
        }
        return SNPResult(summary=_jsonable(summary), arrays=arrays, analyses=analyses)

    return {t: analyse(t) for t in thresholds}


def run_snp(model, train_loader, test_loader, num_classes: int, threshold: float = 0.3,
            **kwargs) -> SNPResult:
    """Run the SNP analysis (see the module doc) at ``threshold``; ``test_loader`` is the
    analysed split; the other keywords are :func:`run_snp_thresholds`'s."""
    return run_snp_thresholds(model, train_loader, test_loader, num_classes, (threshold,), **kwargs)[float(threshold)]


def _jsonable(obj):
    """Plain JSON types; non-finite floats become None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def save(result: SNPResult, out_dir: str, plots: bool = True) -> dict:
    """Write ``snp.json``, ``nodes.npz`` and (``plots``) the PNG figures into ``out_dir``.
    Returns {name: path} of what was written."""
    paths = {"snp.json": os.path.join(out_dir, "snp.json"),
             "nodes.npz": os.path.join(out_dir, "nodes.npz")}
    # the pair is replaced together: both new files are complete before either is renamed
    text = json.dumps(result.summary, indent=1, allow_nan=False)
    arrays = dict(result.arrays)
    digest = (result.summary.get("config") or {}).get("checkpoint_sha256")
    if digest is not None:  # both files of the pair name the checkpoint (`cctk prune` checks them)
        arrays["checkpoint_sha256"] = np.array(digest)
    atomic_write_files({paths["snp.json"]: ("w", lambda f: f.write(text)),
                        paths["nodes.npz"]: ("wb", lambda f: np.savez_compressed(f, **arrays))})
    if plots:
        from cctk.snp.plots import make_plots
        paths.update(make_plots(result, out_dir))
    return paths


def load_snp(out_dir: str) -> SNPResult:
    """Read back what :func:`save` wrote (``analyses`` is empty)."""
    with open(os.path.join(out_dir, "snp.json")) as f:
        summary = json.load(f)
    with np.load(os.path.join(out_dir, "nodes.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    return SNPResult(summary=summary, arrays=arrays)


def load_recognized(out_dir: str) -> dict:
    """The boolean recognised-label matrices of nodes.npz: ``b{b}_{g}_recognized`` (n, K) for g
    in mha, ff, stream_mha, stream_ff; ``b{b}_heads_recognized`` (H, K); ``final_recognized``
    (d, K); ``tokens_recognized`` (d, K) (absent in results of cctk before the tokens were measured)."""
    with np.load(os.path.join(out_dir, "nodes.npz")) as z:
        return {k: z[k].astype(bool) for k in z.files if k.endswith("_recognized")}
