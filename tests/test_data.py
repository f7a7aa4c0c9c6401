"""cctk.data: loaders on small files written here in the real on-disk formats, augmentations,
Mixup/CutMix, DataLoader construction, and the errors for missing/corrupt data.

torchvision verifies CIFAR and Flowers-102 files against the MD5 sums of the official release
(``torchvision.datasets.utils.check_integrity``, imported into ``torchvision.datasets.cifar`` and
``torchvision.datasets.flowers102``). Files written here cannot match those sums, so the tests
that read them replace that one function, in those two modules only, by an existence check (the
``no_md5`` fixture); everything else (file layout, pickle / .mat parsing, split handling) is
torchvision's real code. One test keeps the real check and asserts cctk's error for it.
"""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from cctk.data import (AugmentConfig, CorruptDataError, DataError, DataNotFoundError,
                       DatasetArgumentError, EpochSampler, MixupCutmix, RandAugment, build_loader,
                       dataset_info, get_dataset, list_datasets, mixup_cutmix, parse_randaugment,
                       read_idx, set_loader_epoch)
from cctk.data import augment as A
from cctk.data.sources import DEBIAN_FASHION_MNIST_DIR, load_digits_split


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_facts_and_default_models_exist():
    from cctk.models import list_models
    models = set(list_models())
    assert set(list_datasets()) == {"digits", "fashion-mnist", "cifar10", "cifar100",
                                    "flowers102", "synthetic"}
    expect = {"digits": (10, 1, 8), "fashion-mnist": (10, 1, 28), "cifar10": (10, 3, 32),
              "cifar100": (100, 3, 32), "flowers102": (102, 3, 224), "synthetic": (10, 3, 32)}
    for name, (k, c, s) in expect.items():
        info = dataset_info(name)
        assert (info.num_classes, info.in_channels, info.img_size) == (k, c, s)
        assert len(info.mean) == len(info.std) == c
        assert info.default_model in models, info.default_model
        assert info.eval_split in info.splits
        if info.classes is not None:
            assert len(info.classes) == k and len(set(info.classes)) == k
    assert dataset_info("cifar10").default_model == "cct_7_3x1_32"
    assert dataset_info("flowers102").default_model == "cct_7_7x2_224"
    assert dataset_info("digits").default_model == "cct_2_3x1_8"
    assert dataset_info("CIFAR-100").name == "cifar100"
    assert dataset_info("Fashion_MNIST").name == "fashion-mnist"


