"""Named CCT configurations: every model the reference registers, plus small cctk configs.

Naming (reference convention): ``cct_{L}_{k}x{C}_{img}[_sine][_suffix]`` = L encoder layers,
conv kernel k, C conv layers, input img x img. The family sets (d, heads, mlp_ratio):

    cct_2, cct_4: (128, 2, 1)    cct_6, cct_7: (256, 4, 2)    cct_14: (384, 6, 3)

Tokenizer defaults (reference ``_cct``): stride = max(1, k//2 - 1), padding = max(1, k//2),
max-pool 3/2/1. Reference suffixes: ``_c100`` (100 classes), ``_fl`` (Flowers-102).
cctk additions for tiny grey images: ``cct_2_3x1_8`` (8x8 digits, 16 tokens) and
``cct_2_3x2_28`` / ``cct_4_3x2_28`` (28x28 Fashion-MNIST, 49 tokens), each 1 input channel.
"""
from __future__ import annotations

import inspect
from typing import Optional

from cctk.models.cct import CCT, POSITIONAL_EMBEDDINGS

FAMILIES = {
    2: dict(num_layers=2, num_heads=2, mlp_ratio=1, embedding_dim=128),
    4: dict(num_layers=4, num_heads=2, mlp_ratio=1, embedding_dim=128),
    6: dict(num_layers=6, num_heads=4, mlp_ratio=2, embedding_dim=256),
    7: dict(num_layers=7, num_heads=4, mlp_ratio=2, embedding_dim=256),
    14: dict(num_layers=14, num_heads=6, mlp_ratio=3, embedding_dim=384),
}

_REGISTRY: dict[str, dict] = {}


def _register(name: str, layers: int, kernel_size: int, n_conv_layers: int, img_size: int,
              num_classes: int, positional_embedding: str, in_channels: int = 3) -> None:
    cfg = dict(FAMILIES[layers])
    cfg.update(kernel_size=kernel_size, stride=max(1, kernel_size // 2 - 1),
               padding=max(1, kernel_size // 2), n_conv_layers=n_conv_layers, img_size=img_size,
               num_classes=num_classes, positional_embedding=positional_embedding,
               in_channels=in_channels)
    _REGISTRY[name] = cfg


# the reference's registered models (src/cct.py), with their default classes
for _L, _k, _c, _img, _cls in [(2, 3, 2, 32, 10), (4, 3, 2, 32, 10), (6, 3, 1, 32, 10),
                               (6, 3, 2, 32, 10), (7, 3, 1, 32, 10), (7, 3, 2, 32, 10),
                               (7, 7, 2, 224, 102)]:
    _register(f"cct_{_L}_{_k}x{_c}_{_img}", _L, _k, _c, _img, _cls, "learnable")
    _register(f"cct_{_L}_{_k}x{_c}_{_img}_sine", _L, _k, _c, _img, _cls, "sine")
_register("cct_7_3x1_32_c100", 7, 3, 1, 32, 100, "learnable")
_register("cct_7_3x1_32_sine_c100", 7, 3, 1, 32, 100, "sine")
_register("cct_14_7x2_224", 14, 7, 2, 224, 1000, "learnable")
_register("cct_14_7x2_384", 14, 7, 2, 384, 1000, "learnable")
_register("cct_14_7x2_384_fl", 14, 7, 2, 384, 102, "learnable")

# cctk configs for tiny single-channel images (digits 8x8, Fashion-MNIST 28x28)
for _name, _L, _c, _img in [("cct_2_3x1_8", 2, 1, 8), ("cct_2_3x2_28", 2, 2, 28),
                            ("cct_4_3x2_28", 4, 2, 28)]:
    _register(_name, _L, 3, _c, _img, 10, "learnable", in_channels=1)
    _register(_name + "_sine", _L, 3, _c, _img, 10, "sine", in_channels=1)

REFERENCE_MODELS = tuple(n for n in _REGISTRY if not n.endswith(("_8", "_8_sine", "_28", "_28_sine")))


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def model_config(name: str) -> dict:
    """The named configuration's hyper-parameters (a copy)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return dict(_REGISTRY[name])


def create_model(name: str, num_classes: Optional[int] = None, img_size: Optional[int] = None,
                 in_channels: Optional[int] = None, positional_embedding: Optional[str] = None,
                 **overrides) -> CCT:
    """Build the named CCT; None keeps the named config's value. ``overrides`` are any other
    :class:`CCT` arguments (dropout, attention_dropout, stochastic_depth, embedding_dim, ...)."""
    cfg = model_config(name)
    for key, val in (("num_classes", num_classes), ("img_size", img_size),
                     ("in_channels", in_channels), ("positional_embedding", positional_embedding)):
        if val is not None:
            cfg[key] = val
    if cfg["positional_embedding"] not in POSITIONAL_EMBEDDINGS:
        raise ValueError(f"positional_embedding must be one of {POSITIONAL_EMBEDDINGS}, "
                         f"got {cfg['positional_embedding']!r}")
    overrides.pop("name", None)
    unknown = set(overrides) - set(inspect.signature(CCT).parameters)
    if unknown:
        raise TypeError(f"create_model got unknown argument(s) {sorted(unknown)}")
    cfg.update(overrides)
    return CCT(name=name, **cfg)
