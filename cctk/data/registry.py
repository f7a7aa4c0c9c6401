"""The dataset registry: what each dataset is (:class:`DatasetInfo`) and :func:`get_dataset`."""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from cctk.data import sources
from cctk.data.augment import resolve_augment
from cctk.data.formats import DatasetArgumentError

__all__ = ["DatasetInfo", "DATASETS", "dataset_info", "list_datasets", "get_dataset",
           "canonical_name", "from_record", "subset_dataset"]

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck"]
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    ``mean``/``std``: per-channel statistics of the training images in [0, 1] scale, used as
    ``x <- (x - mean) / std``. ``eval_split``: the split a training run evaluates on.
    ``crop_kind``: the crop of the ``"basic"`` augmentation preset. ``hflip_ok``: whether a
    horizontal flip keeps the label (presets only flip where it does). ``classes``: class names
    (``None`` where they come from the files).
    """

    name: str
    num_classes: int
    in_channels: int
    img_size: int
    default_model: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    splits: Tuple[str, ...]
    eval_split: str
    crop_kind: str
    hflip_ok: bool
    source: str
    classes: Optional[List[str]] = None
    loader: Callable = field(default=None, repr=False, compare=False)

    def as_dict(self) -> Dict:
        return {k: getattr(self, k) for k in ("name", "num_classes", "in_channels", "img_size",
                                              "default_model", "mean", "std", "splits",
                                              "eval_split", "source", "classes")}


def _flowers_classes():
    try:
        from torchvision.datasets import Flowers102
        return list(Flowers102.classes)
    except Exception:  # torchvision absent: names come with the dataset object
        return None


DATASETS: Dict[str, DatasetInfo] = {
    # mean/std: digits values / 16 over the 1,437 training images of the seed-0 80/20 split.
    "digits": DatasetInfo(
        "digits", 10, 1, 8, "cct_2_3x1_8", (0.3054,), (0.3761,), ("train", "test"), "test",
        "pad", False, "scikit-learn load_digits (bundled, 1,797 8x8 images, 16 grey levels); "
        "stratified 80/20 train/test split, seed 0", [str(i) for i in range(10)], sources.digits),
    # mean/std over the 60,000 training images (value / 255).
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, 1, 28, "cct_2_3x2_28", (0.2860,), (0.3530,), ("train", "test"),
        "test", "pad", True, "IDX files (gzip or plain) from data_dir or Debian's "
        "dataset-fashion-mnist (/usr/share/datasets/fashion-mnist); 60,000 train / 10,000 test",
        FASHION_MNIST_CLASSES, sources.fashion_mnist),
    # reference configs/datasets/cifar10.yml and cifar100.yml
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, "cct_7_3x1_32", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        ("train", "test"), "test", "pad", True, "torchvision CIFAR10 (python pickle batches) from "
        "data_dir; 50,000 train / 10,000 test", CIFAR10_CLASSES, sources.cifar),
    "cifar100": DatasetInfo(
        "cifar100", 100, 3, 32, "cct_7_3x1_32", (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
        ("train", "test"), "test", "pad", True, "torchvision CIFAR100 (python pickle files) from "
        "data_dir; 50,000 train / 10,000 test", CIFAR100_CLASSES, sources.cifar),
    # reference configs/datasets/flowers102.yml: trains on "train", validates on "valid" (= val)
    "flowers102": DatasetInfo(
        "flowers102", 102, 3, 224, "cct_7_7x2_224", (0.4353, 0.3773, 0.2872),
        (0.2966, 0.2455, 0.2698), ("train", "val", "test"), "val", "resized", True,
        "torchvision Flowers102 (jpg/ + imagelabels.mat + setid.mat) from data_dir; "
        "1,020 train / 1,020 val / 6,149 test; the reference recipe trains on train and "
        "evaluates on val", None, sources.flowers102),
    # mean/std nominal (images are centred on 0.5 with spread ~0.25 by construction)
    "synthetic": DatasetInfo(
        "synthetic", 10, 3, 32, "cct_2_3x2_32", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
        ("train", "test"), "test", "pad", False, "procedural class-dependent gratings + blobs + "
        "noise (any size, channels, classes; seeded)", None, sources.synthetic),
}

_ALIASES = {"fmnist": "fashion-mnist", "fashion": "fashion-mnist", "flowers": "flowers102",
            "oxfordflowers102": "flowers102", "sklearndigits": "digits"}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {_key(n): n for n in DATASETS}
_BY_KEY.update({_key(a): n for a, n in _ALIASES.items()})


def list_datasets() -> List[str]:
    return list(DATASETS)


def canonical_name(name: str) -> str:
    """The registry name for ``name`` (case, ``-`` and ``_`` ignored: "CIFAR-10" -> "cifar10")."""
    if not isinstance(name, str):
        raise DatasetArgumentError(f"dataset name must be a string, got {type(name).__name__}")
    try:
        return _BY_KEY[_key(name)]
    except KeyError:
        raise DatasetArgumentError(f"unknown dataset {name!r}; known datasets: "
                                   f"{', '.join(DATASETS)}") from None


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (Flowers-102 class names filled in from torchvision
    when it is installed)."""
    info = DATASETS[canonical_name(name)]
    if info.name == "flowers102" and info.classes is None:
        classes = _flowers_classes()
        if classes is not None:
            from dataclasses import replace
            info = replace(info, classes=classes)
    return info


