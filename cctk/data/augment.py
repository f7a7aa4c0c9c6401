"""Augmentations of the reference CCT recipes, on image tensors, plus batch-level Mixup/CutMix.

Everything here works on ``(B, C, H, W)`` batches (or one ``(C, H, W)`` image) in plain PyTorch,
with per-sample random parameters drawn from the global torch RNG (so ``torch.manual_seed`` and
DataLoader worker seeding make them reproducible). Only RandAugment needs torchvision.

Pipeline of :class:`TensorAugment` for one batch ``x`` (uint8 in [0, 255] or float in [0, 1]):

1. ``x <- x / 255`` when uint8 (float in [0, 1] from here on);
2. crop: ``"pad"``: zero-pad by ``padding`` on every side, take a random ``H x W`` window
   (torchvision ``RandomCrop(size, padding)``); ``"resized"``: random box of area fraction
   ``s ~ U(scale)`` and aspect ``r ~ logU(ratio)`` resampled bilinearly to the output size
   (torchvision ``RandomResizedCrop``); the box maps to the output grid through the affine map
   ``x_in = (w / W) u + (2 x0 + w) / W - 1`` (normalised coordinates, ``align_corners=False``);
3. horizontal flip with probability ``hflip``;
4. resize to ``out_size`` when the image is not already that size (bilinear, antialiased);
5. RandAugment (timm-style ``rand-m9-mstd0.5-inc1``, see :class:`RandAugment`);
6. normalise: ``x <- (x - mean) / std`` per channel;
7. random erasing with probability ``random_erasing`` (timm ``remode="pixel"``): one box of area
   fraction ``U(0.02, 1/3)`` and aspect ``logU(0.3, 3.3)`` filled with ``N(0, 1)`` noise.

The same order as the reference's timm transform (crop, flip, RandAugment, to-tensor, normalise,
erase).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "AugmentConfig", "TensorAugment", "RandAugment", "parse_randaugment", "resolve_augment",
    "pad_crop", "resized_crop_params", "resized_crop", "random_erasing", "mixup_cutmix",
    "MixupCutmix", "one_hot_smooth", "AUGMENT_PRESETS",
]


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation options (all off by default).

    crop:           ``None`` | ``"pad"`` (random crop after zero padding, the classic CIFAR one) |
                    ``"resized"`` (RandomResizedCrop, the reference timm recipes' one).
    padding:        pixels of zero padding for ``crop="pad"`` (``None``: ``img_size // 8``).
    scale, ratio:   area-fraction and aspect-ratio ranges for ``crop="resized"``.
    hflip:          probability of a horizontal flip.
    randaugment:    timm-style policy string (``"rand-m9-mstd0.5-inc1"``) or ``None``.
    random_erasing: probability of erasing one random box (after normalisation).
    """

    crop: Optional[str] = None
    padding: Optional[int] = None
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.0
    randaugment: Optional[str] = None
    random_erasing: float = 0.0

    def __post_init__(self):
        if self.crop not in (None, "pad", "resized"):
            raise ValueError(f"crop must be None, 'pad' or 'resized', got {self.crop!r}")
        if self.padding is not None and (not isinstance(self.padding, int) or self.padding < 0):
            raise ValueError(f"padding must be a non-negative int, got {self.padding!r}")
        lo, hi = self.scale
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        rlo, rhi = self.ratio
        if not (0 < rlo <= rhi):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        for name in ("hflip", "random_erasing"):
            p = getattr(self, name)
            if not (0.0 <= p <= 1.0):
                raise ValueError(f"{name} is a probability and must lie in [0, 1], got {p}")
        if self.randaugment is not None:
            parse_randaugment(self.randaugment)  # raises on a bad policy string
        object.__setattr__(self, "scale", (float(lo), float(hi)))
        object.__setattr__(self, "ratio", (float(rlo), float(rhi)))

    @property
    def active(self) -> bool:
        return (self.crop is not None or self.hflip > 0 or self.randaugment is not None
                or self.random_erasing > 0)


