"""Linear readouts on frozen node features (SCIENCE.md section 3.1).

For each node group (a sub-block's nodes, keyed ``(block, group)``) a readout
``logits_c = sum_f W[c, f] feature_f(x) + b_c`` is trained by cross-entropy on the training
split, the model frozen:

* ``pooled``: feature_n(x) = z_n(x) = mean_t h_{t,n}(x), W (K, N);
* ``token``:  feature_(t, n)(x) = h_{t,n}(x), flattened t * N + n, W (K, T * N).

Features are raw (no standardisation: the node matrices are built from W applied to the raw
activations). Readouts start from zero (the problem is convex, so the seed only orders the
mini-batches). Optimisers: ``adam`` (mini-batches, ``epochs`` passes) or ``lbfgs`` (full batch
on cached features, ``epochs`` outer steps of up to 20 iterations each, strong-Wolfe line
search). Every group has its own parameters; with Adam one summed loss trains all groups at
once (the groups' gradients are independent).

Cached training (``train_readouts``) holds the features in memory; streamed training
(``train_readouts_streaming``) re-runs the frozen model each epoch (for token features too big
to cache).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ReadoutConfig", "make_readouts", "train_readouts", "train_readouts_streaming",
           "readout_accuracy"]


class ReadoutConfig:
    """Options of the readout training: ``epochs``, ``optimizer`` (``adam`` | ``lbfgs``),
    ``lr`` (Adam; LBFGS uses its own step 1), ``batch_size``, ``weight_decay``, ``seed``."""

    def __init__(self, epochs: int = 10, optimizer: str = "adam", lr: float = 1e-2,
                 batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0):
        if optimizer not in ("adam", "lbfgs"):
            raise ValueError(f"readout optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
        if epochs < 0:
            raise ValueError(f"readout epochs must be >= 0, got {epochs}")
        self.epochs, self.optimizer, self.lr = int(epochs), optimizer, float(lr)
        self.batch_size, self.weight_decay, self.seed = int(batch_size), float(weight_decay), int(seed)

    def as_dict(self) -> dict:
        return dict(epochs=self.epochs, optimizer=self.optimizer, lr=self.lr,
                    batch_size=self.batch_size, weight_decay=self.weight_decay, seed=self.seed)


def make_readouts(feature_dims: dict, num_classes: int, device=None) -> dict:
    """One zero-initialised nn.Linear(F, K) per key."""
    readouts = {}
    for key, dim in feature_dims.items():
        lin = nn.Linear(int(dim), num_classes, device=device)
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
        readouts[key] = lin
    return readouts


def train_readouts(features: dict, labels: torch.Tensor, num_classes: int,
                   config: Optional[ReadoutConfig] = None, device=None) -> dict:
    """Train one readout per key of ``features`` ({key: (n, F) tensor}) on ``labels`` (n,)."""
    config = config or ReadoutConfig()
    device = torch.device(device) if device is not None else torch.device("cpu")
    readouts = make_readouts({k: f.shape[1] for k, f in features.items()}, num_classes, device)
    labels = labels.to(torch.int64)
    n = labels.numel()
    if n == 0 or config.epochs == 0:
        return readouts
    if config.optimizer == "lbfgs":
        y = labels.to(device)
        for key, lin in readouts.items():
            x = features[key].to(device)
            opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=20,
                                    line_search_fn="strong_wolfe")

            def closure(lin=lin, x=x):
                opt.zero_grad()
                loss = F.cross_entropy(lin(x), y)
                if config.weight_decay:
                    loss = loss + 0.5 * config.weight_decay * lin.weight.pow(2).sum()
                loss.backward()
                return loss

            for _ in range(config.epochs):
                opt.step(closure)
        return readouts
    gen = torch.Generator().manual_seed(config.seed)
    params = [p for lin in readouts.values() for p in lin.parameters()]
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_size):
            idx = order[start:start + config.batch_size]
            y = labels[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = sum(F.cross_entropy(lin(features[key][idx].to(device)), y)
                       for key, lin in readouts.items())
            loss.backward()
            opt.step()
    return readouts


def train_readouts_streaming(batches: Callable[[], Iterable], feature_dims: dict,
                             num_classes: int, config: Optional[ReadoutConfig] = None,
                             device=None) -> dict:
    """Adam on features produced on the fly: ``batches()`` yields ({key: (B, F)}, labels (B,))
    once per call (one epoch: e.g. a frozen-model pass over a shuffled loader)."""
    config = config or ReadoutConfig()
    if config.optimizer != "adam":
        raise ValueError("streamed readouts (features too large to cache) train with Adam only; "
                         "use optimizer='adam' or allow a larger feature cache")
    device = torch.device(device) if device is not None else torch.device("cpu")
    readouts = make_readouts(feature_dims, num_classes, device)
    params = [p for lin in readouts.values() for p in lin.parameters()]
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    torch.manual_seed(config.seed)
    for _ in range(config.epochs):
        for feats, labels in batches():
            y = labels.to(device, torch.int64)
            opt.zero_grad(set_to_none=True)
            loss = sum(F.cross_entropy(lin(feats[key].to(device).float()), y)
                       for key, lin in readouts.items())
            loss.backward()
            opt.step()
    return readouts


@torch.no_grad()
def readout_accuracy(readouts: dict, features: dict, labels: torch.Tensor,
                     batch_size: int = 4096) -> dict:
    """{key: accuracy} of each readout on cached features."""
    out = {}
    labels = labels.to(torch.int64)
    n = labels.numel()
    for key, lin in readouts.items():
        dev = lin.weight.device
        correct = 0
        for start in range(0, n, batch_size):
            x = features[key][start:start + batch_size].to(dev)
            correct += int((lin(x).argmax(1).cpu() == labels[start:start + batch_size]).sum())
        out[key] = correct / max(n, 1)
    return out
