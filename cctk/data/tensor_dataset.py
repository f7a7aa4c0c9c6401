"""A map-style dataset held in memory as one image tensor, with a batched fetch path."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from cctk.data.augment import AugmentConfig, TensorAugment

__all__ = ["TensorImageDataset"]


class TensorImageDataset(Dataset):
    """Images ``(N, C, H, W)`` (uint8 in [0, 255] or float32 in [0, 1]) and int64 labels in
    memory; items are ``(normalised float32 image (C, img_size, img_size), int label)``.

    ``__getitems__`` (used by DataLoader's batched fetch) transforms a whole batch at once.
    Attributes: ``num_classes``, ``in_channels``, ``img_size`` (output size), ``native_size``,
    ``targets`` (int64 tensor), ``classes``, ``images`` (the stored tensor), ``transform``.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, num_classes: int,
                 mean: Sequence[float], std: Sequence[float], img_size: Optional[int] = None,
                 augment: Optional[AugmentConfig] = None, classes: Optional[List[str]] = None,
                 name: str = "", split: str = ""):
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if images.dtype not in (torch.uint8, torch.float32):
            raise TypeError(f"images must be uint8 or float32, got {images.dtype}")
        targets = torch.as_tensor(targets, dtype=torch.int64)
        if targets.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but targets of shape {tuple(targets.shape)}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), found "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        self.images = images.contiguous()
        self.targets = targets
        self.num_classes = int(num_classes)
        self.in_channels = int(images.shape[1])
        self.native_size = int(images.shape[-1])
        self.img_size = int(img_size) if img_size is not None else self.native_size
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment if augment is not None else AugmentConfig()
        self.transform = TensorAugment(self.augment, mean, std, self.img_size)
        self.name, self.split = name, split

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        index = int(index)
        if index < -len(self) or index >= len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self.transform(self.images[index]), int(self.targets[index])

    def __getitems__(self, indices) -> list:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        x = self.transform(self.images[idx])
        return list(zip(x.unbind(0), self.targets[idx].tolist()))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.num_classes}, channels={self.in_channels}, "
                f"img_size={self.img_size}, augment={self.augment.active})")
