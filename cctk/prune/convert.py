"""The pruned model as ANDCLinear layers; densities; pruned checkpoints (save / load).

A pruned checkpoint is a cctk checkpoint (format ``cctk-checkpoint``, loadable with
``torch.load(weights_only=True)``) with a ``pruning`` entry. It holds no dense weights of pruned layers: the state dict of the model with
its ANDCLinear (kept blocks only) and MaskedLinear (classifier) modules, the block masks, the
block size and the (already permuted) model config. Loading rebuilds the dense architecture
with ``cctk.models.create_model(**config)``, swaps in empty ANDCLinear / MaskedLinear modules of
the recorded masks, then ``load_state_dict(strict=True)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from cctk.prune.andc import PrunePlan, _set_submodule, encoder_linear_names
from cctk.prune.masks import expand_block_mask
from cctk.prune.modules import MaskedLinear
from cctk.train.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save

__all__ = [
    "PRUNED_FORMAT",
    "convert_to_andc",
    "to_masked_dense",
    "layer_densities",
    "density_summary",
    "save_pruned",
    "load_pruned",
    "is_pruned_checkpoint",
    "rebuild_model",
]

PRUNED_FORMAT = "cctk-pruned-v1"


def _andc_cls():
    from cctk.nn import ANDCLinear

    return ANDCLinear


def _is_andc(module: nn.Module) -> bool:
    try:
        ANDCLinear = _andc_cls()
    except ImportError:  # no ANDCLinear in this build: nothing can be one
        return False
    return isinstance(module, ANDCLinear)


def _block_mask_of(module: nn.Module) -> Optional[torch.Tensor]:
    bm = getattr(module, "block_mask", None)
    return bm.detach().cpu().bool() if isinstance(bm, torch.Tensor) else None


@torch.no_grad()
def convert_to_andc(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Replace (in place) every block-masked MaskedLinear of the encoder by
    ``cctk.nn.ANDCLinear.from_dense(W * mask, block_mask, block_size)``: same outputs, only the
    kept blocks stored. The classifier (element mask) stays a MaskedLinear."""
    ANDCLinear = _andc_cls()
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


def rebuild_model(config: dict) -> nn.Module:
    """A fresh dense model from ``model.config`` (``cctk.models.CCT.from_config``)."""
    from cctk.models import CCT

    return CCT.from_config(dict(config))


def save_pruned(model: nn.Module, plan: PrunePlan, path: Union[str, Path], source_checkpoint: Optional[dict] = None,
                metrics: Optional[dict] = None) -> Path:
    """Write a pruned checkpoint (no dense weights of pruned layers). ``source_checkpoint`` (the
    dense training checkpoint dict) contributes its dataset and other metadata fields."""
    path = Path(path)
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
    config = dict(model.config)
    pruning = plan.to_dict()
    pruning["modules"] = modules
    pruning["format"] = PRUNED_FORMAT
    ckpt.update({
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "pruning": pruning,
        "metrics": metrics or {},
    })
    atomic_save(ckpt, str(path))
    return path


def is_pruned_checkpoint(ckpt: dict) -> bool:
    return isinstance(ckpt, dict) and isinstance(ckpt.get("pruning"), dict)


def build_pruned_model(ckpt: dict) -> nn.Module:
    """The model of a pruned checkpoint dict, weights loaded (strict)."""
    if not is_pruned_checkpoint(ckpt):
        raise ValueError("not a pruned cctk checkpoint (no 'pruning' entry); load it with cctk.train.load_checkpoint")
    pruning = ckpt["pruning"]
    model = rebuild_model(ckpt["model_config"])
    B = int(pruning["block_size"])
    modules = pruning.get("modules", {})
    for name, bm in pruning["block_masks"].items():
        lin = model.get_submodule(name)
        kind = modules.get(name, "andc")
        if kind == "andc":
            ANDCLinear = _andc_cls()
            new = ANDCLinear(lin.in_features, lin.out_features, B, bm.bool(), bias=lin.bias is not None)
        else:
            new = MaskedLinear(lin.in_features, lin.out_features, expand_block_mask(bm.bool(), B, lin.weight.shape),
                               bias=lin.bias is not None, block_mask=bm.bool(), block_size=B)
        _set_submodule(model, name, new)
    cm = pruning.get("classifier_mask")
    if cm is not None:
        fc = model.get_submodule("classifier.fc")
        _set_submodule(model, "classifier.fc", MaskedLinear(fc.in_features, fc.out_features, cm.bool(),
                                                            bias=fc.bias is not None))
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    # buffers that a rebuilt model recomputes (e.g. a non-persistent sine embedding) are fine to
    # be absent; anything else is an error
    if unexpected or missing:
        raise RuntimeError(f"pruned checkpoint does not match the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return model


def load_pruned(path: Union[str, Path], map_location="cpu"):
    """Load a pruned checkpoint written by :func:`save_pruned` -> (model, checkpoint dict)."""
    from cctk.train import load_checkpoint

    model, ckpt = load_checkpoint(str(path), map_location)
    if not is_pruned_checkpoint(ckpt):
        raise ValueError(f"{path} is a dense checkpoint, not a pruned one (no 'pruning' entry)")
    return model, ckpt
