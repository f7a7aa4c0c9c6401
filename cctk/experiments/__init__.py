"""The application on top of the rooms below: the whole ANDC story as one run
(:func:`run_pipeline`: train -> SNP -> ANDC and magnitude pruning -> fine-tune -> throughput ->
density sweep -> ``summary.json`` + ``report.html``) and ``cctk demo`` (:func:`run_demo`), which
tells it in plain words. Nothing below imports this package."""
from cctk.experiments.demo import DEFAULT_EPOCHS, run_demo
from cctk.experiments.pipeline import (CLASSIFIER_SCAN, DEFAULT_BLOCK_SIZE, DEFAULT_CLASSIFIER_THRESHOLD,
                                       DEFAULT_DENSITY, SWEEP_DENSITIES, run_pipeline,
                                       train_split_loader)

__all__ = ["run_pipeline", "run_demo", "train_split_loader", "DEFAULT_BLOCK_SIZE", "DEFAULT_DENSITY",
           "DEFAULT_EPOCHS", "SWEEP_DENSITIES", "DEFAULT_CLASSIFIER_THRESHOLD", "CLASSIFIER_SCAN"]
