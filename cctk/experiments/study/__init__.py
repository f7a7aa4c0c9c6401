"""``cctk study``: pruning as a controlled experiment (SCIENCE.md section 7), split by job:

* :mod:`~cctk.experiments.study.config`: :class:`StudyConfig`, the primary question
  (:data:`PRIMARY`), resuming rules and an older ``study_config.json``'s defaults;
* :mod:`~cctk.experiments.study.stats`: t-intervals, paired t-tests, the exact sign-flip test,
  Holm, the Pareto frontier, :func:`summarize_results`;
* :mod:`~cctk.experiments.study.ledger`: cells, their order, ``results.csv``, claims, workers;
* :mod:`~cctk.experiments.study.run`: per seed the model, SNP and validation choices, every cell
  (:func:`run_study`), and a finished study's models (:func:`study_cell_models`);
* :mod:`~cctk.experiments.study.report`: ``summary.json``, ``summary.md``, ``report.html``.
"""
from cctk.experiments.study.config import LEGACY_DEFAULTS, PRIMARY, StudyConfig, load_config
from cctk.experiments.study.ledger import RESULT_FIELDS, cell_key, cell_order, read_rows, write_rows
from cctk.experiments.study.report import study_markdown, write_study_report, write_summary
from cctk.experiments.study.run import model_digest, run_study, study_cell_models
from cctk.experiments.study.stats import holm, pareto_frontier, sign_flip_p, summarize_results

__all__ = ["StudyConfig", "PRIMARY", "LEGACY_DEFAULTS", "load_config", "RESULT_FIELDS", "cell_key", "cell_order",
           "read_rows", "write_rows", "run_study", "study_cell_models", "model_digest", "summarize_results",
           "holm", "pareto_frontier", "sign_flip_p", "study_markdown", "write_summary", "write_study_report"]
