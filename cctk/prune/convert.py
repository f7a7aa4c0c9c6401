"""The pruned model as ANDCLinear layers; densities; pruned checkpoints (save / load).

A pruned checkpoint is a cctk checkpoint (format ``cctk-checkpoint``, loadable with
``torch.load(weights_only=True)``) with a ``pruning`` entry. It holds no dense weights of pruned layers: the state dict of the model with
its ANDCLinear (kept blocks only) and MaskedLinear (classifier) modules, the block masks, the
block size and the (already permuted) model config. Loading is
:func:`cctk.checkpoint.load_checkpoint` (one rebuild for dense and pruned models): it builds the
dense architecture from the config, swaps in empty ANDCLinear / MaskedLinear modules of the
recorded masks, then ``load_state_dict(strict=True)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from cctk.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, PRUNED_FORMAT, CheckpointError,
                             atomic_save, is_pruned_checkpoint, load_checkpoint)
from cctk.checkpoint import replace_submodule as _set_submodule
from cctk.nn import ANDCLinear, MaskedLinear, expand_block_mask
from cctk.prune.plan import PrunePlan, encoder_linear_names

__all__ = [
    "PRUNED_FORMAT",
    "convert_to_andc",
    "to_masked_dense",
    "layer_densities",
    "density_summary",
    "pruned_checkpoint",
    "save_pruned",
    "load_pruned",
    "is_pruned_checkpoint",
]

def _is_andc(module: nn.Module) -> bool:
    return isinstance(module, ANDCLinear)


def _block_mask_of(module: nn.Module) -> Optional[torch.Tensor]:
    bm = getattr(module, "block_mask", None)
    return bm.detach().cpu().bool() if isinstance(bm, torch.Tensor) else None


@torch.no_grad()
def convert_to_andc(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Replace (in place) every block-masked MaskedLinear of the encoder by
    ``cctk.nn.ANDCLinear.from_dense(W * mask, block_mask, block_size)``: same outputs, only the
    kept blocks stored. The classifier (element mask) stays a MaskedLinear."""
    for name in encoder_linear_names(model):
        m = model.get_submodule(name)
        if isinstance(m, MaskedLinear) and m.block_mask is not None:
            new = ANDCLinear.from_dense(m.to_linear(), m.block_mask.cpu(), m.block_size)
            new = new.to(device=m.weight.device)
            if backend is not None and hasattr(new, "backend"):
                new.backend = backend
            new.train(m.training)
            _set_submodule(model, name, new)
    return model


@torch.no_grad()
def to_masked_dense(model: nn.Module) -> nn.Module:
    """Replace (in place) every ANDCLinear / MaskedLinear of the encoder by a plain nn.Linear
    holding the masked weight (the dense-cost twin used as the throughput baseline)."""
    for name in encoder_linear_names(model):
        m = model.get_submodule(name)
        if isinstance(m, MaskedLinear):
            _set_submodule(model, name, m.to_linear())
        elif _is_andc(m):
            w = m.to_dense()
            b = getattr(m, "bias", None)
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
            _set_submodule(model, name, lin)
    return model


def _kept_elements(module: nn.Module):
    """(kept weight elements, total weight elements) of a linear-like module."""
    if isinstance(module, MaskedLinear):
        return int(module.mask.sum()), module.mask.numel()
    if isinstance(module, nn.Linear):
        return module.weight.numel(), module.weight.numel()
    bm = _block_mask_of(module)
    shape = (module.out_features, module.in_features)
    if bm is None:
        raise TypeError(f"cannot read the kept weights of a {type(module).__name__}")
    kept = expand_block_mask(bm, int(module.block_size), shape)
    return int(kept.sum()), kept.numel()


def layer_densities(model: nn.Module) -> Dict[str, float]:
    """Kept fraction of each encoder linear's weight elements (1.0 for dense layers)."""
    out = {}
    for name in encoder_linear_names(model):
        k, n = _kept_elements(model.get_submodule(name))
        out[name] = k / n
    return out


def relative_linear_density(dense: nn.Module, pruned: nn.Module) -> float:
    """Kept weight elements of ``pruned``'s encoder linears over the weight elements of
    ``dense``'s: the linear density of a model whose layers structured pruning also narrowed."""
    kept = sum(_kept_elements(pruned.get_submodule(n))[0] for n in encoder_linear_names(pruned))
    return kept / sum(dense.get_submodule(n).weight.numel() for n in encoder_linear_names(dense))


def density_summary(model: nn.Module) -> dict:
    """{"layers": per-layer density, "linear_density": kept / total over every encoder linear's
    weight elements, "classifier_density": kept fraction of classifier.fc's weight}."""
    kept = total = 0
    layers = {}
    for name in encoder_linear_names(model):
        k, n = _kept_elements(model.get_submodule(name))
        layers[name] = k / n
        kept += k
        total += n
    ck, cn = _kept_elements(model.get_submodule("classifier.fc"))
    return {"layers": layers, "linear_density": kept / total, "classifier_density": ck / cn}


def pruned_checkpoint(model: nn.Module, plan: PrunePlan, source_checkpoint: Optional[dict] = None,
                      metrics: Optional[dict] = None) -> dict:
    """The pruned checkpoint dict (no dense weights of pruned layers). ``source_checkpoint``
    (the dense training checkpoint dict) contributes its dataset and other metadata fields."""
    modules = {}
    for name in plan.block_masks:
        m = model.get_submodule(name)
        if isinstance(m, MaskedLinear):
            modules[name] = "masked"
        elif _is_andc(m):
            modules[name] = "andc"
        else:
            raise TypeError(f"{name} is a {type(m).__name__}; expected ANDCLinear or MaskedLinear")
    ckpt = {}
    if source_checkpoint is not None:
        for k, v in source_checkpoint.items():
            if k in ("state_dict", "model", "optimizer", "scheduler", "rng", "ema", "model_state"):
                continue
            ckpt[k] = v
    pruning = plan.to_dict()
    pruning["modules"] = modules
    pruning["format"] = PRUNED_FORMAT
    ckpt.update({
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": dict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "pruning": pruning,
        "metrics": metrics or {},
    })
    return ckpt


def save_pruned(model: nn.Module, plan: PrunePlan, path: Union[str, Path], source_checkpoint: Optional[dict] = None,
                metrics: Optional[dict] = None) -> Path:
    """Write :func:`pruned_checkpoint` to ``path`` atomically."""
    path = Path(path)
    atomic_save(pruned_checkpoint(model, plan, source_checkpoint, metrics), str(path))
    return path


def load_pruned(path: Union[str, Path], map_location="cpu"):
    """Load a pruned checkpoint written by :func:`save_pruned` -> (model, checkpoint dict)."""
    model, ckpt = load_checkpoint(str(path), map_location)
    if not is_pruned_checkpoint(ckpt):
        raise CheckpointError(f"{path} is a dense checkpoint, not a pruned one (no 'pruning' entry)")
    return model, ckpt
