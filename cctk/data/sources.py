"""Loaders for each dataset: they find and read the files and return a Dataset.

Called through :func:`cctk.data.get_dataset`, which validates the name/split and passes the
dataset's :class:`~cctk.data.registry.DatasetInfo`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from cctk.data.augment import AugmentConfig, TensorAugment
from cctk.data.formats import CorruptDataError, DataNotFoundError, read_idx
from cctk.data.tensor_dataset import TensorImageDataset

#: Where Debian/Ubuntu's ``dataset-fashion-mnist`` package installs the four IDX files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

FIX_HINT = ("pass --data-dir DIR (Python: data_dir=DIR) holding the files in the layout shown, or "
            "--download (download=True) on a machine that is online")


def default_data_dir() -> Path:
    """``$CCTK_DATA_DIR`` if set, else ``~/.cache/cctk/data`` (used when no data_dir is given)."""
    env = os.environ.get("CCTK_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cctk" / "data"


def _import_torchvision(what: str):
    try:
        import torchvision  # noqa: F401
        import torchvision.datasets  # noqa: F401
        return torchvision
    except Exception as exc:
        raise ImportError(f"{what} needs torchvision: pip install torchvision "
                          f"(or pip install 'cctk[vision]')") from exc


# --------------------------------------------------------------------------------------------
# digits (scikit-learn)


def load_digits_split(split: str, test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16), split stratified by class
    with ``train_test_split(test_size=test_fraction, random_state=seed, stratify=y)``.
    Returns ``(images float32 (N, 1, 8, 8) in [0, 1] = value / 16, labels int64, indices)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    y = bunch.target.astype(np.int64)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    sel = np.sort(tr if split == "train" else te)
    images = torch.from_numpy((bunch.images[sel] / 16.0).astype(np.float32)).unsqueeze(1)
    return images, torch.from_numpy(y[sel]), sel


def digits(info, split, data_dir, img_size, augment, download, test_fraction=0.2, seed=0):
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    images, labels, _ = load_digits_split(split, test_fraction, seed)
    return TensorImageDataset(images, labels, info.num_classes, info.mean, info.std, img_size,
                              augment, info.classes, info.name, split)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_file(directory: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    return None


def fashion_mnist_dirs(data_dir) -> List[Path]:
    """Directories searched, in order: with ``data_dir``: it, ``data_dir/fashion-mnist`` and
    torchvision's ``data_dir/FashionMNIST/raw``; without: the same under
    :func:`default_data_dir`, then Debian's ``/usr/share/datasets/fashion-mnist``."""
    roots = [Path(data_dir).expanduser()] if data_dir is not None else [default_data_dir()]
    dirs = []
    for r in roots:
        dirs += [r, r / "fashion-mnist", r / "FashionMNIST" / "raw"]
    if data_dir is None:
        dirs.append(Path(DEBIAN_FASHION_MNIST_DIR))
    return dirs


def find_fashion_mnist(split: str, data_dir=None) -> Tuple[Path, Path]:
    stems = FASHION_FILES[split]
    dirs = fashion_mnist_dirs(data_dir)
    for d in dirs:
        found = [_find_file(d, s) for s in stems]
        if all(found):
            return found[0], found[1]
    raise DataNotFoundError(
        f"Fashion-MNIST {split} files not found. Expected {stems[0]}[.gz] and {stems[1]}[.gz] "
        f"(IDX format, gzip or plain) in one of: {', '.join(str(d) for d in dirs)}. To fix: "
        f"{FIX_HINT}; on Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts them in "
        f"{DEBIAN_FASHION_MNIST_DIR}.")


def read_fashion_mnist(split: str, data_dir=None, num_classes: int = 10):
    """Read one split's images (uint8 ``(N, 1, H, W)``) and labels (int64 ``(N,)``)."""
    img_path, lab_path = find_fashion_mnist(split, data_dir)
    images = read_idx(img_path, ndim=3)
    labels = read_idx(lab_path, ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise CorruptDataError(f"{img_path} / {lab_path}: expected uint8 IDX data, got "
                               f"{images.dtype} / {labels.dtype}")
    if images.shape[0] != labels.shape[0]:
        raise CorruptDataError(f"{img_path} has {images.shape[0]} images but {lab_path} has "
                               f"{labels.shape[0]} labels")
    if images.shape[1] != images.shape[2]:
        raise CorruptDataError(f"{img_path}: images are {images.shape[1]}x{images.shape[2]}, "
                               f"expected square images")
    if labels.size and int(labels.max()) >= num_classes:
        raise CorruptDataError(f"{lab_path}: label {int(labels.max())} outside [0, {num_classes})")
    return (torch.from_numpy(images).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)))


