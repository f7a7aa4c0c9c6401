"""Fine-tuning of a pruned model with its masks fixed, and inference throughput.

Fine-tuning reuses cctk.train's epoch loop (``train_one_epoch``), AdamW grouping
(``build_optimizer``) and warm-up + cosine schedule (``build_scheduler``). Masks stay fixed by
construction: a MaskedLinear's weight gradient is (dL/dy)^T x * M (zero off the mask, and the
forward only ever sees W * M), and an ANDCLinear holds and differentiates only its kept blocks.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn

from cctk.data import set_loader_epoch
from cctk.timing import models_images_per_s
from cctk.train import build_optimizer, build_scheduler, evaluate, make_grad_scaler, train_one_epoch

__all__ = ["finetune", "images_per_second"]


def finetune(model: nn.Module, train_loader, epochs: int = 2, lr: float = 1e-4, weight_decay: float = 0.0,
             device="cpu", label_smoothing: float = 0.0, warmup_epochs: float = 0.0,
             min_lr: Optional[float] = None, eval_loader=None, progress: bool = False,
             log=None) -> List[Dict[str, float]]:
    """Fine-tune ``model`` in place for ``epochs`` epochs (AdamW, cosine from ``lr`` to
    ``min_lr`` = lr/10 by default). Returns one record per epoch (train loss, and test accuracy
    when ``eval_loader`` is given)."""
    history: List[Dict[str, float]] = []
    if epochs <= 0:
        return history
    device = torch.device(device)
    model.to(device)
    optimizer = build_optimizer(model, lr=lr, weight_decay=weight_decay)
    steps = max(1, len(train_loader))
    scheduler = build_scheduler(optimizer, lr=lr, steps_per_epoch=steps, epochs=epochs,
                                warmup_epochs=warmup_epochs, warmup_lr=lr * 0.1,
                                min_lr=lr * 0.1 if min_lr is None else min_lr)
    scaler = make_grad_scaler(False)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    for epoch in range(epochs):
        if hasattr(getattr(train_loader, "sampler", None), "set_epoch"):
            set_loader_epoch(train_loader, epoch)
        r = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, criterion, device,
                            progress=progress, desc=f"fine-tune {epoch + 1}/{epochs}")
        rec = {"epoch": epoch + 1, "train_loss": r["loss_sum"] / max(1, r["samples"]),
               "train_accuracy": r["correct"] / max(1, r["samples"])}
        if eval_loader is not None:
            rec["test_accuracy"] = evaluate(model, eval_loader, device)["accuracy"]
        history.append(rec)
        if log is not None:
            log(f"  fine-tune epoch {epoch + 1}/{epochs}: loss {rec['train_loss']:.4f}"
                + (f", test acc {rec['test_accuracy']:.4f}" if "test_accuracy" in rec else ""))
    model.eval()
    return history


def images_per_second(model: nn.Module, example: torch.Tensor, rounds: int = 15, warmup: int = 1) -> Dict[str, float]:
    """Inference throughput of ``model`` on the batch ``example`` (fastest of ``rounds``; see
    :mod:`cctk.timing`, which times several models interleaved): {"images_per_s",
    "ms_per_batch", "batch"}."""
    return models_images_per_s({"model": model}, example, rounds=rounds, warmup=warmup)["model"]
