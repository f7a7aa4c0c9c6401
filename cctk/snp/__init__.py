"""Single-nodal performance (SNP) of a trained CCT's nodes (SCIENCE.md sections 2-5).

* :func:`analyze_matrix` / :func:`analyze_matrices`: recognised labels, greedy clusters, noise
  of node matrices (one / many, identical results);
* :class:`LabelStatsTap`, :func:`collect_label_stats`: the measurement pass (fused ops, DDP
  reduced label-conditioned sums);
* readouts, node matrices, per-sub-block summaries, heads (SHP, specialisation, null model);
* :func:`run_snp` -> :class:`SNPResult` (:func:`run_snp_thresholds`: several thresholds, one measurement), :func:`save`, :func:`load_snp`, :func:`load_recognized`.
"""
from cctk.snp.clusters import BatchAnalysis, NodeAnalysis, analyze_matrices, analyze_matrix
from cctk.snp.heads import (analyze_heads, head_coverage, jaccard_mean, mean_share, null_model,
                            specialisation)
from cctk.snp.matrices import analyze_group, node_matrices, set_matrix, summarize
from cctk.snp.pipeline import SNPResult, load_recognized, load_snp, run_snp, run_snp_thresholds, save
from cctk.snp.readout import ReadoutConfig, readout_accuracy, train_readouts
from cctk.snp.stats import GROUPS, LabelStats, LabelStatsTap, collect_label_stats

__all__ = [
    "NodeAnalysis", "BatchAnalysis", "analyze_matrix", "analyze_matrices",
    "analyze_heads", "head_coverage", "jaccard_mean", "mean_share", "null_model", "specialisation",
    "analyze_group", "node_matrices", "set_matrix", "summarize",
    "SNPResult", "run_snp", "run_snp_thresholds", "save", "load_snp", "load_recognized",
    "ReadoutConfig", "train_readouts", "readout_accuracy",
    "GROUPS", "LabelStats", "LabelStatsTap", "collect_label_stats",
]
