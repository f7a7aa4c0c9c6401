"""The study's settings: :class:`StudyConfig`, the question fixed before the run
(:data:`PRIMARY`), what a resumed study must share with the first sitting, and how a
``study_config.json`` written by an older cctk reads (:data:`LEGACY_DEFAULTS`: the settings that
did not exist then, at the values that older cctk used)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Sequence

from cctk import data
from cctk import snp as snp_mod
from cctk.errors import ConfigError
from cctk.experiments.pipeline import CLASSIFIER_SCAN, DEFAULT_BLOCK_SIZE
from cctk.prune.andc import TOKEN_SETS, V_SETS, AndcRule
from cctk.prune.masks import BLOCK_SCORES
from cctk.prune.plan import DEFAULT_QKV_BUDGET, QKV_BUDGETS
from cctk.prune.pruner import ALL_METHODS, METHODS, method_rule
from cctk.train import CHECKPOINT_NAME

__all__ = ["PRIMARY", "SNP_VARIANT_READOUTS", "SNP_VARIANT_THRESHOLDS", "StudyConfig", "LEGACY_DEFAULTS",
           "FIXED_KEYS", "TRAINING_KEYS", "RULE_FIELDS", "resumable_dict", "load_config", "check_resumable", "block_size"]

PRIMARY = {"method": "andc", "baseline": "magnitude", "density": 0.25,
           "statistic": "test accuracy after fine-tuning, method minus baseline, paired by seed, 95% CI"}
SNP_VARIANT_READOUTS = ("adam", "sgd")
SNP_VARIANT_THRESHOLDS = (0.2, 0.3, 0.5)

#: the ANDC rule's choices each results.csv row records (empty for methods without a label-set rule)
RULE_FIELDS = ("block_score", "v_sets", "token_sets")
#: settings a study_config.json of an older cctk lacks, at the values that cctk used: the first
#: ANDC rule (summed overlap, head sets for v rows, token channels assumed to recognise every label)
LEGACY_DEFAULTS = {"block_score": "sum", "v_sets": "head", "token_sets": "assume-all", "models_from": None,
                   "compare_with": None, "qkv_budget": "fused"}


@dataclasses.dataclass
class StudyConfig:
    out: str
    dataset: str = "digits"
    seeds: Sequence[int] = (0, 1, 2)
    densities: Sequence[float] = (0.5, 0.25, 0.125)
    methods: Sequence[str] = ALL_METHODS
    finetune_epochs: int = 1
    finetune_subset: Optional[int] = None   # fine-tune on the training part's first N images
    lr: float = 1e-3
    model: Optional[str] = None
    epochs: Optional[int] = None            # training epochs (None: the preset's)
    block_size: Optional[int] = None
    train_subset: Optional[int] = None      # the training pool (train + validation)
    test_subset: Optional[int] = None
    val_size: int = 500
    threshold: float = 0.3
    readout_epochs: int = 10
    readout_optimizer: str = "adam"
    classifier_scan: Sequence[float] = CLASSIFIER_SCAN
    classifier_tolerance: float = 0.005
    calibration_images: int = 256
    bench_batch: int = 32
    bench_rounds: int = 3
    bench_dtype: str = "float32"
    workers: int = 1                        # processes running cells (images/s timed after, quietly)
    time_only: bool = False                 # run no cell: time finished cells lacking images/s, summarise
    retime: bool = False                    # with time_only: time every finished cell again
    checkpoints: Optional[Sequence[str]] = None
    models_from: Optional[Sequence[str]] = None   # study directories whose seed{s}/train models to reuse
    compare_with: Optional[str] = None      # another study (e.g. another fine-tune budget, same models): the
                                            # summary compares each paired difference with its one there
    snp_variants: bool = False              # also SNP with both readouts x SNP_VARIANT_THRESHOLDS
    # the ANDC rule of the label-set methods (SCIENCE.md 5; the andc-old* methods fix their own)
    block_score: str = "kept-fraction"
    qkv_budget: str = DEFAULT_QKV_BUDGET    # a fused qkv's density met by q, k, v each, or over the layer
    v_sets: str = "node"
    token_sets: str = "measured"
    data_dir: Optional[str] = None
    device: Optional[str] = None
    progress: bool = True
    verbose: bool = True

    def rule(self) -> AndcRule:
        """The ANDC rule the study's label-set methods use (each method may fix choices of its own)."""
        return AndcRule(block_score=self.block_score, v_sets=self.v_sets, token_sets=self.token_sets)

    def needs_token_sets(self) -> bool:
        """Whether some method of the study reads measured token label sets."""
        rules = [method_rule(m, self.rule()) for m in self.methods if m in METHODS]
        return any(r is not None and r.token_sets == "measured" for r in rules)

    def check(self) -> None:
        """Raise ConfigError for a bad option (before anything is written)."""
        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)
        need(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), f"seeds must be distinct, got {list(self.seeds)}")
        need(len(self.densities) >= 1 and all(0 < d <= 1 for d in self.densities),
             f"densities must lie in (0, 1], got {list(self.densities)}")
        bad = [m for m in self.methods if m not in METHODS]
        need(not bad, f"unknown method(s) {bad}; choose from {', '.join(METHODS)} or 'all' ({', '.join(ALL_METHODS)})")
        need(len(self.methods) >= 1 and len(set(self.methods)) == len(self.methods), "methods must be distinct and non-empty")
        need(self.finetune_epochs >= 0, f"finetune epochs must be >= 0, got {self.finetune_epochs}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.finetune_subset is None or self.finetune_subset >= 1, "finetune subset must be >= 1")
        need(self.val_size >= 10, f"val size must be >= 10, got {self.val_size}")
        need(self.train_subset is None or self.train_subset > self.val_size,
             f"train subset ({self.train_subset}) must exceed the validation size ({self.val_size})")
        need(self.test_subset is None or self.test_subset >= 1, "test subset must be >= 1")
        need(self.block_size is None or self.block_size >= 1, "block size must be >= 1")
        need(0 <= self.threshold < 1, f"threshold must lie in [0, 1), got {self.threshold}")
        need(self.readout_optimizer in snp_mod.ReadoutConfig.OPTIMIZERS,
             f"readout optimizer must be one of {snp_mod.ReadoutConfig.OPTIMIZERS}")
        need(self.classifier_tolerance >= 0, "classifier tolerance must be >= 0")
        need(self.calibration_images >= 1 and self.bench_batch >= 1 and self.bench_rounds >= 1,
             "calibration images, bench batch and bench rounds must be >= 1")
        need(1 <= self.workers <= 64, f"workers must lie in [1, 64], got {self.workers}")
        need(not self.retime or self.time_only, "--retime goes with --time-only (it times finished cells, runs none)")
        need(self.bench_dtype in ("float32", "bfloat16", "float16"), f"bench dtype {self.bench_dtype!r}")
        need(self.block_score in BLOCK_SCORES, f"block score must be one of {', '.join(BLOCK_SCORES)}")
        need(self.v_sets in V_SETS, f"v sets must be one of {', '.join(V_SETS)}")
        need(self.token_sets in TOKEN_SETS, f"token sets must be one of {', '.join(TOKEN_SETS)}")
        need(self.qkv_budget in QKV_BUDGETS, f"qkv budget must be one of {', '.join(QKV_BUDGETS)}")
        need(self.checkpoints is None or len(self.checkpoints) == len(self.seeds),
             "give one checkpoint per seed")
        need(not (self.checkpoints and self.models_from), "give --checkpoints or --models-from, not both")
        for c in self.checkpoints or ():
            need(os.path.isfile(c), f"checkpoint {c} does not exist")
        need(not os.path.isfile(self.out), f"--out {self.out} is a file, not a directory")
        if self.models_from is not None:
            self._check_models_from()
        need(self.compare_with is None or os.path.isfile(os.path.join(self.compare_with, "results.csv")),
             f"--compare-with {self.compare_with} holds no study results (no results.csv)")
        try:
            data.dataset_info(self.dataset)
        except (KeyError, ValueError) as exc:
            raise ConfigError(str(exc.args[0] if exc.args else exc)) from exc
        if not self.checkpoints:
            # missing or corrupt data fails here (DataError: exit 2), before anything is written
            data.get_dataset(self.dataset, "train", data_dir=self.data_dir)

    def _check_models_from(self) -> None:
        """Every other study trained its models as this one would: same dataset, model, epochs,
        training pool and validation split (so the validation images were never trained on)."""
        mine = self.as_dict()
        for other_dir in self.models_from:
            if os.path.abspath(other_dir) == os.path.abspath(self.out):
                raise ConfigError("--models-from must name other study directories than --out")
            if not os.path.isfile(os.path.join(other_dir, "study_config.json")):
                raise ConfigError(f"--models-from {other_dir} holds no study (no study_config.json)")
            other = load_config(other_dir)
            changed = [k for k in TRAINING_KEYS if getattr(other, k) != mine[k]]
            if changed:
                raise ConfigError(f"--models-from {other_dir} trained its models with other settings "
                                  f"({', '.join(changed)}); give the same options")

    def reused_checkpoint(self, seed: int) -> Optional[str]:
        """The trained model of ``seed`` in the first ``models_from`` study that has a finished one."""
        for other_dir in self.models_from or ():
            train_dir = os.path.join(other_dir, f"seed{int(seed)}", "train")
            path = os.path.join(train_dir, CHECKPOINT_NAME)
            if os.path.isfile(path) and os.path.isfile(os.path.join(train_dir, "metrics.json")):
                return path
        return None

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("seeds", "densities", "methods", "classifier_scan", "checkpoints", "models_from"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


#: the settings a model's training depends on (``models_from`` checks them)
TRAINING_KEYS = ("dataset", "model", "epochs", "train_subset", "val_size", "data_dir")
#: the settings a resumed study must share with its first sitting (seeds, densities and methods may grow)
FIXED_KEYS = ("dataset", "model", "epochs", "block_size", "train_subset", "test_subset", "val_size", "threshold",
              "readout_epochs", "readout_optimizer", "finetune_epochs", "finetune_subset", "lr",
              "classifier_tolerance", "classifier_scan", "calibration_images", "checkpoints", "models_from",
              "block_score", "v_sets", "token_sets", "qkv_budget")


def load_config(out: str, **overrides) -> StudyConfig:
    """The StudyConfig of the study in ``out`` (its ``study_config.json``; settings an older cctk
    did not record take :data:`LEGACY_DEFAULTS`), with ``overrides``."""
    with open(os.path.join(out, "study_config.json")) as f:
        fields = json.load(f)
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    fields = {**LEGACY_DEFAULTS, **{k: v for k, v in fields.items() if k in names}, "out": out}
    fields.update(overrides)
    return StudyConfig(**fields)


def check_resumable(cfg: StudyConfig, config_path: str) -> None:
    """Refuse to resume a study whose first sitting used other fixed settings (an older
    ``study_config.json`` counts as :data:`LEGACY_DEFAULTS` for what it did not record)."""
    if not os.path.isfile(config_path):
        return
    with open(config_path) as f:
        old = {**LEGACY_DEFAULTS, **json.load(f)}
    new = cfg.as_dict()
    changed = [k for k in FIXED_KEYS if old.get(k) != new.get(k)]
    if changed:
        raise ConfigError(f"{cfg.out} holds a study with other settings ("
                          + ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in changed)
                          + "); use another --out or the same options")


def block_size(cfg: StudyConfig) -> int:
    """The study's block size: the option, else the dataset's default."""
    return cfg.block_size or DEFAULT_BLOCK_SIZE.get(data.canonical_name(cfg.dataset), 32)


def resumable_dict(cfg: StudyConfig) -> Dict[str, Any]:
    """What ``study_config.json`` records (every setting but the sitting's own)."""
    return {k: v for k, v in cfg.as_dict().items() if k not in ("progress", "verbose", "device", "out", "retime")}