def test_bad_name_split_option():
    with pytest.raises(DatasetArgumentError, match="known datasets: digits, fashion-mnist"):
        get_dataset("imagenette")
    with pytest.raises(DatasetArgumentError, match="no split 'val'.*train, test"):
        get_dataset("digits", "val")
    with pytest.raises(DatasetArgumentError, match="does not take option.*num_samples"):
        get_dataset("digits", num_samples=3)
    with pytest.raises(DatasetArgumentError, match="unknown augmentation preset"):
        get_dataset("digits", augment="heavy")
    with pytest.raises(DatasetArgumentError, match="img_size"):
        get_dataset("digits", img_size=0)
    assert issubclass(DatasetArgumentError, ValueError) and issubclass(DatasetArgumentError, DataError)


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_split_shapes_and_determinism():
    tr = get_dataset("digits", "train")
    te = get_dataset("digits", "test")
    assert (len(tr), len(te)) == (1437, 360)
    assert (tr.num_classes, tr.in_channels, tr.img_size) == (10, 1, 8)
    x, y = tr[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    # deterministic, disjoint, stratified
    _, _, idx_tr = load_digits_split("train")
    _, _, idx_te = load_digits_split("test")
    _, _, idx_tr2 = load_digits_split("train")
    assert np.array_equal(idx_tr, idx_tr2)
    assert not set(idx_tr.tolist()) & set(idx_te.tolist())
    assert len(set(idx_tr.tolist()) | set(idx_te.tolist())) == 1797
    assert torch.equal(get_dataset("digits", "train").images, tr.images)
    counts_tr = torch.bincount(tr.targets, minlength=10).float()
    counts_te = torch.bincount(te.targets, minlength=10).float()
    assert ((counts_te / counts_tr) - 0.25).abs().max() < 0.03  # 80/20 within every class
    # values: 16 grey levels / 16; normalisation constants are the training split's statistics
    vals = torch.unique(tr.images * 16)
    assert torch.equal(vals, vals.round()) and vals.max() == 16
    info = dataset_info("digits")
    assert abs(tr.images.mean().item() - info.mean[0]) < 1e-3
    assert abs(tr.images.std(unbiased=False).item() - info.std[0]) < 1e-3
    xs = torch.stack([x for x, _ in tr.__getitems__(range(len(tr)))])
    assert abs(xs.mean().item()) < 1e-3 and abs(xs.std().item() - 1) < 1e-2
    # a different seed gives a different split
    _, _, idx_tr_seed1 = load_digits_split("train", seed=1)
    assert not np.array_equal(idx_tr, idx_tr_seed1)


def test_digits_img_size_and_batched_fetch():
    ds = get_dataset("digits", "test", img_size=32)
    assert ds.img_size == 32 and ds[3][0].shape == (1, 32, 32)
    batch = ds.__getitems__([0, 5, 7])
    for (xb, yb), i in zip(batch, [0, 5, 7]):
        xi, yi = ds[i]
        torch.testing.assert_close(xb, xi)
        assert yb == yi == int(ds.targets[i])


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(">u1" if code == 0x08 else arr.dtype).tobytes()


def _write_fashion(directory, n_train=12, n_test=5, gz=True, size=28, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labs = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        for kind, arr in (("images-idx3-ubyte", imgs), ("labels-idx1-ubyte", labs)):
            path = os.path.join(directory, f"{prefix}-{kind}" + (".gz" if gz else ""))
            data = _idx_bytes(arr)
            with open(path, "wb") as f:
                f.write(gzip.compress(data) if gz else data)
        out[prefix] = (imgs, labs)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, gz):
    written = _write_fashion(tmp_path / "fm", gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = get_dataset("fashion-mnist", split, data_dir=tmp_path / "fm")
        imgs, labs = written[prefix]
        assert len(ds) == len(labs) and ds.img_size == 28 and ds.in_channels == 1
        assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs))
        assert ds.targets.tolist() == labs.tolist()
        x, y = ds[1]
        mean, std = dataset_info("fashion-mnist").mean[0], dataset_info("fashion-mnist").std[0]
        torch.testing.assert_close(x[0], (torch.from_numpy(imgs[1]).float() / 255 - mean) / std)
        assert y == int(labs[1])
    # torchvision's layout DIR/FashionMNIST/raw is found from DIR too
    _write_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", gz=gz)
    assert len(get_dataset("fashion-mnist", "test", data_dir=tmp_path / "tv")) == 5


def test_fashion_mnist_augmented_batches(tmp_path):
    _write_fashion(tmp_path, n_train=16)
    ds = get_dataset("fashion-mnist", "train", data_dir=tmp_path, augment="randaugment", img_size=32)
    loader = build_loader(ds, batch_size=8, shuffle=True)
    x, y = next(iter(loader))
    assert x.shape == (8, 1, 32, 32) and y.shape == (8,) and torch.isfinite(x).all()


def test_idx_reader_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = _idx_bytes(arr)
    p = tmp_path / "good"
    p.write_bytes(good)
    assert np.array_equal(read_idx(p, ndim=3), arr)
    # other element types, big-endian
    i32 = np.array([[1, -2], [70000, 5]], dtype=np.int32)
    p.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 2) + i32.astype(">i4").tobytes())
    assert np.array_equal(read_idx(p), i32)
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x08\x03\x00\x00" + good[4:])
    with pytest.raises(CorruptDataError, match="bad IDX magic number 0x08030000"):
        read_idx(bad_magic)
    with pytest.raises(CorruptDataError, match="has 3 dimensions, expected 1"):
        read_idx(_w(tmp_path / "g", good), ndim=1)
    with pytest.raises(CorruptDataError, match="truncated.*2x3x4 of uint8 = 24 data bytes, found 20"):
        read_idx(_w(tmp_path / "trunc", good[:-4]))
    with pytest.raises(CorruptDataError, match="trailing bytes"):
        read_idx(_w(tmp_path / "long", good + b"\x00"))
    with pytest.raises(CorruptDataError, match="too short"):
        read_idx(_w(tmp_path / "tiny", b"\x00\x00"))
    with pytest.raises(CorruptDataError, match="corrupt or truncated gzip"):
        read_idx(_w(tmp_path / "gz", gzip.compress(good)[:-12]))


