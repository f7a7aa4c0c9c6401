"""``cctk demo``: the main job on the embedded default data set, explained in plain words.

Today it trains the dataset's default CCT (digits: ``cct_2_3x1_8`` on scikit-learn's bundled
8x8 digits, no download) with the dataset's preset recipe, evaluates the final model on the test
split, and writes ``checkpoint.pt``, ``metrics.json`` and ``metrics.jsonl`` under ``out``.
Later stages (single-nodal performance, ANDC pruning) extend :func:`run_demo`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from cctk.train import (CHECKPOINT_NAME, METRICS_NAME, TrainConfig, get_preset,
                        preset_for_dataset, train)

DEFAULT_EPOCHS = 30


def demo_config(out: str, dataset: str = "digits", epochs: Optional[int] = None, seed: int = 0,
                **overrides) -> TrainConfig:
    """The demo's training configuration: the dataset's preset (if any), then the overrides."""
    preset = preset_for_dataset(dataset)
    fields: Dict[str, Any] = dict(out=out, seed=seed, **overrides)
    if epochs is not None:
        fields["epochs"] = epochs
    if preset is not None:
        return get_preset(preset, **fields)
    return TrainConfig(dataset=dataset, **fields)


def run_demo(out: str, dataset: str = "digits", epochs: Optional[int] = None, seed: int = 0,
             data_dir: Optional[str] = None, device: Optional[str] = None,
             verbose: bool = True, **overrides) -> Dict[str, Any]:
    """Train and evaluate, print a plain-words summary, return ``{"train": metrics, ...}``."""
    say = print if verbose else (lambda *a, **k: None)
    config = demo_config(out, dataset, epochs, seed, data_dir=data_dir, device=device,
                         verbose=verbose, **overrides)
    say(f"cctk demo: step 1 of 1 - train a Compact Convolutional Transformer on '{dataset}' "
        f"for {config.total_epochs} epochs (AdamW, lr {config.lr:g}, warm-up "
        f"{config.warmup_epochs:g} epochs then cosine, label smoothing {config.label_smoothing:g}), "
        f"then measure its accuracy on the held-out test images.", flush=True)
    metrics = train(config)
    chance = 1.0 / metrics["dataset_info"]["num_classes"]
    say("")
    say("What happened:")
    say(f"  - Built {metrics['model']} ({metrics['parameters']:,} parameters) for "
        f"{metrics['dataset_info']['in_channels']}-channel {metrics['dataset_info']['img_size']}x"
        f"{metrics['dataset_info']['img_size']} images with {metrics['dataset_info']['num_classes']} classes.")
    say(f"  - Trained it for {metrics['epochs']} epochs on {metrics['dataset_info']['train_size']} "
        f"training images on {metrics['device']}, in {metrics['wall_time_s']:.1f} seconds; "
        f"the final training loss was {metrics['train_loss']:.3f}.")
    say(f"  - On {metrics['test_samples']} test images it never saw, it classifies "
        f"{metrics['test_accuracy'] * 100:.1f}% correctly (chance would be {chance * 100:.0f}%).")
    say(f"  - Wrote the trained model to {os.path.join(out, CHECKPOINT_NAME)} and the numbers "
        f"to {os.path.join(out, METRICS_NAME)}.")
    say(f"  Next: `cctk eval --checkpoint {os.path.join(out, CHECKPOINT_NAME)}` re-measures it.")
    return {"train": metrics}