#: Named presets; ``"basic"`` and ``"reference"`` are specialised per dataset by
#: :func:`resolve_augment` (padding, whether flips are label-preserving, the crop kind).
AUGMENT_PRESETS = ("none", "basic", "randaugment", "reference")


def resolve_augment(spec, *, crop_kind: str = "pad", hflip_ok: bool = True) -> AugmentConfig:
    """Turn the ``augment=`` argument of :func:`cctk.data.get_dataset` into an AugmentConfig.

    ``False``/``None``/``"none"``: no augmentation. ``True``/``"basic"``: the dataset's crop
    (``crop_kind``: ``"pad"`` for the small tensor datasets and CIFAR, ``"resized"`` with scale
    (0.8, 1) for Flowers-102) plus a horizontal flip where flips preserve the label.
    ``"randaugment"``: basic + ``rand-m9-mstd0.5-inc1``. ``"reference"``: the reference timm
    recipe: RandomResizedCrop scale (0.8, 1), flip, ``rand-m9-mstd0.5-inc1``, random erasing
    0.25 (Mixup/CutMix are batch-level: :func:`mixup_cutmix`). A dict gives AugmentConfig fields;
    an AugmentConfig is used as is. Flips are forced off for datasets whose labels they change
    (digits, synthetic gratings) only in presets; an explicit config is obeyed.
    """
    if isinstance(spec, AugmentConfig):
        return spec
    if isinstance(spec, dict):
        names = {f.name for f in fields(AugmentConfig)}
        bad = sorted(set(spec) - names)
        if bad:
            raise ValueError(f"unknown augmentation option(s) {bad}; valid: {sorted(names)}")
        d = dict(spec)
        for k in ("scale", "ratio"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return AugmentConfig(**d)
    if spec is None or spec is False:
        return AugmentConfig()
    if spec is True:
        spec = "basic"
    if not isinstance(spec, str):
        raise TypeError(f"augment must be a bool, a preset name, a dict or an AugmentConfig, "
                        f"got {type(spec).__name__}")
    flip = 0.5 if hflip_ok else 0.0
    if crop_kind == "resized":
        basic = AugmentConfig(crop="resized", scale=(0.8, 1.0), hflip=flip)
    else:
        basic = AugmentConfig(crop="pad", hflip=flip)
    if spec == "none":
        return AugmentConfig()
    if spec == "basic":
        return basic
    if spec == "randaugment":
        return replace(basic, randaugment="rand-m9-mstd0.5-inc1")
    if spec == "reference":
        return AugmentConfig(crop="resized", scale=(0.8, 1.0), hflip=flip,
                             randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.25)
    raise ValueError(f"unknown augmentation preset {spec!r}; choose one of {list(AUGMENT_PRESETS)}, "
                     f"True/False, a dict of AugmentConfig fields or an AugmentConfig")


# --------------------------------------------------------------------------------------------
# geometric ops on (B, C, H, W) float batches


def _as_batch(x: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    if x.dim() == 3:
        return x.unsqueeze(0), True
    if x.dim() != 4:
        raise ValueError(f"expected an image (C, H, W) or a batch (B, C, H, W), got shape {tuple(x.shape)}")
    return x, False


def pad_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Random ``H x W`` window of ``x`` zero-padded by ``padding`` pixels (per-sample offsets).

    out[b, c, i, j] = xpad[b, c, i + dy_b, j + dx_b],  dy_b, dx_b ~ U{0, ..., 2 * padding}
    """
    x, single = _as_batch(x)
    if padding == 0:
        return x[0] if single else x
    B, C, H, W = x.shape
    Hp, Wp = H + 2 * padding, W + 2 * padding
    xp = F.pad(x, (padding, padding, padding, padding)).reshape(B, C, Hp * Wp)
    dy = torch.randint(0, 2 * padding + 1, (B,))
    dx = torch.randint(0, 2 * padding + 1, (B,))
    # flat index of out[b, :, i, j] in the padded image: (i + dy_b) * Wp + (j + dx_b)
    flat = ((dy[:, None, None] + torch.arange(H)[None, :, None]) * Wp
            + dx[:, None, None] + torch.arange(W)[None, None, :])
    flat = flat.reshape(B, 1, H * W).expand(B, C, H * W).to(x.device)
    out = xp.gather(2, flat).reshape(B, C, H, W)
    return out[0] if single else out


def resized_crop_params(batch: int, height: int, width: int, scale=(0.08, 1.0),
                        ratio=(3.0 / 4.0, 4.0 / 3.0), attempts: int = 10) -> torch.Tensor:
    """Boxes ``(y0, x0, h, w)`` (float, pixels) with torchvision's RandomResizedCrop rule:
    up to ``attempts`` draws of area fraction ``U(scale)`` and log-uniform aspect ``ratio``; the
    first box that fits wins; if none fits, the largest centred box with a clamped aspect."""
    area = height * width
    s = torch.empty(batch, attempts).uniform_(scale[0], scale[1]) * area
    logr = torch.empty(batch, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(logr)
    w = torch.sqrt(s * r).round()
    h = torch.sqrt(s / r).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((batch,), -1, dtype=torch.long))
    # fallback: central crop (torchvision's rule)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = height, int(round(height * ratio[1]))
    else:
        fw, fh = width, height
    idx = first.clamp(min=0)
    bw = w.gather(1, idx[:, None])[:, 0]
    bh = h.gather(1, idx[:, None])[:, 0]
    y0 = torch.floor(torch.rand(batch) * (height - bh + 1))
    x0 = torch.floor(torch.rand(batch) * (width - bw + 1))
    found = first >= 0
    bw = torch.where(found, bw, torch.full_like(bw, float(fw)))
    bh = torch.where(found, bh, torch.full_like(bh, float(fh)))
    y0 = torch.where(found, y0, torch.full_like(y0, float((height - fh) // 2)))
    x0 = torch.where(found, x0, torch.full_like(x0, float((width - fw) // 2)))
    return torch.stack([y0, x0, bh, bw], dim=1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, out_size: Tuple[int, int],
                 flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Resample box ``(y0, x0, h, w)`` of every image to ``out_size`` (bilinear, one
    ``grid_sample`` for the whole batch); ``flip`` (bool per sample) mirrors horizontally."""
    x, single = _as_batch(x)
    B, C, H, W = x.shape
    boxes = boxes.to(torch.float32)
    y0, x0, bh, bw = boxes.unbind(1)
    sx = bw / W
    sy = bh / H
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * x0 + bw) / W - 1
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = (2 * y0 + bh) / H - 1
    grid = F.affine_grid(theta.to(x.device, x.dtype), [B, C, out_size[0], out_size[1]],
                         align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0] if single else out


def resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking) of a float batch or image."""
    x, single = _as_batch(x)
    if tuple(x.shape[-2:]) != tuple(size):
        shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return x[0] if single else x


def random_erasing(x: torch.Tensor, p: float, scale=(0.02, 1.0 / 3.0), ratio=(0.3, 3.3),
                   attempts: int = 10) -> torch.Tensor:
    """With probability ``p`` per sample, replace one random box by ``N(0, 1)`` noise per pixel
    (timm RandomErasing, ``mode="pixel"``, one box; applied to normalised images).

    Not ``torchvision.transforms.v2.RandomErasing``: given a batch, that one draws one box and
    one coin for the whole batch, while the recipe erases each sample independently; called per
    image it would undo the batched augmentation of :class:`TensorAugment`, and torchvision is
    optional for cctk.data."""
    x, single = _as_batch(x)
    B, C, H, W = x.shape
    if p <= 0:
        return x[0] if single else x
    area = H * W
    s = torch.empty(B, attempts).uniform_(scale[0], scale[1]) * area
    r = torch.exp(torch.empty(B, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    h = torch.sqrt(s * r).round()
    w = torch.sqrt(s / r).round()
    ok = (w < W) & (h < H) & (w > 0) & (h > 0)
    first = ok.float().argmax(1)
    bh = h.gather(1, first[:, None])[:, 0]
    bw = w.gather(1, first[:, None])[:, 0]
    y0 = torch.floor(torch.rand(B) * (H - bh + 1))
    x0 = torch.floor(torch.rand(B) * (W - bw + 1))
    apply = (torch.rand(B) < p) & ok.any(1)
    ys = torch.arange(H, dtype=torch.float32)
    xs = torch.arange(W, dtype=torch.float32)
    in_y = (ys[None, :] >= y0[:, None]) & (ys[None, :] < (y0 + bh)[:, None])   # (B, H)
    in_x = (xs[None, :] >= x0[:, None]) & (xs[None, :] < (x0 + bw)[:, None])   # (B, W)
    mask = (in_y[:, :, None] & in_x[:, None, :] & apply[:, None, None])[:, None]  # (B,1,H,W)
    noise = torch.randn(B, C, H, W).to(x.device, x.dtype)
    out = torch.where(mask.to(x.device), noise, x)
    return out[0] if single else out


# --------------------------------------------------------------------------------------------
# RandAugment (torchvision ops, timm policy semantics)

_RA_KEYS = {"m": float, "n": int, "mstd": float, "mmax": float, "p": float, "inc": int}


def parse_randaugment(policy: str) -> Dict[str, float]:
    """Parse a timm-style policy ``"rand-m9-n2-mstd0.5-inc1"`` into
    ``{magnitude, num_ops, magnitude_std, max_magnitude, prob}`` (defaults n=2, mstd=0,
    mmax=10, p=0.5 as in timm). ``inc`` is accepted: torchvision's ops already grow more severe
    with the magnitude (posterize/solarize decrease, enhance factors 1 +- m), which is what
    timm's ``inc1`` selects."""
    if not isinstance(policy, str) or not policy.startswith("rand"):
        raise ValueError(f"RandAugment policy must look like 'rand-m9-mstd0.5-inc1', got {policy!r}")
    out = {"magnitude": 9.0, "num_ops": 2, "magnitude_std": 0.0, "max_magnitude": 10.0, "prob": 0.5}
    names = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "mmax": "max_magnitude",
             "p": "prob"}
    for part in policy.split("-")[1:]:
        mt = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
        if not mt or mt.group(1) not in _RA_KEYS:
            raise ValueError(f"bad RandAugment policy part {part!r} in {policy!r}; "
                             f"known keys: {sorted(_RA_KEYS)}")
        key, val = mt.group(1), _RA_KEYS[mt.group(1)](float(mt.group(2)))
        if key in names:
            out[names[key]] = val
    if out["num_ops"] < 0 or out["magnitude"] < 0 or out["max_magnitude"] <= 0:
        raise ValueError(f"bad RandAugment policy {policy!r}: n, m must be >= 0 and mmax > 0")
    return out