def _w(path, data: bytes):
    path.write_bytes(data)
    return path


def test_fashion_mnist_corrupt_and_missing_files(tmp_path):
    _write_fashion(tmp_path / "a", gz=False)
    img = tmp_path / "a" / "train-images-idx3-ubyte"
    raw = img.read_bytes()
    img.write_bytes(raw[:-100])
    with pytest.raises(CorruptDataError, match="train-images-idx3-ubyte: IDX file truncated"):
        get_dataset("fashion-mnist", "train", data_dir=tmp_path / "a")
    img.write_bytes(b"\x00\x00\x08\x01" + raw[4:])  # images file with a labels-file magic
    with pytest.raises(CorruptDataError, match="1 dimensions, expected 3"):
        get_dataset("fashion-mnist", "train", data_dir=tmp_path / "a")
    # images and labels disagree in count
    _write_fashion(tmp_path / "b", gz=False)
    lab = tmp_path / "b" / "t10k-labels-idx1-ubyte"
    lab.write_bytes(_idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(CorruptDataError, match="has 5 images but .* has 4 labels"):
        get_dataset("fashion-mnist", "test", data_dir=tmp_path / "b")
    lab.write_bytes(_idx_bytes(np.full(5, 10, np.uint8)))
    with pytest.raises(CorruptDataError, match=r"label 10 outside \[0, 10\)"):
        get_dataset("fashion-mnist", "test", data_dir=tmp_path / "b")
    # nothing there: the message names the files, the places and the fix
    with pytest.raises(DataNotFoundError) as ei:
        get_dataset("fashion-mnist", "train", data_dir=tmp_path / "empty")
    msg = str(ei.value)
    assert "train-images-idx3-ubyte[.gz]" in msg and "train-labels-idx1-ubyte[.gz]" in msg
    assert str(tmp_path / "empty") in msg and "--data-dir" in msg and "dataset-fashion-mnist" in msg


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST_DIR),
                    reason=f"the real Fashion-MNIST files are not installed at {DEBIAN_FASHION_MNIST_DIR} "
                           "(Debian package dataset-fashion-mnist); the loader is tested on written files above")
def test_fashion_mnist_real_debian_files(monkeypatch, tmp_path):
    monkeypatch.setenv("CCTK_DATA_DIR", str(tmp_path))  # nothing there: falls through to Debian's dir
    tr = get_dataset("fashion-mnist", "train")
    te = get_dataset("fashion-mnist", "test")
    assert (len(tr), len(te)) == (60000, 10000)
    assert torch.bincount(tr.targets).tolist() == [6000] * 10
    imgs = tr.images.float() / 255
    info = dataset_info("fashion-mnist")
    assert abs(imgs.mean().item() - info.mean[0]) < 1e-3 and abs(imgs.std().item() - info.std[0]) < 1e-3


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision, python pickle batches)


