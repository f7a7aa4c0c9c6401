"""The CCT model family (Hassani et al. 2021), reference-compatible, with node taps.

``create_model(name, ...)``, ``list_models()``, ``model_config(name)``; :class:`CCT`;
:class:`NodeTap` (base class of taps: per-block MHA/FF nodes, swappable attention and FF).
"""
from cctk.models.cct import (
    CCT,
    Attention,
    DropPath,
    NodeTap,
    Tokenizer,
    TransformerClassifier,
    TransformerEncoderLayer,
    attention_with_dropout,
    drop_path,
    sinusoidal_embedding,
)
from cctk.models.registry import REFERENCE_MODELS, create_model, list_models, model_config

__all__ = [
    "CCT", "Attention", "DropPath", "NodeTap", "Tokenizer", "TransformerClassifier",
    "TransformerEncoderLayer", "attention_with_dropout", "drop_path", "sinusoidal_embedding",
    "REFERENCE_MODELS", "create_model", "list_models", "model_config",
]