def _torchvision_randaugment_cls():
    try:
        from torchvision.transforms import v2 as T  # torchvision >= 0.15
        return T.RandAugment
    except Exception:  # older torchvision: v1 (tensor support since 0.11)
        try:
            from torchvision.transforms import RandAugment
            return RandAugment
        except Exception as exc:
            raise ImportError("RandAugment needs torchvision (pip install torchvision, or "
                              "pip install 'cctk[vision]'); it is optional for digits, "
                              "fashion-mnist and synthetic without RandAugment") from exc


class RandAugment:
    """timm-style RandAugment built from torchvision's RandAugment ops.

    For each of ``num_ops`` draws (ops chosen with replacement, as timm does): with
    probability ``prob`` apply one torchvision RandAugment op at magnitude
    ``m' = clip(m + mstd * N(0, 1), 0, mmax)``, i.e. torchvision magnitude bin
    ``round(100 * m' / mmax)`` of 101 (so m9 of 10 is 90 % of each op's range, timm's scale).
    Input and output: uint8 image ``(C, H, W)`` with C in {1, 3} (the ops run on a PIL copy).
    Geometric ops fill with ``fill``.
    Differences from timm, stated: torchvision's op list (has Identity, no SolarizeAdd) and
    bilinear/nearest rather than random interpolation.
    """

    BINS = 101

    def __init__(self, num_ops=2, magnitude=9.0, magnitude_std=0.0, max_magnitude=10.0,
                 prob=0.5, fill: Optional[Sequence[int]] = None):
        self.num_ops, self.magnitude, self.magnitude_std = int(num_ops), float(magnitude), float(magnitude_std)
        self.max_magnitude, self.prob = float(max_magnitude), float(prob)
        self.fill = list(fill) if fill is not None else None
        self._cls = _torchvision_randaugment_cls()
        self._ops: Dict[int, object] = {}

    @classmethod
    def from_policy(cls, policy: str, fill=None) -> "RandAugment":
        return cls(fill=fill, **parse_randaugment(policy))

    def _op(self, bin_: int):
        if bin_ not in self._ops:
            self._ops[bin_] = self._cls(num_ops=1, magnitude=bin_, num_magnitude_bins=self.BINS,
                                        fill=self.fill)
        return self._ops[bin_]

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.dtype != torch.uint8 or img.dim() != 3:
            raise TypeError(f"RandAugment expects a uint8 image (C, H, W), got {img.dtype} {tuple(img.shape)}")
        if img.shape[0] not in (1, 3):
            raise ValueError(f"RandAugment (torchvision) supports 1 or 3 channels, got {img.shape[0]}")
        bins = []
        for _ in range(self.num_ops):
            if float(torch.rand(())) >= self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m = m + self.magnitude_std * float(torch.randn(()))
            m = min(max(m, 0.0), self.max_magnitude)
            bins.append(int(round((self.BINS - 1) * m / self.max_magnitude)))
        if not bins:
            return img
        # torchvision's ops run about twice as fast on PIL images as on small tensors (timm also
        # augments PIL images): convert once, apply the ops, convert back (lossless for uint8).
        from torchvision.transforms import functional as TF
        pil = TF.to_pil_image(img)
        for b in bins:
            pil = self._op(b)(pil)
        return TF.pil_to_tensor(pil)

    def __repr__(self):
        return (f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, "
                f"magnitude_std={self.magnitude_std}, max_magnitude={self.max_magnitude}, prob={self.prob})")


