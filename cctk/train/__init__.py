"""Training (AdamW + warm-up/cosine, label smoothing, Mixup/CutMix, clipping, mixed precision),
evaluation, atomic checkpoints with exact resume, and DDP under torchrun.

    >>> from cctk.train import TrainConfig, train
    >>> metrics = train(TrainConfig(dataset="digits", epochs=30, out="runs/digits"))
    >>> metrics["test_accuracy"]
"""
from cctk.checkpoint import atomic_save, load_checkpoint, read_checkpoint
from cctk.data import subset_dataset
from cctk.train.config import (PRESETS, ConfigError, TrainConfig, get_preset, list_presets,
                               preset_for_dataset)
from cctk.train.distributed import DistContext, resolve_device, setup_distributed
from cctk.train.loop import (CHECKPOINT_NAME, METRICS_LOG_NAME, METRICS_NAME, check_model_input,
                             evaluate, make_grad_scaler, prepare, resolve_amp, train,
                             train_one_epoch)
from cctk.train.optim import WarmupCosine, build_optimizer, build_scheduler

__all__ = [
    "TrainConfig", "PRESETS", "get_preset", "list_presets", "preset_for_dataset", "ConfigError",
    "train", "evaluate", "train_one_epoch", "prepare", "check_model_input", "resolve_amp",
    "make_grad_scaler", "subset_dataset",
    "load_checkpoint", "read_checkpoint", "atomic_save", "setup_distributed", "DistContext", "resolve_device",
    "build_optimizer", "build_scheduler", "WarmupCosine",
    "CHECKPOINT_NAME", "METRICS_NAME", "METRICS_LOG_NAME",
]
