"""One pruning run: prune a trained model by any method of the registry
(:func:`cctk.prune.pruner.prune_model`), fine-tune with the masks fixed, evaluate, convert to
ANDCLinear. Shared by ``cctk prune`` and the demo pipeline; ``cctk study`` prunes through
``prune_model`` too."""
from __future__ import annotations

import copy
import time
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
from torch.utils.data import Subset

from cctk import data
from cctk.prune.andc import RecognizedSets
from cctk.prune.convert import convert_to_andc, density_summary, relative_linear_density
from cctk.prune.finetune import finetune
from cctk.prune.pruner import METHODS, PruneSpec, method_rule, prune_model
from cctk.train import evaluate

__all__ = ["calibration_batches", "data_loaders", "prune_and_finetune"]


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


def calibration_batches(dataset, n: int = 256, batch_size: int = 64) -> list:
    """The first ``n`` images of ``dataset`` (the training split, no augmentation) in batches:
    the calibration images of wanda and structured pruning."""
    sub = Subset(dataset, range(min(len(dataset), int(n))))
    return [x for x, _ in data.build_loader(sub, batch_size, shuffle=False)]


def prune_and_finetune(model: nn.Module, spec: PruneSpec, sets: Optional[RecognizedSets], train_loader, test_loader,
                       device: Union[str, torch.device] = "cpu", log: Optional[Callable[[str], None]] = None,
                       progress: bool = False, calibration=None):
    """Prune a copy of ``model`` by ``spec`` (:class:`cctk.prune.pruner.PruneSpec`), evaluate,
    fine-tune, evaluate again, convert to ANDCLinear (``spec.convert``).

    Fine-tuning runs on masked dense weights (MaskedLinear), or with ``spec.sparse_finetune`` on
    the ANDCLinear layers themselves (their sparse autograd: only kept blocks have gradients). A
    structurally pruned model is a smaller dense CCT: nothing to convert. ``calibration``
    (wanda, node methods; default: the first 256 images of ``train_loader``'s dataset).

    Returns (pruned model, plan, record) where record holds the densities, accuracies
    (``accuracy_before_finetune``, ``accuracy``), the rule, the fine-tune history and timings.
    """
    say = log or (lambda s: None)
    device = torch.device(device)
    method = spec.method
    t0 = time.perf_counter()
    if calibration is None and METHODS[method].needs_calibration:
        calibration = calibration_batches(train_loader.dataset)
    structured = METHODS[method].kind != "block"
    pruned, plan = prune_model(copy.deepcopy(model).cpu(), spec, sets, calibration=calibration, device="cpu")
    pruned.to(device)
    dens = density_summary(pruned)
    if structured:   # narrower layers: the density against the input model's layers
        dens["linear_density"] = relative_linear_density(model, pruned)
    acc0 = evaluate(pruned, test_loader, device)["accuracy"]
    say(f"[{method}] linear density {dens['linear_density']:.3f}, classifier density "
        f"{dens['classifier_density']:.3f}; accuracy before fine-tune {acc0:.4f}")
    t1 = time.perf_counter()
    if spec.sparse_finetune:
        convert_to_andc(pruned)   # (no block-masked layer, as after node removal: nothing to do)
    history = finetune(pruned, train_loader, epochs=spec.finetune_epochs, lr=spec.lr, device=device, log=say,
                       progress=progress)
    t2 = time.perf_counter()
    if spec.convert:
        convert_to_andc(pruned)
    acc = evaluate(pruned, test_loader, device)["accuracy"]
    say(f"[{method}] accuracy after {spec.finetune_epochs} fine-tune epoch(s): {acc:.4f}")
    rule = method_rule(method, spec.rule)
    record = {
        "method": method,
        "block_size": spec.block_size,
        "target_density": spec.density if spec.tau is None else None,
        "tau": spec.tau,
        "rule": rule.as_dict() if rule is not None else None,
        "order": plan.permutations.order if plan.permutations is not None else None,
        "layers": dens["layers"],
        "blocks_kept": plan.blocks_kept(),
        "linear_density": dens["linear_density"],
        "classifier_density": dens["classifier_density"],
        "accuracy_before_finetune": acc0,
        "accuracy": acc,
        "finetune_epochs": spec.finetune_epochs,
        "finetune_lr": spec.lr,
        "finetune_layers": ("smaller dense" if METHODS[method].kind == "node"
                            else "ANDCLinear" if spec.sparse_finetune else "masked dense"),
        "structured_widths": plan.structured,
        "finetune_history": history,
        "layer_stats": plan.layer_stats,
        "tokens_assumed_all_labels": plan.tokens_assumed if rule is not None else None,
        "prune_seconds": t1 - t0,
        "finetune_seconds": t2 - t1,
    }
    return pruned, plan, record
