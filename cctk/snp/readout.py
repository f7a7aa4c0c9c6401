"""Linear readouts on frozen node features (SCIENCE.md section 3.1).

For each node group (a sub-block's nodes, keyed ``(block, group)``) a readout
``logits_c = sum_f W[c, f] feature_f(x) + b_c`` is trained by cross-entropy on the training
split, the model frozen:

* ``pooled``: feature_n(x) = z_n(x) = mean_t h_{t,n}(x), W (K, N);
* ``token``:  feature_(t, n)(x) = h_{t,n}(x), flattened t * N + n, W (K, T * N).

Features are raw (no standardisation: the node matrices are built from W applied to the raw
activations). Readouts start from zero (the problem is convex, so the seed only orders the
mini-batches). Optimisers: ``adam`` (mini-batches, ``epochs`` passes), ``lbfgs`` (full batch
on cached features, ``epochs`` outer steps of up to 20 iterations each, strong-Wolfe line
search) or ``sgd``, the group's own readout (SCIENCE.md section 7, AFCC): *no bias*, SGD lr 0.01,
momentum 0.975, Nesterov, weight decay 1e-3, lr x0.975 per epoch, mini-batches. Every group has its own parameters; with Adam one summed loss trains all groups at
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

__all__ = ["ReadoutConfig", "SeqPoolReadout", "make_readouts", "make_seqpool_readouts", "train_readouts",
           "train_readouts_streaming", "readout_accuracy"]


class ReadoutConfig:
    """Options of the readout training: ``epochs``, ``optimizer`` (``adam`` | ``lbfgs`` |
    ``sgd``), ``lr`` (Adam, SGD; LBFGS uses its own step 1), ``batch_size``, ``weight_decay``
    (None: 0 for adam/lbfgs, the group's 1e-3 for sgd), ``seed``. ``bias`` is False for sgd
    (the group's readout has none) and True otherwise."""

    OPTIMIZERS = ("adam", "lbfgs", "sgd")
    SGD_MOMENTUM, SGD_LR_DECAY = 0.975, 0.975

    def __init__(self, epochs: int = 10, optimizer: str = "adam", lr: float = 1e-2,
                 batch_size: int = 256, weight_decay: Optional[float] = None, seed: int = 0):
        if optimizer not in self.OPTIMIZERS:
            raise ValueError(f"readout optimizer must be one of {', '.join(self.OPTIMIZERS)}, got {optimizer!r}")
        if epochs < 0:
            raise ValueError(f"readout epochs must be >= 0, got {epochs}")
        if weight_decay is None:
            weight_decay = 1e-3 if optimizer == "sgd" else 0.0
        self.epochs, self.optimizer, self.lr = int(epochs), optimizer, float(lr)
        self.batch_size, self.weight_decay, self.seed = int(batch_size), float(weight_decay), int(seed)
        self.bias = optimizer != "sgd"

    def make_optimizer(self, params):
        """The mini-batch optimiser and its per-epoch lr schedule (None: constant lr)."""
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.SGD_MOMENTUM, nesterov=True,
                                  weight_decay=self.weight_decay)
            return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=self.SGD_LR_DECAY)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay), None

    def as_dict(self) -> dict:
        d = dict(epochs=self.epochs, optimizer=self.optimizer, lr=self.lr,
                 batch_size=self.batch_size, weight_decay=self.weight_decay, seed=self.seed,
                 bias=self.bias)
        if self.optimizer == "sgd":
            d.update(momentum=self.SGD_MOMENTUM, nesterov=True, lr_decay_per_epoch=self.SGD_LR_DECAY)
        return d


def make_readouts(feature_dims: dict, num_classes: int, device=None, bias: bool = True) -> dict:
    """One zero-initialised nn.Linear(F, K) per key (``bias=False``: the group's readout)."""
    readouts = {}
    for key, dim in feature_dims.items():
        lin = nn.Linear(int(dim), num_classes, device=device, bias=bias)
        nn.init.zeros_(lin.weight)
        if bias:
            nn.init.zeros_(lin.bias)
        readouts[key] = lin
    return readouts