@pytest.fixture
def no_md5(monkeypatch):
    """Replace torchvision's MD5 check (only) by an existence check; see the module docstring."""
    pytest.importorskip("torchvision")
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.flowers102 as tv_flowers

    def exists_only(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(tv_cifar, "check_integrity", exists_only)
    monkeypatch.setattr(tv_flowers, "check_integrity", exists_only)


def _write_cifar(root, which="cifar10", per_batch=4, seed=0):
    """The python-version layout: pickled dicts with 'data' (N, 3072) uint8, rows R|G|B planes of
    32x32, and 'labels' (CIFAR-10) or 'fine_labels'/'coarse_labels' (CIFAR-100), plus the meta."""
    rng = np.random.default_rng(seed)
    if which == "cifar10":
        base = os.path.join(root, "cifar-10-batches-py")
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        meta_name, meta = "batches.meta", {"label_names": [f"c10_{i}" for i in range(10)],
                                           "num_cases_per_batch": per_batch, "num_vis": 3072}
        k, label_key = 10, "labels"
    else:
        base = os.path.join(root, "cifar-100-python")
        names = ["train", "test"]
        meta_name, meta = "meta", {"fine_label_names": [f"c100_{i}" for i in range(100)],
                                   "coarse_label_names": [f"s_{i}" for i in range(20)]}
        k, label_key = 100, "fine_labels"
    os.makedirs(base, exist_ok=True)
    written = {}
    for name in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, k, size=per_batch).tolist()
        entry = {"batch_label": name, "data": data, label_key: labels,
                 "filenames": [f"img{i}.png" for i in range(per_batch)]}
        if which == "cifar100":
            entry["coarse_labels"] = [lab // 5 for lab in labels]
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[name] = (data, labels)
    with open(os.path.join(base, meta_name), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_from_pickle_batches(tmp_path, no_md5, which):
    written = _write_cifar(tmp_path, which)
    train = get_dataset(which, "train", data_dir=tmp_path)
    test = get_dataset(which, "test", data_dir=tmp_path)
    k = 10 if which == "cifar10" else 100
    train_names = [f"data_batch_{i}" for i in range(1, 6)] if which == "cifar10" else ["train"]
    test_name = "test_batch" if which == "cifar10" else "test"
    assert len(train) == 4 * len(train_names) and len(test) == 4
    assert (train.num_classes, train.in_channels, train.img_size) == (k, 3, 32)
    assert train.classes[0] == ("c10_0" if k == 10 else "c100_0") and len(train.classes) == k
    data = np.concatenate([written[n][0] for n in train_names])
    labels = sum((written[n][1] for n in train_names), [])
    assert train.targets.tolist() == labels
    # channel planes: row = R(1024) G(1024) B(1024), each 32x32 row-major
    assert torch.equal(train.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    x, y = test[2]
    info = dataset_info(which)
    ref = torch.from_numpy(written[test_name][0][2].reshape(3, 32, 32)).float() / 255
    ref = (ref - torch.tensor(info.mean).view(3, 1, 1)) / torch.tensor(info.std).view(3, 1, 1)
    torch.testing.assert_close(x, ref)
    assert y == written[test_name][1][2]
    # data_dir may also name the dataset's own folder
    folder = "cifar-10-batches-py" if which == "cifar10" else "cifar-100-python"
    assert len(get_dataset(which, "test", data_dir=tmp_path / folder)) == 4
    # the reference recipe's augmentation on it
    aug = get_dataset(which, "train", data_dir=tmp_path, augment="reference")
    xb = torch.stack([aug[i][0] for i in range(4)])
    assert xb.shape == (4, 3, 32, 32) and torch.isfinite(xb).all()


def test_cifar_md5_failure_and_missing(tmp_path):
    pytest.importorskip("torchvision")
    _write_cifar(tmp_path, "cifar10")
    with pytest.raises(CorruptDataError, match="failed torchvision's MD5 integrity check"):
        get_dataset("cifar10", "train", data_dir=tmp_path)  # the real check: our files aren't the release
    with pytest.raises(DataNotFoundError) as ei:
        get_dataset("cifar100", "train", data_dir=tmp_path / "nowhere")
    msg = str(ei.value)
    assert "cifar-100-python" in msg and "train, test, meta" in msg
    assert "--data-dir" in msg and "--download" in msg
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DataNotFoundError, match="lacks data_batch_3"):
        get_dataset("cifar10", "test", data_dir=tmp_path)


def test_download_failure_offline(tmp_path, monkeypatch):
    """download=True on a machine without network: a DataNotFoundError that says so (the
    torchvision download function is replaced by one that fails the way urllib does offline)."""
    pytest.importorskip("torchvision")
    import urllib.error
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataNotFoundError, match="download into .* failed.*offline"):
        get_dataset("cifar10", "train", data_dir=tmp_path, download=True)


def test_cifar_default_data_dir(tmp_path, monkeypatch, no_md5):
    """Without data_dir, $CCTK_DATA_DIR is the torchvision root; the error says it looked there."""
    monkeypatch.setenv("CCTK_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError, match="no data_dir given, looked in the default"):
        get_dataset("cifar10", "test")
    _write_cifar(tmp_path, "cifar10")
    assert len(get_dataset("cifar10", "test")) == 4


def test_cifar_corrupt_pickle(tmp_path, no_md5):
    _write_cifar(tmp_path, "cifar10")
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(CorruptDataError, match="could not read"):
        get_dataset("cifar10", "test", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Flowers-102 (torchvision: jpg/ + imagelabels.mat + setid.mat)


def _write_flowers(root, n=9, seed=0):
    from PIL import Image
    from scipy.io import savemat
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "flowers-102")
    os.makedirs(os.path.join(base, "jpg"))
    for i in range(1, n + 1):
        h, w = int(rng.integers(40, 70)), int(rng.integers(40, 70))
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(base, "jpg", f"image_{i:05d}.jpg"))
    labels = rng.integers(1, 103, size=n)  # 1-based, as in the official file
    savemat(os.path.join(base, "imagelabels.mat"), {"labels": labels[None, :].astype(np.uint8)})
    ids = rng.permutation(np.arange(1, n + 1))
    setid = {"trnid": ids[:3][None, :], "valid": ids[3:5][None, :], "tstid": ids[5:][None, :]}
    savemat(os.path.join(base, "setid.mat"), {k: v.astype(np.uint16) for k, v in setid.items()})
    return labels, setid


def test_flowers102_from_fake_tree(tmp_path, no_md5):
    pytest.importorskip("scipy")
    labels, setid = _write_flowers(tmp_path)
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        ds = get_dataset("flowers102", split, data_dir=tmp_path, img_size=32)
        ids = setid[key][0]
        assert len(ds) == len(ids)
        assert ds.targets.tolist() == [int(labels[i - 1]) - 1 for i in ids]
        assert (ds.num_classes, ds.in_channels, ds.img_size) == (102, 3, 32)
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == ds.targets[0]
    assert len(ds.classes) == 102
    aug = get_dataset("flowers102", "train", data_dir=tmp_path, img_size=24, augment="reference")
    for i in range(len(aug)):
        x, _ = aug[i]
        assert x.shape == (3, 24, 24) and torch.isfinite(x).all()
    loader = build_loader(aug, batch_size=2, shuffle=True)
    xb, yb = next(iter(loader))
    assert xb.shape == (2, 3, 24, 24) and yb.dtype == torch.int64
    pad = get_dataset("flowers102", "test", data_dir=tmp_path, img_size=16, augment={"crop": "pad"})
    assert pad[0][0].shape == (3, 16, 16)


def test_flowers102_missing(tmp_path):
    pytest.importorskip("torchvision")
    (tmp_path / "flowers-102" / "jpg").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="lacks imagelabels.mat, setid.mat"):
        get_dataset("flowers102", "train", data_dir=tmp_path)
    with pytest.raises(DatasetArgumentError, match="train, val, test"):
        get_dataset("flowers102", "valid", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_deterministic_and_configurable():
    a = get_dataset("synthetic", "train", num_samples=60, seed=3)
    b = get_dataset("synthetic", "train", num_samples=60, seed=3)
    c = get_dataset("synthetic", "train", num_samples=60, seed=4)
    t = get_dataset("synthetic", "test", num_samples=60, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.images, t.images)
    assert torch.bincount(a.targets, minlength=10).tolist() == [6] * 10
    d = get_dataset("synthetic", "test", num_samples=25, num_classes=5, in_channels=2, img_size=20)
    assert (len(d), d.num_classes, d.in_channels, d.img_size) == (25, 5, 2, 20)
    assert d[0][0].shape == (2, 20, 20)
    with pytest.raises(ValueError, match="must be >= 1"):
        get_dataset("synthetic", num_classes=0)


def test_synthetic_is_learnable():
    """Nearest-class-mean on the training split classifies the test split far above chance:
    the classes carry signal a model can learn."""
    tr = get_dataset("synthetic", "train", num_samples=400, img_size=16, seed=0)
    te = get_dataset("synthetic", "test", num_samples=200, img_size=16, seed=0)
    xtr = tr.images.float().flatten(1) / 255
    xte = te.images.float().flatten(1) / 255
    means = torch.stack([xtr[tr.targets == k].mean(0) for k in range(10)])
    pred = torch.cdist(xte, means).argmin(1)
    acc = (pred == te.targets).float().mean().item()
    assert acc > 0.6, acc  # chance is 0.1


# ---------------------------------------------------------------------------------------------
# augmentations


def test_pad_crop_is_a_window_of_the_padded_image():
    x = torch.rand(6, 2, 9, 7)
    out = A.pad_crop(x, 2)
    assert out.shape == x.shape
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(6):
        assert any(torch.equal(out[b], xp[b, :, i:i + 9, j:j + 7]) for i in range(5) for j in range(5))


def test_resized_crop_full_box_is_identity_and_flip():
    x = torch.rand(3, 3, 10, 12)
    full = torch.tensor([[0.0, 0.0, 10.0, 12.0]]).repeat(3, 1)
    torch.testing.assert_close(A.resized_crop(x, full, (10, 12)), x, atol=1e-5, rtol=0)
    flip = torch.tensor([True, False, True])
    out = A.resized_crop(x, full, (10, 12), flip)
    torch.testing.assert_close(out[0], x[0].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], x[1], atol=1e-5, rtol=0)
    # a box selecting the top-left 5x6 at half size picks every other pixel's neighbourhood
    box = torch.tensor([[0.0, 0.0, 5.0, 6.0]])
    sub = A.resized_crop(x[:1], box, (5, 6))
    torch.testing.assert_close(sub, x[:1, :, :5, :6], atol=1e-5, rtol=0)
    p = A.resized_crop_params(500, 10, 12, scale=(0.5, 1.0))
    y0, x0, h, w = p.unbind(1)
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 10).all() and (x0 + w <= 12).all()
    assert ((h * w) / 120 >= 0.45).all()