def fashion_mnist(info, split, data_dir, img_size, augment, download):
    try:
        images, labels = read_fashion_mnist(split, data_dir, info.num_classes)
    except DataNotFoundError:
        if not download:
            raise
        tv = _import_torchvision("downloading Fashion-MNIST")
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        try:
            tv.datasets.FashionMNIST(str(root), train=(split == "train"), download=True)
        except Exception as exc:
            raise DataNotFoundError(f"downloading Fashion-MNIST into {root} failed ({exc}); "
                                    f"offline? {FIX_HINT}") from exc
        images, labels = read_fashion_mnist(split, root, info.num_classes)
    return TensorImageDataset(images, labels, info.num_classes, info.mean, info.std, img_size,
                              augment, info.classes, info.name, split)


def _open_torchvision(build, name: str, root: Path, base: Path, download: bool, md5_msg: str):
    """Call ``build()`` (a torchvision dataset constructor) and turn its failures into cctk's
    errors: the integrity RuntimeError -> CorruptDataError(md5_msg), a failed download ->
    DataNotFoundError, any other read error (pickle, .mat) -> CorruptDataError."""
    try:
        return build()
    except RuntimeError as exc:
        if "corrupted" in str(exc):
            raise CorruptDataError(f"{name}: {md5_msg}") from exc
        raise
    except OSError as exc:
        if download:
            raise DataNotFoundError(f"{name}: download into {root} failed ({exc}); offline? "
                                    f"{FIX_HINT}") from exc
        raise
    except Exception as exc:  # pickle / numpy / scipy errors on files that passed the MD5 check
        raise CorruptDataError(f"{name}: could not read {base} ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision, python pickle batches)

CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py",
                ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta"], "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"], "cifar-100-python.tar.gz"),
}


