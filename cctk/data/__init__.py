"""Datasets, offline first: ``digits`` (default), ``fashion-mnist``, ``cifar10``, ``cifar100``,
``flowers102`` and ``synthetic``; the reference recipes' augmentations; DataLoader construction.

    >>> from cctk.data import get_dataset, build_loader, dataset_info
    >>> train = get_dataset("digits", "train", augment="basic")
    >>> loader = build_loader(train, batch_size=64, shuffle=True, seed=0)
    >>> dataset_info("cifar100").default_model
    'cct_7_3x1_32'

digits, fashion-mnist and synthetic need neither torchvision nor a network; cifar10/100 and
flowers102 read torchvision's on-disk layout from ``data_dir`` and download only when
``download=True``. Missing or corrupt data raises :class:`DataNotFoundError` /
:class:`CorruptDataError` (both :class:`DataError`) with a message that says what to do.
"""
from cctk.data.augment import (AUGMENT_PRESETS, AugmentConfig, MixupCutmix, RandAugment,
                               TensorAugment, mixup_cutmix, one_hot_smooth, parse_randaugment,
                               resolve_augment)
from cctk.data.formats import (CorruptDataError, DataError, DataNotFoundError,
                               DatasetArgumentError, read_idx)
from cctk.data.loader import EpochSampler, build_loader, epoch_sampler, set_loader_epoch
from cctk.data.registry import (DATASETS, DatasetInfo, canonical_name, dataset_info, from_record,
                                get_dataset, list_datasets, subset_dataset)
from cctk.data.sources import default_data_dir, make_synthetic
from cctk.data.tensor_dataset import TensorImageDataset

__all__ = [
    "get_dataset", "from_record", "subset_dataset", "dataset_info", "list_datasets", "canonical_name", "DATASETS", "DatasetInfo",
    "build_loader", "set_loader_epoch", "epoch_sampler", "EpochSampler",
    "AugmentConfig", "AUGMENT_PRESETS", "resolve_augment", "TensorAugment", "RandAugment",
    "parse_randaugment", "mixup_cutmix", "MixupCutmix", "one_hot_smooth",
    "DataError", "DataNotFoundError", "CorruptDataError", "DatasetArgumentError", "read_idx",
    "TensorImageDataset", "make_synthetic", "default_data_dir",
]