def test_tensor_augment_pipeline_shapes_and_eval_is_plain_normalisation():
    x = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ev = A.TensorAugment(AugmentConfig(), mean, std, 16)
    ref = (x.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(ev(x), ref)
    flip = A.TensorAugment(AugmentConfig(hflip=1.0), mean, std, 16)
    torch.testing.assert_close(flip(x), ref.flip(-1))
    for cfg in [AugmentConfig(crop="pad", hflip=0.5), AugmentConfig(crop="resized", hflip=0.5),
                AugmentConfig(crop="resized", randaugment="rand-m9-mstd0.5-inc1", random_erasing=1.0)]:
        out = A.TensorAugment(cfg, mean, std, 24)(x)
        assert out.shape == (4, 3, 24, 24) and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert A.TensorAugment(cfg, mean, std, 16)(x[0]).shape == (3, 16, 16)


def test_augment_and_mix_on_device(device):
    """The tensor pipeline and Mixup/CutMix keep batches on their device."""
    x = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8).to(device)
    cfg = AugmentConfig(crop="pad", hflip=0.5, random_erasing=0.5)
    out = A.TensorAugment(cfg, (0.5,) * 3, (0.25,) * 3, 20)(x)
    assert out.device == x.device and out.shape == (4, 3, 20, 20)
    out = A.TensorAugment(AugmentConfig(crop="resized", hflip=0.5), (0.5,) * 3, (0.25,) * 3, 16)(x)
    assert out.device == x.device and out.shape == (4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3], device=device)
    xm, t = mixup_cutmix(out, y, 4, generator=torch.Generator().manual_seed(0))
    assert xm.device == x.device and t.device == x.device
    torch.testing.assert_close(t.sum(1), torch.ones(4, device=device))