def _vision_root(data_dir, folder: str) -> Path:
    """The torchvision ``root`` for ``data_dir``: data_dir itself, or its parent when data_dir
    already is the dataset's own folder."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if root.name == folder:
        return root.parent
    return root


def cifar(info, split, data_dir, img_size, augment, download):
    tv = _import_torchvision(info.name)
    folder, files, archive = CIFAR_LAYOUT[info.name]
    root = _vision_root(data_dir, folder)
    base = root / folder
    missing = [f for f in files if not (base / f).is_file()]
    if missing and not download:
        where = "no data_dir given, looked in the default " if data_dir is None else ""
        raise DataNotFoundError(
            f"{info.name}: {where}{base} lacks {', '.join(missing)}. Expected torchvision's layout "
            f"DIR/{folder}/{{{', '.join(files)}}} (the python version, as unpacked from "
            f"{archive}). "
            f"To fix: {FIX_HINT}.")
    cls = tv.datasets.CIFAR10 if info.name == "cifar10" else tv.datasets.CIFAR100
    ds = _open_torchvision(
        lambda: cls(str(root), train=(split == "train"), download=download), info.name, root,
        base, download,
        f"the files in {base} failed torchvision's MD5 integrity check (corrupt, incomplete or "
        f"not the official release). Delete {base} and unpack the official archive again, or "
        f"pass --download where online.")
    data = np.asarray(ds.data)
    if data.ndim != 4 or data.shape[-1] != 3:
        raise CorruptDataError(f"{info.name}: unexpected image array shape {data.shape}")
    images = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    classes = list(getattr(ds, "classes", info.classes or []))
    if len(classes) != info.num_classes:
        raise CorruptDataError(f"{info.name}: meta file lists {len(classes)} classes, expected "
                               f"{info.num_classes}")
    return TensorImageDataset(images, labels, info.num_classes, info.mean, info.std, img_size,
                              augment, classes, info.name, split)


# --------------------------------------------------------------------------------------------
# Flowers-102 (torchvision, jpg + .mat files)

FLOWERS_FOLDER = "flowers-102"
FLOWERS_FILES = ["jpg/", "imagelabels.mat", "setid.mat"]


class Flowers102Dataset(Dataset):
    """torchvision's Flowers102 with the cctk transform: PIL geometric ops (torchvision), then
    the tensor part of the pipeline (RandAugment, normalise, erasing) of :class:`TensorAugment`.

    Train-time geometry: ``crop="resized"``: RandomResizedCrop(img_size, scale, ratio, bicubic);
    ``crop="pad"``: Resize(img_size) + RandomCrop(img_size, padding); then the flip.
    Evaluation (reference ``crop_pct=1.0``): Resize(img_size, bicubic) + CenterCrop(img_size).
    """

    def __init__(self, tv_dataset, info, split, img_size, augment: AugmentConfig):
        from torchvision import transforms as T  # v1 API: stable across torchvision versions
        self.base = tv_dataset
        self.num_classes, self.in_channels = info.num_classes, info.in_channels
        self.img_size = int(img_size)
        self.classes = list(getattr(tv_dataset, "classes", info.classes or []))
        self.name, self.split, self.augment = info.name, split, augment
        bicubic = T.InterpolationMode.BICUBIC
        geo = []
        if augment.crop == "resized":
            geo.append(T.RandomResizedCrop(self.img_size, scale=augment.scale, ratio=augment.ratio,
                                           interpolation=bicubic))
        else:
            geo += [T.Resize(self.img_size, interpolation=bicubic), T.CenterCrop(self.img_size)]
            if augment.crop == "pad":
                pad = augment.padding if augment.padding is not None else self.img_size // 8
                geo.append(T.RandomCrop(self.img_size, padding=pad))
        if augment.hflip > 0:
            geo.append(T.RandomHorizontalFlip(augment.hflip))
        geo.append(T.PILToTensor())
        self.geometry = T.Compose(geo)
        rest = AugmentConfig(randaugment=augment.randaugment, random_erasing=augment.random_erasing)
        self.transform = TensorAugment(rest, info.mean, info.std, self.img_size)
        labels = getattr(tv_dataset, "_labels", None)
        if labels is None:  # torchvision changed its private attribute: read the labels the slow way
            labels = [tv_dataset[i][1] for i in range(len(tv_dataset))]
        self.targets = torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        img, label = self.base[index]
        return self.transform(self.geometry(img)), int(label)

    def __repr__(self):
        return (f"Flowers102Dataset(split={self.split!r}, n={len(self)}, img_size={self.img_size}, "
                f"augment={self.augment.active})")


def flowers102(info, split, data_dir, img_size, augment, download):
    tv = _import_torchvision("flowers102")
    root = _vision_root(data_dir, FLOWERS_FOLDER)
    base = root / FLOWERS_FOLDER
    missing = [f for f in FLOWERS_FILES
               if not ((base / f).is_dir() if f.endswith("/") else (base / f).is_file())]
    if missing and not download:
        raise DataNotFoundError(
            f"flowers102: {base} lacks {', '.join(missing)}. Expected torchvision's layout "
            f"DIR/{FLOWERS_FOLDER}/{{jpg/image_00001.jpg ..., imagelabels.mat, setid.mat}} "
            f"(102flowers.tgz unpacked, plus the two .mat files). To fix: {FIX_HINT}.")
    try:
        import scipy.io  # noqa: F401
    except Exception as exc:
        raise ImportError("flowers102 needs scipy to read its .mat files: pip install scipy") from exc
    ds = _open_torchvision(
        lambda: tv.datasets.Flowers102(str(root), split=split, download=download), info.name,
        root, base, download,
        f"imagelabels.mat / setid.mat in {base} failed torchvision's MD5 integrity check (corrupt "
        f"or not the official files). Fetch them again, or pass --download where online.")
    return Flowers102Dataset(ds, info, split, img_size, augment)


# --------------------------------------------------------------------------------------------
# synthetic

SYNTHETIC_SPLIT_OFFSET = {"train": 1, "test": 2, "val": 3}


def make_synthetic(num_samples: int, num_classes: int = 10, img_size: int = 32,
                   in_channels: int = 3, seed: int = 0, split: str = "train",
                   noise: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Procedural labelled images, deterministic in ``(seed, split)``.

    Class ``k`` has a prototype drawn from ``seed`` alone (shared by all splits): orientation
    ``a_k = pi k / K + U(-0.1, 0.1)``, frequency ``f_k ~ U(1.5, 4)`` cycles per image, channel
    gains ``g_kc ~ U(0.3, 1)``, channel offsets ``o_kc ~ U(-0.1, 0.1)``, blob centre
    ``c_k ~ U(0.2, 0.8)^2``. Sample ``i`` of class ``k`` (coordinates ``u, v`` in [0, 1)):

        x_c(u, v) = clip(0.5 + o_kc + 0.2 g_kc cos(2 pi f_k (u cos a + v sin a) + phi)
                         + 0.25 exp(-|(u, v) - c_k - d|^2 / (2 * 0.15^2)) + noise * N(0, 1), 0, 1)

    with per-sample phase ``phi ~ U(0, 2 pi)``, orientation jitter ``a = a_k + N(0, 0.05)`` and
    blob shift ``d ~ N(0, 0.05^2 I)``. Labels are balanced (``i mod K``, shuffled). Returns
    ``(uint8 images (N, C, S, S), int64 labels (N,))``.
    """
    if num_samples < 1 or num_classes < 1 or img_size < 1 or in_channels < 1:
        raise ValueError(f"synthetic: num_samples, num_classes, img_size and in_channels must be "
                         f">= 1 (got {num_samples}, {num_classes}, {img_size}, {in_channels})")
    if noise < 0:
        raise ValueError(f"synthetic: noise must be >= 0, got {noise}")
    K, C, S = int(num_classes), int(in_channels), int(img_size)
    proto = torch.Generator().manual_seed(int(seed) * 1000003)
    ang = math.pi * torch.arange(K, dtype=torch.float32) / K + (torch.rand(K, generator=proto, dtype=torch.float32) - 0.5) * 0.2
    freq = 1.5 + 2.5 * torch.rand(K, generator=proto, dtype=torch.float32)
    gain = 0.3 + 0.7 * torch.rand(K, C, generator=proto, dtype=torch.float32)
    offset = (torch.rand(K, C, generator=proto, dtype=torch.float32) - 0.5) * 0.2
    centre = 0.2 + 0.6 * torch.rand(K, 2, generator=proto, dtype=torch.float32)

    g = torch.Generator().manual_seed(int(seed) * 1000003 + SYNTHETIC_SPLIT_OFFSET.get(split, 7))
    labels = (torch.arange(num_samples) % K)[torch.randperm(num_samples, generator=g)]
    coords = (torch.arange(S, dtype=torch.float32) + 0.5) / S
    v, u = torch.meshgrid(coords, coords, indexing="ij")  # v: row, u: column
    images = torch.empty(num_samples, C, S, S, dtype=torch.uint8)
    chunk = max(1, (1 << 22) // (C * S * S))
    for start in range(0, num_samples, chunk):
        y = labels[start:start + chunk]
        n = y.shape[0]
        phase = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float32)
        a = ang[y] + 0.05 * torch.randn(n, generator=g, dtype=torch.float32)
        shift = 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float32)
        proj = u[None] * torch.cos(a)[:, None, None] + v[None] * torch.sin(a)[:, None, None]
        wave = torch.cos(2 * math.pi * freq[y][:, None, None] * proj + phase[:, None, None])
        cu = (centre[y, 0] + shift[:, 0])[:, None, None]
        cv = (centre[y, 1] + shift[:, 1])[:, None, None]
        blob = torch.exp(-((u[None] - cu) ** 2 + (v[None] - cv) ** 2) / (2 * 0.15 ** 2))
        x = (0.5 + offset[y][:, :, None, None] + 0.2 * gain[y][:, :, None, None] * wave[:, None]
             + 0.25 * blob[:, None]
             + noise * torch.randn(n, C, S, S, generator=g, dtype=torch.float32))
        images[start:start + n] = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels.to(torch.int64)


def synthetic(info, split, data_dir, img_size, augment, download, num_samples=None,
              num_classes=None, in_channels=None, seed=0, noise=0.1):
    K = int(num_classes) if num_classes is not None else info.num_classes
    C = int(in_channels) if in_channels is not None else info.in_channels
    S = int(img_size) if img_size is not None else info.img_size
    n = int(num_samples) if num_samples is not None else (2000 if split == "train" else 500)
    images, labels = make_synthetic(n, K, S, C, seed, split, noise)
    mean, std = (info.mean[0],) * C, (info.std[0],) * C
    return TensorImageDataset(images, labels, K, mean, std, S, augment,
                              [f"class_{k}" for k in range(K)], info.name, split)
