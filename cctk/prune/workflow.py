"""One pruning run: prune a trained model (ANDC or block magnitude), fine-tune with the masks
fixed, evaluate, convert to ANDCLinear. Shared by ``cctk prune`` and the demo pipeline."""
from __future__ import annotations

import copy
import time
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from cctk import data
from cctk.prune.andc import RecognizedSets, prune_andc, prune_magnitude
from cctk.prune.convert import convert_to_andc, density_summary
from cctk.prune.finetune import finetune
from cctk.train import evaluate

__all__ = ["METHODS", "data_loaders", "prune_model", "prune_and_finetune"]

METHODS = ("andc", "magnitude")


def data_loaders(dataset: dict, data_dir: Optional[str] = None, batch_size: int = 64,
                 eval_batch_size: int = 256, seed: int = 0, train_subset: Optional[int] = None,
                 test_subset: Optional[int] = None):
    """(train_loader, eval_loader, num_classes) for a checkpoint's ``dataset`` record, without
    augmentation: the run's training split and the split it evaluated on (test; val for
    flowers102), with its dataset options (:func:`cctk.data.from_record`). ``data_dir``
    overrides the recorded one."""
    train = data.from_record(dataset, "train", data_dir=data_dir, subset=train_subset)
    test = data.from_record(dataset, "eval", data_dir=data_dir, subset=test_subset)
    num_classes = train.num_classes
    return (data.build_loader(train, batch_size, shuffle=True, seed=seed),
            data.build_loader(test, eval_batch_size, shuffle=False, seed=seed), num_classes)


def prune_model(model: nn.Module, method: str, sets: Optional[RecognizedSets] = None, block_size: int = 32,
                density: Optional[float] = 0.25, tau: Optional[float] = None, min_overlap: int = 1,
                order: str = "auto", classifier: bool = True, classifier_sets: Optional[torch.Tensor] = None):
    """(pruned model with MaskedLinear layers, plan). ``magnitude`` with ``sets`` given matches the
    ANDC plan's per-layer block counts and classifier kept count (same densities); without
    sets it uses ``density`` everywhere and leaves the classifier dense."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "andc":
        if sets is None:
            raise ValueError("ANDC pruning needs the SNP label sets (`cctk snp` output directory)")
        return prune_andc(model, sets, block_size=block_size, density=density, tau=tau,
                          min_overlap=min_overlap, order=order, prune_classifier=classifier,
                          classifier_sets=classifier_sets)
    if sets is not None:
        _, ref = prune_andc(model, sets, block_size=block_size, density=density, tau=tau,
                            min_overlap=min_overlap, order=order, prune_classifier=classifier,
                            classifier_sets=classifier_sets)
        cls_kept = int(ref.classifier_mask.sum()) if ref.classifier_mask is not None else None
        return prune_magnitude(model, block_size, blocks_kept=ref.blocks_kept(), classifier_kept=cls_kept)
    if density is None:
        raise ValueError("magnitude pruning without SNP sets needs a density")
    return prune_magnitude(model, block_size, density=density)


def prune_and_finetune(model: nn.Module, method: str, sets: Optional[RecognizedSets], train_loader, test_loader,
                       block_size: int = 32, density: Optional[float] = 0.25, tau: Optional[float] = None,
                       min_overlap: int = 1, order: str = "auto", finetune_epochs: int = 5, lr: float = 1e-3,
                       device: Union[str, torch.device] = "cpu", convert: bool = True,
                       log: Optional[Callable[[str], None]] = None, progress: bool = False,
                       classifier: bool = True, classifier_sets: Optional[torch.Tensor] = None,
                       sparse_finetune: bool = False):
    """Prune a copy of ``model``, evaluate, fine-tune, evaluate again, convert to ANDCLinear.

    Fine-tuning runs on masked dense weights (MaskedLinear), or with ``sparse_finetune`` on the
    ANDCLinear layers themselves (their sparse autograd: only kept blocks have gradients).

    Returns (pruned model, plan, record) where record holds the densities, accuracies
    (``accuracy_before_finetune``, ``accuracy``), the fine-tune history and timings.
    """
    say = log or (lambda s: None)
    device = torch.device(device)
    t0 = time.perf_counter()
    pruned, plan = prune_model(copy.deepcopy(model).cpu(), method, sets, block_size, density, tau,
                               min_overlap, order, classifier, classifier_sets)
    pruned.to(device)
    dens = density_summary(pruned)
    acc0 = evaluate(pruned, test_loader, device)["accuracy"]
    say(f"[{method}] linear density {dens['linear_density']:.3f}, classifier density "
        f"{dens['classifier_density']:.3f}; accuracy before fine-tune {acc0:.4f}")
    t1 = time.perf_counter()
    if sparse_finetune:
        convert_to_andc(pruned)
    history = finetune(pruned, train_loader, epochs=finetune_epochs, lr=lr, device=device, log=say,
                       progress=progress)
    t2 = time.perf_counter()
    if convert:
        convert_to_andc(pruned)
    acc = evaluate(pruned, test_loader, device)["accuracy"]
    say(f"[{method}] accuracy after {finetune_epochs} fine-tune epoch(s): {acc:.4f}")
    record = {
        "method": method,
        "block_size": block_size,
        "target_density": density if tau is None else None,
        "tau": tau,
        "min_overlap": min_overlap,
        "order": plan.permutations.order if plan.permutations is not None else None,
        "layers": dens["layers"],
        "blocks_kept": plan.blocks_kept(),
        "linear_density": dens["linear_density"],
        "classifier_density": dens["classifier_density"],
        "accuracy_before_finetune": acc0,
        "accuracy": acc,
        "finetune_epochs": finetune_epochs,
        "finetune_lr": lr,
        "finetune_layers": "ANDCLinear" if sparse_finetune else "masked dense",
        "finetune_history": history,
        "layer_stats": plan.layer_stats,
        "tokens_assumed_all_labels": plan.tokens_assumed if method == "andc" else None,
        "prune_seconds": t1 - t0,
        "finetune_seconds": t2 - t1,
    }
    return pruned, plan, record