def test_random_erasing():
    x = torch.zeros(8, 3, 20, 20)
    assert torch.equal(A.random_erasing(x, 0.0), x)
    out = A.random_erasing(x, 1.0)
    changed = (out != 0).any(1)  # (B, H, W)
    for b in range(8):
        ys, xs = torch.nonzero(changed[b], as_tuple=True)
        assert len(ys) > 0
        area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert area <= 400 / 3 + 40 and len(ys) >= 0.8 * area  # one solid box


def test_randaugment():
    pytest.importorskip("torchvision")
    cfg = parse_randaugment("rand-m9-mstd0.5-inc1")
    assert cfg == {"magnitude": 9.0, "num_ops": 2, "magnitude_std": 0.5, "max_magnitude": 10.0,
                   "prob": 0.5}
    assert parse_randaugment("rand-n3-m5-p1")["num_ops"] == 3
    with pytest.raises(ValueError, match="bad RandAugment policy part"):
        parse_randaugment("rand-q9")
    with pytest.raises(ValueError, match="must look like"):
        parse_randaugment("auto-m9")
    ra = RandAugment(num_ops=3, magnitude=9, prob=1.0)
    for c in (1, 3):
        img = (torch.rand(c, 12, 12) * 255).to(torch.uint8)
        changed = False
        for _ in range(10):
            out = ra(img)
            assert out.shape == img.shape and out.dtype == torch.uint8
            changed |= not torch.equal(out, img)
        assert changed
    assert torch.equal(RandAugment(prob=0.0)(img), img)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        ra(torch.zeros(2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError):
        AugmentConfig(crop="random")
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(hflip=1.5)


def test_augment_presets_respect_label_preserving_flips():
    assert dataset_info("digits").hflip_ok is False
    ds = get_dataset("digits", "train", augment=True)
    assert ds.augment.crop == "pad" and ds.augment.hflip == 0.0
    ds = get_dataset("synthetic", "train", augment="reference", num_samples=10)
    assert ds.augment.hflip == 0.0 and ds.augment.random_erasing == 0.25
    ds = get_dataset("digits", "train", augment={"crop": "resized", "scale": [0.8, 1.0], "hflip": 0.5})
    assert ds.augment.scale == (0.8, 1.0) and ds.augment.hflip == 0.5
    with pytest.raises(DatasetArgumentError, match="unknown augmentation option"):
        get_dataset("digits", augment={"flip": 1})


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix


def test_mixup_cutmix_soft_targets():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    x_before = x.clone()
    # mixup only
    g = torch.Generator().manual_seed(1)
    xm, t = mixup_cutmix(x, y, 7, mixup_alpha=0.8, cutmix_alpha=0.0, generator=g)
    torch.testing.assert_close(t.sum(1), torch.ones(6))
    lam = t[0, 0].item()
    assert 0 <= lam <= 1
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(t[0, 5], torch.tensor(1 - lam))
    assert torch.equal(x, x_before)
    # cutmix only: the target weight of the partner equals its pixel share
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        xc, t = mixup_cutmix(x, y, 7, mixup_alpha=0.0, cutmix_alpha=1.0, generator=g)
        torch.testing.assert_close(t.sum(1), torch.ones(6))
        from_partner = (xc[0] == x[5]).all(0) & (xc[0] != x[0]).any(0)
        share = from_partner.float().mean().item()
        assert abs(t[0, 5].item() - share) < 1e-6
    # deterministic with a generator; smoothing keeps rows summing to 1
    a = mixup_cutmix(x, y, 7, generator=torch.Generator().manual_seed(9), label_smoothing=0.1)
    b = mixup_cutmix(x, y, 7, generator=torch.Generator().manual_seed(9), label_smoothing=0.1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[1].sum(1), torch.ones(6))
    assert a[1].min() > 0
    # prob 0: untouched, plain one-hot
    xo, to = mixup_cutmix(x, y, 7, prob=0.0)
    assert torch.equal(xo, x) and torch.equal(to, torch.nn.functional.one_hot(y, 7).float())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\)"):
        mixup_cutmix(x, torch.tensor([0, 1, 2, 3, 4, 7]), 7)
    with pytest.raises(ValueError, match="batch"):
        mixup_cutmix(x[0], y, 7)


