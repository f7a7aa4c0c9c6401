"""Training configuration (:class:`TrainConfig`) and the named presets.

The ``cifar10``, ``cifar100`` and ``flowers102`` presets carry the hyper-parameters of the reference
CCT recipes (SHI-Labs/Compact-Transformers, ``configs/pretrained/cct_7-3x1_cifar10_300epochs.yml``,
``configs/pretrained/cct_7-3x1_cifar100_300epochs.yml`` and
``configs/pretrained/cct_7-7x2_flowers102.yml``, trained with the reference's timm-based
``train.py``). Their schedule is timm's: linear warm-up from ``warmup_lr`` to ``lr`` over
``warmup_epochs``, cosine from ``lr`` to ``min_lr`` over the remaining ``epochs``, then
``cooldown_epochs`` more epochs at ``min_lr`` (so the reference trains 300 + 10 epochs).
The ``digits`` and ``fashion-mnist`` presets are this project's own, tuned for quick CPU runs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from cctk.data import canonical_name
from cctk.errors import ConfigError


def _opt(default, help: str):
    """A dataclass field with its command-line help text (``cctk train --help`` shows it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything one training run needs; ``dataclasses.asdict(config)`` is stored in every
    checkpoint and in ``metrics.json``.

    Learning rate at optimiser step s (``S`` steps per epoch, ``W = warmup_epochs*S``,
    ``C = epochs*S``)::

        lr(s) = warmup_lr + (lr - warmup_lr) * s / W                       s < W
        lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * (s - W) / (C - W))) / 2   W <= s < C
        lr(s) = min_lr                                                     s >= C (cool-down)

    Training runs ``epochs + cooldown_epochs`` epochs in all. ``batch_size`` is per process
    (as in timm/torchrun). Loss: cross-entropy with label smoothing eps on (possibly mixed)
    soft targets t: ``L = -sum_c ((1-eps) t_c + eps/K) log softmax(z)_c``.
    """

    # what to train
    model: Optional[str] = _opt(None, "model name (`cctk models`); default: the dataset's default model")
    dataset: str = _opt("digits", "dataset: digits, fashion-mnist, cifar10, cifar100, flowers102, synthetic")
    data_dir: Optional[str] = _opt(None, "directory holding the dataset files (datasets other than digits/synthetic)")
    dataset_options: Optional[Dict[str, Any]] = _opt(None, "dataset-specific options for cctk.data.get_dataset, e.g. synthetic num_samples/num_classes/in_channels/seed/noise, digits test_fraction/seed")
    download: bool = _opt(False, "download the dataset into data_dir when missing (needs internet)")
    img_size: Optional[int] = _opt(None, "image side in pixels; default: the dataset's native size")
    positional_embedding: Optional[str] = _opt(None, "learnable, sine or none; default: the model's")
    # schedule / optimiser (AdamW)
    epochs: int = _opt(30, "epochs of warm-up + cosine schedule")
    cooldown_epochs: int = _opt(0, "extra epochs at min_lr after the cosine (reference: 10)")
    batch_size: int = _opt(64, "training batch size per process")
    eval_batch_size: Optional[int] = _opt(None, "evaluation batch size; default: 2 * batch_size")
    lr: float = _opt(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.05, "AdamW weight decay (not applied to biases, norms, 1-d params)")
    betas: Tuple[float, float] = _opt((0.9, 0.999), "AdamW betas")
    warmup_epochs: float = _opt(1.0, "epochs of linear warm-up from warmup_lr to lr (per step)")
    warmup_lr: float = _opt(1e-6, "learning rate at step 0")
    min_lr: float = _opt(1e-5, "learning rate at the end of the cosine")
    label_smoothing: float = _opt(0.1, "label smoothing eps of the cross-entropy")
    clip_grad: Optional[float] = _opt(None, "clip the global L2 norm of the gradients to this; none: off")
    amp: str = _opt("auto", "mixed precision: auto (bf16 on CUDA, off on CPU), bf16, fp16 (CUDA), off")
    # augmentation (cctk.data applies it to the training split only)
    augment: Optional[str] = _opt(None, "cctk.data augmentation preset, specialised per dataset: none, basic (crop + flip where label-preserving), randaugment, reference; default: none")
    crop: Optional[str] = _opt(None, "explicit crop: pad (zero-pad + random crop) or resized (RandomResizedCrop)")
    crop_scale: Optional[Tuple[float, float]] = _opt(None, "area range of the resized crop (cctk.data default 0.08 1)")
    hflip: Optional[float] = _opt(None, "explicit horizontal-flip probability")
    randaugment: Optional[str] = _opt(None, "explicit RandAugment policy, timm style, e.g. rand-m9-mstd0.5-inc1")
    random_erasing: Optional[float] = _opt(None, "explicit random-erasing probability")
    mixup: float = _opt(0.0, "mixup alpha (lambda ~ Beta(alpha, alpha)); 0: off")
    cutmix: float = _opt(0.0, "cutmix alpha; 0: off")
    mixup_prob: float = _opt(1.0, "probability of mixing a batch (mixup or cutmix)")
    mixup_switch_prob: float = _opt(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_off_epoch: int = _opt(0, "stop mixing from this epoch on; 0: never")
    # model regularisation (passed to create_model when set)
    drop_rate: Optional[float] = _opt(None, "dropout after the positional embedding and in the MLP; default: the model's (0)")
    attn_drop_rate: Optional[float] = _opt(None, "attention dropout; default: the model's (0.1)")
    drop_path_rate: Optional[float] = _opt(None, "stochastic depth rate; default: the model's (0.1)")
    # run control
    seed: int = _opt(0, "seed of model init, shuffling, augmentation, mixup and dropout")
    num_workers: int = _opt(0, "data-loader worker processes")
    cpu_threads: Optional[int] = _opt(None, "torch intra-op threads for a CPU run (restored afterwards); default: torch's (OMP_NUM_THREADS or the cores)")
    out: str = _opt("runs/cctk", "output directory (checkpoint.pt, metrics.json, metrics.jsonl)")
    eval_every: int = _opt(1, "evaluate on the test split every N epochs (and after the last)")
    save_every: int = _opt(1, "write checkpoint.pt every N epochs (and after the last)")
    train_subset: Optional[int] = _opt(None, "train on the first N training samples only")
    test_subset: Optional[int] = _opt(None, "evaluate on the first N test samples only")
    device: Optional[str] = _opt(None, "cpu, cuda, cuda:1, ...; default: cuda:LOCAL_RANK when available, else cpu")
    progress: Optional[bool] = _opt(None, "tqdm progress bars; default: on when stderr is a terminal (rank 0)")
    verbose: bool = _opt(True, "print one line per epoch (rank 0)")
    resume: Optional[str] = _opt(None, "checkpoint to continue from ('auto': <out>/checkpoint.pt)")
    overwrite: bool = _opt(False, "start a new run in an --out directory that holds one (its files are replaced); without it such a directory is refused unless --resume")

    def validate(self) -> "TrainConfig":
        """Raise :class:`ConfigError` for values that cannot work."""
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for v in (value if isinstance(value, (list, tuple)) else (value,)):
                need(not isinstance(v, float) or math.isfinite(v), f"{f.name} must be a finite number (got {v})")
        need(self.epochs >= 1, f"epochs must be >= 1 (got {self.epochs})")
        need(self.cooldown_epochs >= 0, f"cooldown_epochs must be >= 0 (got {self.cooldown_epochs})")
        need(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        need(self.eval_batch_size is None or self.eval_batch_size >= 1,
             f"eval_batch_size must be >= 1 (got {self.eval_batch_size})")
        need(self.lr > 0, f"lr must be > 0 (got {self.lr})")
        need(self.warmup_lr >= 0, f"warmup_lr must be >= 0 (got {self.warmup_lr})")
        need(0 <= self.min_lr <= self.lr, f"min_lr must lie in [0, lr = {self.lr}] (got {self.min_lr})")
        need(self.warmup_lr <= self.lr, f"warmup_lr must be <= lr = {self.lr} (got {self.warmup_lr})")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1) (got {tuple(self.betas)})")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            v = getattr(self, name)
            need(v is None or 0 <= v < 1, f"{name} must lie in [0, 1) (got {v})")
        need(self.mixup_off_epoch >= 0, f"mixup_off_epoch must be >= 0 (got {self.mixup_off_epoch})")
        need(self.crop_scale is None or (len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1),
             f"crop_scale must be two numbers 0 < a <= b <= 1 (got {self.crop_scale})")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay})")
        need(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0 (got {self.warmup_epochs})")
        need(0 <= self.label_smoothing < 1, f"label_smoothing must lie in [0, 1) (got {self.label_smoothing})")
        need(self.clip_grad is None or self.clip_grad > 0, f"clip_grad must be > 0 (got {self.clip_grad})")
        need(self.amp in ("auto", "bf16", "fp16", "off"),
             f"amp must be one of auto, bf16, fp16, off (got {self.amp!r})")
        need(self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix alphas must be >= 0")
        need(0 <= self.mixup_prob <= 1 and 0 <= self.mixup_switch_prob <= 1,
             "mixup_prob and mixup_switch_prob must lie in [0, 1]")
        need(self.random_erasing is None or 0 <= self.random_erasing <= 1,
             f"random_erasing must lie in [0, 1] (got {self.random_erasing})")
        need(self.hflip is None or 0 <= self.hflip <= 1, f"hflip must lie in [0, 1] (got {self.hflip})")
        need(self.crop in (None, "pad", "resized"), f"crop must be pad or resized (got {self.crop!r})")
        need(self.augment in (None, "none", "basic", "randaugment", "reference"),
             f"augment must be none, basic, randaugment or reference (got {self.augment!r})")
        need(self.augment in (None, "none") or not self.explicit_augment(),
             "give either an augmentation preset (augment) or explicit augmentation options "
             "(crop, crop_scale, hflip, randaugment, random_erasing), not both")
        need(self.img_size is None or self.img_size >= 1, f"img_size must be >= 1 (got {self.img_size})")
        need(self.eval_every >= 1 and self.save_every >= 1, "eval_every and save_every must be >= 1")
        need(self.num_workers >= 0, f"num_workers must be >= 0 (got {self.num_workers})")
        need(self.cpu_threads is None or self.cpu_threads >= 1,
             f"cpu_threads must be >= 1 (got {self.cpu_threads})")
        for name in ("train_subset", "test_subset"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"{name} must be >= 1 (got {v})")
        return self

    def explicit_augment(self) -> dict:
        """The explicit augmentation options that are set, as cctk.data AugmentConfig fields."""
        pairs = (("crop", self.crop), ("scale", self.crop_scale), ("hflip", self.hflip),
                 ("randaugment", self.randaugment), ("random_erasing", self.random_erasing))
        return {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in pairs if v is not None}

    def augment_spec(self):
        """The ``augment=`` argument for ``cctk.data.get_dataset`` (training split)."""
        explicit = self.explicit_augment()
        if explicit:
            return explicit
        return self.augment or "none"

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.cooldown_epochs

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """Rebuild from :meth:`to_dict` output; unknown keys are an error, tuples restored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        d = dict(d)
        if d.get("dataset_options") is not None:
            d["dataset_options"] = dict(d["dataset_options"])
        for k in ("betas", "crop_scale"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


#: What the reference recipes (SHI-Labs/Compact-Transformers configs/pretrained/*.yml) share:
#: AdamW wd 6e-2, cosine to 1e-5 after 10 warm-up epochs, 300 + 10 cool-down epochs, label
#: smoothing 0.1, AMP, RandomResizedCrop scale (0.8, 1) + flip + RandAugment rand-m9-mstd0.5-inc1,
#: Mixup 0.8 / CutMix 1.0 (prob 1, switch 0.5, per batch), no random erasing (reprob 0).
_REFERENCE_RECIPE: Dict[str, Any] = dict(
    epochs=300, cooldown_epochs=10, min_lr=1e-5, warmup_epochs=10, weight_decay=6e-2,
    label_smoothing=0.1, amp="auto",
    crop="resized", crop_scale=(0.8, 1.0), hflip=0.5, randaugment="rand-m9-mstd0.5-inc1",
    random_erasing=0.0, mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5,
    mixup_off_epoch=0,
)

#: Named presets: field overrides on top of TrainConfig's defaults.
PRESETS: Dict[str, Dict[str, Any]] = {
    # reference: configs/pretrained/cct_7-3x1_cifar100_300epochs.yml (+ configs/datasets/cifar100.yml)
    "cifar100": dict(_REFERENCE_RECIPE, model="cct_7_3x1_32", dataset="cifar100", img_size=32,
                     batch_size=128, lr=6e-4, warmup_lr=1e-6),
    # reference: configs/pretrained/cct_7-3x1_cifar10_300epochs.yml
    "cifar10": dict(_REFERENCE_RECIPE, model="cct_7_3x1_32", dataset="cifar10", img_size=32,
                    batch_size=128, lr=55e-5, warmup_lr=1e-5, mixup_off_epoch=175),
    # reference: configs/pretrained/cct_7-7x2_flowers102.yml (model cct_7-7x2_sinePE_224)
    "flowers102": dict(_REFERENCE_RECIPE, model="cct_7_7x2_224_sine", dataset="flowers102",
                       img_size=224, batch_size=96, lr=5e-4, warmup_lr=1e-6),
    # this project's quick CPU recipe: 8x8 scikit-learn digits, small CCT, no augmentation.
    # One intra-op thread: the model's ops are tiny (16 tokens x 128), so threading only adds
    # synchronisation, and on a busy machine 2 threads per op were 16x slower than 1.
    "digits": dict(
        dataset="digits", epochs=30, batch_size=32, lr=2e-3, min_lr=1e-5,
        warmup_epochs=2, warmup_lr=1e-5, weight_decay=0.05, label_smoothing=0.1,
        augment="none", mixup=0.0, cutmix=0.0, cpu_threads=1,
    ),
    # this project's CPU recipe for 28x28 Fashion-MNIST (default model cct_2_3x2_28); not tuned
    # for accuracy yet: one epoch is 469 steps of ~19 GFLOP, minutes on a 2-core CPU
    "fashion-mnist": dict(
        dataset="fashion-mnist", epochs=10, batch_size=128, lr=1e-3, min_lr=1e-5,
        warmup_epochs=2, warmup_lr=1e-5, weight_decay=0.05, label_smoothing=0.1,
        augment="none", mixup=0.0, cutmix=0.0,
    ),
}


def list_presets() -> List[str]:
    return sorted(PRESETS)


def get_preset(name: str, **overrides) -> TrainConfig:
    """The named preset as a :class:`TrainConfig`, with ``overrides`` applied on top."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    fields = dict(PRESETS[name])
    fields.update(overrides)
    return TrainConfig.from_dict(fields)


def preset_for_dataset(dataset: str) -> Optional[str]:
    """The preset whose dataset is ``dataset`` (used for CLI defaults), or None. Spelling
    variants cctk.data accepts ("CIFAR-100", "fmnist") find the same preset."""
    try:
        dataset = canonical_name(dataset)
    except Exception:  # unknown name: no preset; the run itself reports the bad name
        pass
    return dataset if dataset in PRESETS else None
