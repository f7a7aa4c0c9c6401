"""AdamW with the reference's weight-decay grouping, and the per-step warm-up + cosine schedule."""
from __future__ import annotations

import math
from typing import Iterable, List, Tuple

import torch
from torch import nn


def param_groups_weight_decay(model: nn.Module, weight_decay: float,
                              no_decay_names: Iterable[str] = ()) -> List[dict]:
    """Two AdamW groups, as timm's ``create_optimizer`` builds them for the reference: no weight
    decay for biases, 1-d parameters (LayerNorm weights) and ``no_decay_names`` (e.g. the
    positional embedding), ``weight_decay`` for everything else."""
    skip = set(no_decay_names)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: Tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    no_decay = getattr(model, "no_weight_decay", None)
    names = no_decay() if callable(no_decay) else ()
    return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay, names), lr=lr,
                             betas=tuple(betas))


class WarmupCosine:
    """LR multiplier for ``LambdaLR`` (base lr = ``lr``), per optimiser step s::

        s < W:       (warmup_lr + (lr - warmup_lr) * s / W) / lr
        W <= s < C:  (min_lr + (lr - min_lr) * (1 + cos(pi * (s - W) / (C - W))) / 2) / lr
        s >= C:      min_lr / lr          (cool-down)

    A plain object (not a closure) so ``LambdaLR.state_dict`` stores its fields.
    """

    def __init__(self, lr: float, warmup_steps: int, cosine_end_step: int,
                 warmup_lr: float = 1e-6, min_lr: float = 1e-5):
        self.lr = float(lr)
        self.warmup_steps = int(warmup_steps)
        self.cosine_end_step = max(int(cosine_end_step), self.warmup_steps)
        self.warmup_lr = float(warmup_lr)
        self.min_lr = float(min_lr)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if step < self.cosine_end_step:
            t = (step - self.warmup_steps) / (self.cosine_end_step - self.warmup_steps)
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
        return self.min_lr

    def __call__(self, step: int) -> float:
        return self.lr_at(step) / self.lr


def build_scheduler(optimizer: torch.optim.Optimizer, lr: float, steps_per_epoch: int,
                    epochs: int, warmup_epochs: float, warmup_lr: float,
                    min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step ``LambdaLR`` with :class:`WarmupCosine`; call ``.step()`` after each optimiser
    step. ``epochs`` is the length of warm-up + cosine; later steps stay at ``min_lr``."""
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(lr, warmup_steps, epochs * steps_per_epoch, warmup_lr, min_lr))