def test_mixup_collate_in_loader():
    ds = get_dataset("synthetic", "train", num_samples=16, img_size=8)
    mix = MixupCutmix(num_classes=10, generator=torch.Generator().manual_seed(0))
    loader = build_loader(ds, batch_size=8, shuffle=True, collate_fn=mix.collate)
    x, t = next(iter(loader))
    assert x.shape == (8, 3, 8, 8) and t.shape == (8, 10)
    torch.testing.assert_close(t.sum(1), torch.ones(8))


# ---------------------------------------------------------------------------------------------
# loaders


def test_build_loader_epochs_are_reproducible():
    ds = get_dataset("digits", "test")
    loader = build_loader(ds, batch_size=50, shuffle=True, seed=5)
    set_loader_epoch(loader, 0)
    e0 = torch.cat([y for _, y in loader])
    set_loader_epoch(loader, 1)
    e1 = torch.cat([y for _, y in loader])
    set_loader_epoch(loader, 0)
    e0b = torch.cat([y for _, y in loader])
    assert torch.equal(e0, e0b) and not torch.equal(e0, e1)
    assert sorted(e0.tolist()) == sorted(ds.targets.tolist())
    s = EpochSampler(10, shuffle=False)
    assert list(s) == list(range(10))
    xb, _ = next(iter(build_loader(ds, batch_size=7, shuffle=False, drop_last=True)))
    assert xb.shape == (7, 1, 8, 8)
    assert len(build_loader(ds, batch_size=7, shuffle=False, drop_last=True)) == 360 // 7
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(ds, batch_size=0, shuffle=False)


