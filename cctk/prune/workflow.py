"""One pruning run: prune a trained model by any method of the scorer API (block scorers or
structured node removal), fine-tune with the masks fixed, evaluate, convert to ANDCLinear.
Shared by ``cctk prune``, the demo pipeline and ``cctk study``."""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from cctk import data
from cctk.prune.andc import PrunePlan, RecognizedSets
from cctk.prune.convert import convert_to_andc, density_summary, relative_linear_density
from cctk.prune.finetune import finetune
from cctk.prune.masks import classifier_keep
from cctk.prune.scorers import (BLOCK_METHODS, STUDY_METHODS, make_node_scorer, make_scorer, prune_blocks,
                                prune_nodes)
from cctk.train import evaluate

__all__ = ["METHODS", "STRUCTURED_METHODS", "calibration_batches", "data_loaders", "prune_model", "prune_and_finetune",
           "hybrid_node_fraction"]

#: every pruning method: the block scorers and structured node removal (SNP- or activation-ranked)
METHODS = STUDY_METHODS
STRUCTURED_METHODS = tuple(m for m in METHODS if m not in BLOCK_METHODS)


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
    from torch.utils.data import Subset
    sub = Subset(dataset, range(min(len(dataset), int(n))))
    return [x for x, _ in data.build_loader(sub, batch_size, shuffle=False)]