def get_dataset(name: str, split: str = "train", data_dir=None, img_size: Optional[int] = None,
                augment=False, download: bool = False, **kw):
    """A map-style dataset of ``(normalised float32 image (C, S, S), int label)``.

    ``name``: one of :data:`DATASETS` (``digits``, ``fashion-mnist``, ``cifar10``, ``cifar100``,
    ``flowers102``, ``synthetic``). ``split``: ``"train"``/``"test"`` (Flowers-102 also
    ``"val"``). ``data_dir``: where the files are (default ``$CCTK_DATA_DIR`` or
    ``~/.cache/cctk/data``; Fashion-MNIST also looks in Debian's install path). ``img_size``: the
    output size S (``None``: native; tensor datasets are resized bilinearly, Flowers by
    Resize+CenterCrop). ``augment``: ``False``, ``True``/``"basic"``, ``"randaugment"``,
    ``"reference"``, a dict of :class:`~cctk.data.augment.AugmentConfig` fields, or an
    AugmentConfig. ``download``: let torchvision fetch missing files (needs a network).
    ``kw``: dataset options: digits ``test_fraction``, ``seed``; synthetic ``num_samples``,
    ``num_classes``, ``in_channels``, ``seed``, ``noise``.

    The result has ``num_classes``, ``in_channels``, ``img_size``, ``targets`` and ``classes``.
    Raises :class:`~cctk.data.formats.DatasetArgumentError` (unknown name, split or option),
    :class:`~cctk.data.formats.DataNotFoundError` (files missing: says which and where) and
    :class:`~cctk.data.formats.CorruptDataError`.
    """
    info = dataset_info(name)
    if split not in info.splits:
        raise DatasetArgumentError(f"{info.name} has no split {split!r}; choose one of: "
                                   f"{', '.join(info.splits)}")
    if img_size is not None and (not isinstance(img_size, int) or isinstance(img_size, bool)
                                 or img_size < 1):
        raise DatasetArgumentError(f"img_size must be a positive int or None, got {img_size!r}")
    params = inspect.signature(info.loader).parameters
    accepted = [p for p in params if p not in ("info", "split", "data_dir", "img_size", "augment",
                                               "download")]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise DatasetArgumentError(f"{info.name} does not take option(s) {unknown}; it takes: "
                                   f"{', '.join(accepted) if accepted else 'none'}")
    try:
        aug = resolve_augment(augment, crop_kind=info.crop_kind, hflip_ok=info.hflip_ok)
    except (ValueError, TypeError) as exc:
        raise DatasetArgumentError(str(exc)) from exc
    return info.loader(info, split, data_dir, img_size, aug, download, **kw)


def subset_dataset(dataset, n: int):
    """The first ``n`` samples of ``dataset`` as a Subset that keeps ``num_classes``,
    ``in_channels``, ``img_size`` and ``targets``."""
    from torch.utils.data import Subset

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DatasetArgumentError(f"a subset needs a positive number of samples, got {n!r}")
    sub = Subset(dataset, range(min(n, len(dataset))))
    for attr in ("num_classes", "in_channels", "img_size", "classes"):
        if hasattr(dataset, attr):
            setattr(sub, attr, getattr(dataset, attr))
    if hasattr(dataset, "targets"):
        sub.targets = [int(t) for t in list(dataset.targets)[:len(sub)]]
    return sub


def from_record(record, split: str, data_dir=None, subset: Optional[int] = None, augment=False,
                download: bool = False):
    """Reopen a run's data: the ``split`` of the dataset a training run recorded (the
    ``dataset`` entry of its checkpoint: name, data_dir, img_size, eval_split and the
    ``dataset_options`` the dataset was built with, e.g. digits ``test_fraction``), so that
    train, eval, snp, prune and the experiments all see the same images in the same splits.

    ``split``: ``"train"``, ``"eval"`` (the split the run evaluated on: test, val for
    flowers102) or any split name. ``data_dir``: overrides the recorded directory (the data
    moved). ``subset``: only the first N samples. ``augment``: as :func:`get_dataset` (False
    for every analysis). Raises :class:`DatasetArgumentError` for a record that names no
    dataset, and what :func:`get_dataset` raises."""
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise DatasetArgumentError("the run's record names no dataset (a checkpoint from "
                                   "`cctk train` records it)")
    info = dataset_info(record["name"])
    if split == "eval":
        split = record.get("eval_split") or info.eval_split
    options = record.get("dataset_options") or {}
    if not isinstance(options, dict):
        raise DatasetArgumentError(f"the run's dataset_options are damaged: {options!r}")
    ds = get_dataset(info.name, split,
                     data_dir=data_dir if data_dir is not None else record.get("data_dir"),
                     img_size=record.get("img_size"), augment=augment, download=download,
                     **options)
    if subset is not None:
        ds = subset_dataset(ds, subset)
    return ds