def test_build_loader_distributed(tmp_path):
    import torch.distributed as dist
    ds = get_dataset("digits", "test")
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        build_loader(ds, batch_size=8, shuffle=True, distributed=True)
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loader = build_loader(ds, batch_size=64, shuffle=True, distributed=True, seed=1)
        from torch.utils.data.distributed import DistributedSampler
        assert isinstance(loader.sampler, DistributedSampler)
        set_loader_epoch(loader, 3)
        assert loader.sampler.epoch == 3
        labels = torch.cat([y for _, y in loader])
        assert sorted(labels.tolist()) == sorted(ds.targets.tolist())
    finally:
        dist.destroy_process_group()


def test_workers_load_tensor_dataset():
    ds = get_dataset("synthetic", "train", num_samples=32, img_size=8, augment="basic")
    loader = build_loader(ds, batch_size=8, shuffle=True, num_workers=2, seed=0)
    set_loader_epoch(loader, 0)
    a = torch.cat([x for x, _ in loader])
    set_loader_epoch(loader, 0)
    b = torch.cat([x for x, _ in loader])
    assert a.shape == (32, 3, 8, 8)
    assert torch.equal(a, b)  # augmentation randomness in workers follows (seed, epoch)


def test_tensor_datasets_work_without_torchvision(monkeypatch, tmp_path):
    """digits, fashion-mnist and synthetic (with crop/flip) need no torchvision; the datasets
    and options that do need it say so."""
    import sys
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")] + ["torchvision"]:
        monkeypatch.setitem(sys.modules, mod, None)  # importing torchvision (or a part) now fails
    _write_fashion(tmp_path)
    for ds in (get_dataset("digits", "test", augment="basic"),
               get_dataset("fashion-mnist", "train", data_dir=tmp_path, augment="basic"),
               get_dataset("synthetic", "train", num_samples=8, augment={"crop": "resized", "hflip": 0.5})):
        x, _ = next(iter(build_loader(ds, batch_size=4, shuffle=True)))
        assert x.shape[0] == 4 and torch.isfinite(x).all()
    with pytest.raises(ImportError, match="cifar10 needs torchvision: pip install torchvision"):
        get_dataset("cifar10", data_dir=tmp_path)
    with pytest.raises(ImportError, match="RandAugment needs torchvision"):
        get_dataset("digits", augment="randaugment")