def _structured_plan(model: nn.Module, method: str, density: float, block_size: int) -> PrunePlan:
    """The PrunePlan of a structurally pruned (smaller dense) CCT: no masks, the kept widths."""
    widths = {str(b): {"ff": blk.linear1.out_features, "head_dim": blk.self_attn.qkv.out_features // 3 // blk.self_attn.num_heads}
              for b, blk in enumerate(model.blocks)}
    return PrunePlan(method=method, block_size=block_size, block_masks={}, classifier_mask=None, density=density,
                     structured=widths)


def hybrid_node_fraction(model: nn.Module, density: float, block_size: int) -> float:
    """The node fraction f of ``structured-andc`` at a target linear density: the fraction on a
    1/8 grid nearest sqrt(density) (half the pruning by node removal, half by blocks) among
    those that keep every FF width and every head's inner width a multiple of the block size
    (so the smaller layers tile into whole blocks); sqrt(density) itself when none does."""
    target = math.sqrt(density)
    H = model.num_heads

    def tiles(f):
        ok = all(round(f * blk.linear1.out_features) % block_size == 0 for blk in model.blocks)
        return ok and all(H * round(f * blk.self_attn.qkv.out_features // 3 // H) % block_size == 0
                          for blk in model.blocks)
    grid = [k / 8 for k in range(1, 9) if tiles(k / 8) and k / 8 >= density]
    return min(grid, key=lambda f: abs(f - target)) if grid else target


def prune_model(model: nn.Module, method: str, sets=None, block_size: int = 32,
                density: Optional[float] = 0.25, tau: Optional[float] = None, min_overlap: int = 1,
                order: str = "auto", classifier: bool = True, classifier_sets: Optional[torch.Tensor] = None,
                calibration=None, seed: int = 0, device: Union[str, torch.device] = "cpu"):
    """(pruned copy of ``model``, PrunePlan) by any method of :data:`METHODS`, through the one
    scorer API (:mod:`cctk.prune.scorers`).

    Block methods give MaskedLinear layers at equal per-layer block densities (``density``; or
    ANDC's ``tau`` rule, whose per-layer densities every other block method then meets too).
    The classifier: ANDC-type methods keep its weights by the label-set rule (``classifier``
    True; ``classifier_sets`` replaces the SNP's final-stream sets); the other block methods
    keep as many of its weights as that rule keeps when ``sets`` are given, else leave it dense.
    ``structured`` / ``structured-activation`` remove whole FF units and head dims (the kept
    fraction ``density``; ranked by SNP label counts / activation norm) and return a smaller
    dense CCT. ``sets``: the SNP label sets (a RecognizedSets, an SNP directory or its arrays);
    ``calibration``: training-split image batches (wanda, structured); ``seed``: random and
    andc-shuffled."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if sets is not None and not isinstance(sets, RecognizedSets):   # an SNP directory or its arrays
        sets = RecognizedSets.from_snp(sets, num_blocks=len(model.blocks))
    if method in STRUCTURED_METHODS:
        if tau is not None or density is None:
            raise ValueError(f"{method} takes a density (the kept fraction of FF units and head dims), not tau")
        scorer = make_node_scorer("activation" if method == "structured-activation" else "snp", sets=sets,
                                  calibration=calibration, device=device)
        if method != "structured-andc":
            pruned, _ = prune_nodes(model, scorer, density)
            return pruned, _structured_plan(pruned, method, density, block_size)
        # the hybrid: SNP-ranked node removal to the node fraction f, then ANDC blocks in the smaller
        # model (its nodes' label sets) down to the target linear density
        small, keep = prune_nodes(model, scorer, hybrid_node_fraction(model, density, block_size))
        sub = sets.select_nodes(keep["ff_keep"], keep["head_dims_keep"], head_dim=model.head_dim)
        block_density = min(1.0, density / relative_linear_density(model, small))
        pruned, plan = prune_blocks(small, make_scorer("andc", sets=sub, min_overlap=min_overlap, order=order,
                                                       prune_classifier=classifier, classifier_sets=classifier_sets),
                                    density=block_density, block_size=block_size)
        plan.method, plan.structured = method, _structured_plan(small, method, density, block_size).structured
        return pruned, plan
    andc_type = method in ("andc", "andc-shuffled", "andc-magnitude")
    cls_sets = classifier_sets if classifier_sets is not None else (sets.final if sets is not None else None)
    opts = {}
    if andc_type:
        opts = dict(min_overlap=min_overlap, order=order, prune_classifier=classifier, classifier_sets=classifier_sets)
    elif tau is not None:
        if sets is None:
            raise ValueError(f"{method} with tau needs the SNP label sets (it meets ANDC's per-layer densities)")
        _, ref = prune_blocks(model, make_scorer("andc", sets=sets, min_overlap=min_overlap, order=order,
                                                 prune_classifier=False), block_size=block_size, tau=tau)
        density = {n: float(m.float().mean()) for n, m in ref.block_masks.items()}
        tau = None
    scorer = make_scorer(method, sets=sets, calibration=calibration, seed=seed, device=device, **opts)
    n_cls = int(classifier_keep(cls_sets).sum()) if (classifier and cls_sets is not None) else None
    return prune_blocks(model, scorer, density=density, block_size=block_size, tau=tau, classifier_kept=n_cls)


def prune_and_finetune(model: nn.Module, method: str, sets: Optional[RecognizedSets], train_loader, test_loader,
                       block_size: int = 32, density: Optional[float] = 0.25, tau: Optional[float] = None,
                       min_overlap: int = 1, order: str = "auto", finetune_epochs: int = 5, lr: float = 1e-3,
                       device: Union[str, torch.device] = "cpu", convert: bool = True,
                       log: Optional[Callable[[str], None]] = None, progress: bool = False,
                       classifier: bool = True, classifier_sets: Optional[torch.Tensor] = None,
                       sparse_finetune: bool = False, calibration=None, seed: int = 0):
    """Prune a copy of ``model``, evaluate, fine-tune, evaluate again, convert to ANDCLinear.

    Fine-tuning runs on masked dense weights (MaskedLinear), or with ``sparse_finetune`` on the
    ANDCLinear layers themselves (their sparse autograd: only kept blocks have gradients). A
    structurally pruned model is a smaller dense CCT: nothing to convert. ``calibration``
    (wanda, structured; default: the first 256 images of ``train_loader``'s dataset).

    Returns (pruned model, plan, record) where record holds the densities, accuracies
    (``accuracy_before_finetune``, ``accuracy``), the fine-tune history and timings.
    """
    say = log or (lambda s: None)
    device = torch.device(device)
    t0 = time.perf_counter()
    if calibration is None and method in ("wanda",) + STRUCTURED_METHODS:
        calibration = calibration_batches(train_loader.dataset)
    structured = method in STRUCTURED_METHODS
    pruned, plan = prune_model(copy.deepcopy(model).cpu(), method, sets, block_size, density, tau,
                               min_overlap, order, classifier, classifier_sets, calibration=calibration,
                               seed=seed, device="cpu")
    pruned.to(device)
    dens = density_summary(pruned)
    if structured:   # narrower layers: the density against the input model's layers
        dens["linear_density"] = relative_linear_density(model, pruned)
    acc0 = evaluate(pruned, test_loader, device)["accuracy"]
    say(f"[{method}] linear density {dens['linear_density']:.3f}, classifier density "
        f"{dens['classifier_density']:.3f}; accuracy before fine-tune {acc0:.4f}")
    t1 = time.perf_counter()
    if sparse_finetune:
        convert_to_andc(pruned)   # (no block-masked layer, as after node removal: nothing to do)
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
        "finetune_layers": ("smaller dense" if method in ("structured", "structured-activation")
                            else "ANDCLinear" if sparse_finetune else "masked dense"),
        "structured_widths": plan.structured,
        "finetune_history": history,
        "layer_stats": plan.layer_stats,
        "tokens_assumed_all_labels": plan.tokens_assumed if method == "andc" else None,
        "prune_seconds": t1 - t0,
        "finetune_seconds": t2 - t1,
    }
    return pruned, plan, record