# --------------------------------------------------------------------------------------------
# the tensor pipeline


class TensorAugment:
    """Crop/flip/resize/RandAugment/normalise/erase a batch of images; see the module docstring.

    ``__call__(x)`` takes uint8 ``[0, 255]`` or float ``[0, 1]`` images, ``(B, C, H, W)`` or
    ``(C, H, W)``, on any device (random parameters are drawn on the CPU; RandAugment runs on
    the CPU), and returns normalised float32 images of size ``out_size`` on that device.
    With an inactive config it only converts, resizes and normalises (the evaluation transform).
    """

    def __init__(self, config: AugmentConfig, mean: Sequence[float], std: Sequence[float],
                 out_size: int):
        self.config = config
        self.out_size = (int(out_size), int(out_size))
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self.randaugment = None
        if config.randaugment is not None:
            fill = [int(round(255 * m)) for m in mean]
            self.randaugment = RandAugment.from_policy(config.randaugment, fill=fill)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x, single = _as_batch(x)
        cfg = self.config
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        else:
            x = x.float()
        B, C, H, W = x.shape
        if C != self.mean.shape[0]:
            raise ValueError(f"images have {C} channels but the normalisation has {self.mean.shape[0]}")
        flip = None
        if cfg.hflip > 0:
            flip = torch.rand(B) < cfg.hflip
        if cfg.crop == "resized":
            boxes = resized_crop_params(B, H, W, cfg.scale, cfg.ratio)
            x = resized_crop(x, boxes, self.out_size, flip)
            flip = None
        elif cfg.crop == "pad":
            pad = cfg.padding if cfg.padding is not None else max(1, H // 8)
            x = pad_crop(x, pad)
        if flip is not None and bool(flip.any()):
            x = torch.where(flip.view(B, 1, 1, 1).to(x.device), x.flip(-1), x)
        x = resize(x, self.out_size)
        if self.randaugment is not None:
            u8 = (x * 255.0).round_().clamp_(0, 255).to(device="cpu", dtype=torch.uint8)
            x = torch.stack([self.randaugment(img) for img in u8]).to(x.device).float().div_(255.0)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        if cfg.random_erasing > 0:
            x = random_erasing(x, cfg.random_erasing)
        return x[0] if single else x

    def __repr__(self):
        return f"TensorAugment({self.config}, out_size={self.out_size})"


# --------------------------------------------------------------------------------------------
# Mixup / CutMix (batch level)


def one_hot_smooth(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """``t = (1 - eps) * onehot(y) + eps / K`` (float32, rows sum to 1)."""
    off = smoothing / num_classes
    t = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    t.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)
    return t


def mixup_cutmix(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0,
                 generator: Optional[torch.Generator] = None):
    """Mix a batch with its reverse (timm ``Mixup``, ``mode="batch"``), returning
    ``(mixed_images, soft_targets)``; the inputs are not modified.

    With probability ``prob`` the batch is mixed, by CutMix with probability ``switch_prob`` when
    both alphas are > 0 (else by whichever is > 0); ``lam ~ Beta(alpha, alpha)``.

    * Mixup:  ``x' = lam * x + (1 - lam) * x[::-1]``.
    * CutMix: a box of side ``sqrt(1 - lam)`` times the image's, centred uniformly and clipped,
      is pasted from ``x[::-1]``; ``lam <- 1 - box_area / (H * W)`` (the exact pixel share).
    * Targets: ``t = lam * s(y) + (1 - lam) * s(y[::-1])`` with ``s`` the (optionally smoothed)
      one-hot of :func:`one_hot_smooth`: every row sums to 1.

    Implemented here rather than with torchvision.transforms.v2.MixUp/CutMix so that it needs no
    torchvision, takes a seeded ``generator`` (exact resume), and follows the reference recipe
    (timm: reversed-batch pairing, mixup/cutmix switch, optional smoothing inside the mix).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be a batch (B, C, H, W), got shape {tuple(images.shape)}")
    from cctk.ops.labels import check_labels
    check_labels(labels, num_classes, batch=images.shape[0], device=images.device)
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError("mixup_alpha and cutmix_alpha must be >= 0")
    g = generator

    def rand():
        return float(torch.rand((), generator=g))

    lam = 1.0
    use_cutmix = False
    if (mixup_alpha > 0 or cutmix_alpha > 0) and rand() < prob:
        if mixup_alpha > 0 and cutmix_alpha > 0:
            use_cutmix = rand() < switch_prob
        else:
            use_cutmix = cutmix_alpha > 0
        alpha = cutmix_alpha if use_cutmix else mixup_alpha
        if g is None:
            lam = float(torch.distributions.Beta(alpha, alpha).sample())
        else:
            lam = _beta(alpha, g)
    partner = images.flip(0)
    if lam == 1.0:
        mixed = images.clone()
    elif use_cutmix:
        B, C, H, W = images.shape
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy = int(torch.randint(0, H, (), generator=g))
        cx = int(torch.randint(0, W, (), generator=g))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        mixed = images.clone()
        mixed[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)
    else:
        mixed = images * lam + partner * (1.0 - lam)
    t = one_hot_smooth(labels, num_classes, label_smoothing)
    targets = t * lam + t.flip(0) * (1.0 - lam)
    return mixed, targets


def _beta(alpha: float, g: torch.Generator) -> float:
    # torch's Beta/Gamma samplers take no generator: seed numpy's Beta from the generator.
    import numpy as np
    seed = int(torch.randint(0, 2 ** 62, (), generator=g))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


@dataclass
class MixupCutmix:
    """Batch-level Mixup/CutMix (see :func:`mixup_cutmix`), usable as a DataLoader
    ``collate_fn`` (``collate(samples)`` stacks then mixes) or called on a batch."""

    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.0
    generator: Optional[torch.Generator] = field(default=None, repr=False)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        return mixup_cutmix(images, labels, self.num_classes, self.mixup_alpha, self.cutmix_alpha,
                            self.prob, self.switch_prob, self.label_smoothing, self.generator)

    def collate(self, samples):
        from torch.utils.data import default_collate
        images, labels = default_collate(samples)
        return self(images, labels)