class SeqPoolReadout(nn.Module):
    """Sequence-pooling readout (the group's transformer follow-up, as CCT's own head): on a
    group's token features h (B, T, N), w_t = softmax_t(h_t . a + a_0), z = sum_t w_t h_t,
    logits = W z (+ b). Takes the flattened (B, T * N) token features. Zero-initialised: it
    starts as the token mean (the ``pooled`` readout). ``pool`` gives z; the node fields are
    f_{n,c}(x) = W[c, n] z_n(x), analysed like ``pooled``'s (means of z per label)."""

    def __init__(self, tokens: int, nodes: int, num_classes: int, bias: bool = True, device=None):
        super().__init__()
        self.tokens, self.nodes = int(tokens), int(nodes)
        self.attention = nn.Linear(nodes, 1, device=device)
        self.fc = nn.Linear(nodes, num_classes, bias=bias, device=device)
        for p in self.parameters():
            nn.init.zeros_(p)

    @property
    def weight(self) -> torch.Tensor:
        return self.fc.weight

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(x.shape[0], self.tokens, self.nodes)
        w = torch.softmax(self.attention(h).squeeze(-1), dim=1)
        return torch.einsum("bt,btn->bn", w, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))


def make_seqpool_readouts(node_counts: dict, tokens: int, num_classes: int, device=None, bias: bool = True) -> dict:
    """One zero-initialised :class:`SeqPoolReadout` per key ({key: nodes N})."""
    return {k: SeqPoolReadout(tokens, n, num_classes, bias=bias, device=device) for k, n in node_counts.items()}


def train_readouts(features: dict, labels: torch.Tensor, num_classes: int,
                   config: Optional[ReadoutConfig] = None, device=None,
                   readouts: Optional[dict] = None) -> dict:
    """Train one readout per key of ``features`` ({key: (n, F) tensor}) on ``labels`` (n,):
    linear readouts (:func:`make_readouts`), or the given ``readouts`` modules (e.g.
    :func:`make_seqpool_readouts`)."""
    config = config or ReadoutConfig()
    device = torch.device(device) if device is not None else torch.device("cpu")
    if readouts is None:
        readouts = make_readouts({k: f.shape[1] for k, f in features.items()}, num_classes, device, config.bias)
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
                    loss = loss + 0.5 * config.weight_decay * sum(p.pow(2).sum() for p in lin.parameters()
                                                                  if p.dim() == 2)
                loss.backward()
                return loss

            for _ in range(config.epochs):
                opt.step(closure)
        return readouts
    gen = torch.Generator().manual_seed(config.seed)
    params = [p for lin in readouts.values() for p in lin.parameters()]
    opt, schedule = config.make_optimizer(params)
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
        if schedule is not None:
            schedule.step()
    return readouts


def train_readouts_streaming(batches: Callable[[], Iterable], feature_dims: dict,
                             num_classes: int, config: Optional[ReadoutConfig] = None,
                             device=None) -> dict:
    """Adam or SGD on features produced on the fly: ``batches()`` yields ({key: (B, F)},
    labels (B,)) once per call (one epoch: e.g. a frozen-model pass over a shuffled loader)."""
    config = config or ReadoutConfig()
    if config.optimizer == "lbfgs":
        raise ValueError("streamed readouts (features too large to cache) train with Adam or SGD; "
                         "use optimizer='adam' or 'sgd', or allow a larger feature cache")
    device = torch.device(device) if device is not None else torch.device("cpu")
    readouts = make_readouts(feature_dims, num_classes, device, config.bias)
    params = [p for lin in readouts.values() for p in lin.parameters()]
    opt, schedule = config.make_optimizer(params)
    torch.manual_seed(config.seed)
    for _ in range(config.epochs):
        for feats, labels in batches():
            y = labels.to(device, torch.int64)
            opt.zero_grad(set_to_none=True)
            loss = sum(F.cross_entropy(lin(feats[key].to(device).float()), y)
                       for key, lin in readouts.items())
            loss.backward()
            opt.step()
        if schedule is not None:
            schedule.step()
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
