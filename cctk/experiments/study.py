"""``cctk study``: pruning as a controlled experiment (SCIENCE.md section 7).

The test the study is designed for, fixed before any number: **ANDC minus block magnitude, test
accuracy at density 0.25 after the fine-tune budget, paired by seed, 95% CI** (primary); every
other method x density against magnitude is secondary, Holm-corrected.

Per seed s (``out/seed{s}/``):

1. Data: the training split's first ``N - val_size`` samples train the model; its last
   ``val_size`` samples are the *validation* split (recorded as an index range). The test split
   is read only to report accuracies (before and after fine-tuning).
2. Model: trained with the dataset's preset recipe (``seed{s}/train``; resumable), or taken
   from ``checkpoints[s]``.
3. SNP: readouts trained on the training part, node matrices from the validation split
   (``seed{s}/snp``): the label sets every SNP-guided method uses.
4. Classifier threshold: scanned on the validation split; the largest threshold whose
   validation accuracy (dense encoder, classifier-only ANDC) is within ``classifier_tolerance``
   of the dense validation accuracy is chosen (none within: the classifier stays dense).
5. Every method x density (same fine-tune budget, lr, training images): prune, test accuracy,
   fine-tune with masks fixed, test accuracy, images/s of the pruned model through
   ``cctk.optimize`` (interleaved rounds with the dense model, fastest round).

Steps 1-4 run for every seed first; then the cells run most informative first
(:func:`cell_order`: the primary comparison for every seed, the other methods at its density,
then the other densities), with ``summary.json`` and ``report.html`` rewritten after each, so
a study stopped part-way reports what it has; ``--snp-variants`` runs after the primary
density's cells. ``workers > 1``: that many processes claim cells (one intra-op thread each on a
small CPU, where single-threaded processes side by side fine-tune faster than one process with
both threads), the SNP variants run meanwhile, and images/s are measured after the last cell with
nothing else running (:func:`_retime`: the same seed re-prunes to the same structure).
``time_only``: no new cell; the finished cells that lack images/s are timed and the summary
written (a study stopped part-way, reported with what it has).

Methods: the block scorers of :mod:`cctk.prune.scorers` (``andc``, ``magnitude``, ``wanda``,
``random``, ``andc-shuffled``: equal per-layer block densities; the non-ANDC block methods keep
as many classifier weights as ANDC's label-set rule keeps) and structured node removal
(``structured``: ranked by SNP label counts; ``structured-activation``: by activation norm;
same kept fraction of FF units and head dims, classifier dense); not in ``all``: the label-aware
magnitude ``andc-magnitude`` and the hybrid ``structured-andc`` (SNP-ranked node removal, then ANDC
blocks in the smaller model).

Outputs: ``results.csv`` (one row per seed x method x density; a finished row is never redone),
``summary.json`` (``cells`` with 95% t intervals, ``paired`` differences against magnitude with
paired t-test p-values and Holm-adjusted p-values, the validation choices per seed),
``summary.md`` (the same tables in Markdown),
``report.html`` (accuracy vs density and accuracy vs images/s with error bars).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import html
import io
import json
import math
import os
import platform
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from cctk import data
from cctk import snp as snp_mod
from cctk.checkpoint import atomic_write_text, checkpoint_provenance, load_checkpoint
from cctk.errors import ConfigError
from cctk.experiments.pipeline import CLASSIFIER_SCAN, DEFAULT_BLOCK_SIZE, Run, scan_classifier
from cctk.optimize import optimize
from cctk.timing import cpu_model, models_images_per_s, timing_machine
from cctk.prune.andc import RecognizedSets, final_stream_means, final_stream_sets
from cctk.prune.convert import convert_to_andc, density_summary, relative_linear_density
from cctk.prune.finetune import finetune
from cctk.prune.scorers import ALL_METHODS, STUDY_METHODS
from cctk.prune.workflow import calibration_batches, prune_model
from cctk.train import CHECKPOINT_NAME, TrainConfig, evaluate, get_preset, preset_for_dataset, train
from cctk.train.state import seed_everything

__all__ = ["StudyConfig", "run_study", "cell_order", "study_markdown", "summarize_results", "pareto_frontier", "holm", "PRIMARY", "RESULT_FIELDS"]

PRIMARY = {"method": "andc", "baseline": "magnitude", "density": 0.25,
           "statistic": "test accuracy after fine-tuning, method minus baseline, paired by seed, 95% CI"}
SNP_VARIANT_READOUTS = ("adam", "sgd")
SNP_VARIANT_THRESHOLDS = (0.2, 0.3, 0.5)
RESULT_FIELDS = ["seed", "method", "density", "accuracy", "accuracy_before_finetune", "images_per_s",
                 "dense_images_per_s", "linear_density", "classifier_density", "connection_keep_fraction",
                 "dense_accuracy", "classifier_threshold", "finetune_seconds", "model_digest", "timed_on"]
# columns every results.csv has (``timed_on`` came later: older files resume without it)
_REQUIRED_FIELDS = [f for f in RESULT_FIELDS if f != "timed_on"]


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
    checkpoints: Optional[Sequence[str]] = None
    snp_variants: bool = False              # also SNP with both readouts x SNP_VARIANT_THRESHOLDS
    data_dir: Optional[str] = None
    device: Optional[str] = None
    progress: bool = True
    verbose: bool = True

    def check(self) -> None:
        """Raise ConfigError for a bad option (before anything is written)."""
        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)
        need(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), f"seeds must be distinct, got {list(self.seeds)}")
        need(len(self.densities) >= 1 and all(0 < d <= 1 for d in self.densities),
             f"densities must lie in (0, 1], got {list(self.densities)}")
        bad = [m for m in self.methods if m not in STUDY_METHODS]
        need(not bad, f"unknown method(s) {bad}; choose from {', '.join(STUDY_METHODS)} or 'all' ({', '.join(ALL_METHODS)})")
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
        need(self.bench_dtype in ("float32", "bfloat16", "float16"), f"bench dtype {self.bench_dtype!r}")
        need(self.checkpoints is None or len(self.checkpoints) == len(self.seeds),
             "give one checkpoint per seed")
        for c in self.checkpoints or ():
            need(os.path.isfile(c), f"checkpoint {c} does not exist")
        need(not os.path.isfile(self.out), f"--out {self.out} is a file, not a directory")
        try:
            data.dataset_info(self.dataset)
        except (KeyError, ValueError) as exc:
            raise ConfigError(str(exc.args[0] if exc.args else exc)) from exc
        if not self.checkpoints:
            # missing or corrupt data fails here (DataError: exit 2), before anything is written
            data.get_dataset(self.dataset, "train", data_dir=self.data_dir)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("seeds", "densities", "methods", "classifier_scan", "checkpoints"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


# ---------------------------------------------------------------------------------------------
# statistics


def _t_interval(x: Sequence[float]):
    from scipy import stats
    n = len(x)
    mean = sum(x) / n
    if n < 2:
        return mean, [None, None], None
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, [mean - half, mean + half], sd


def _paired_p(diffs: Sequence[float]) -> Optional[float]:
    from scipy import stats
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in diffs) / (n - 1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    t = mean / (sd / math.sqrt(n))
    return float(2 * stats.t.sf(abs(t), n - 1))


def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm step-down adjusted p-values (None stays None)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    adj: List[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adj[i] = running
    return adj


def pareto_frontier(cells: List[dict]) -> List[dict]:
    """The cells no other cell beats on both mean accuracy and mean images/s (ties kept),
    fastest first: where each method sits on the accuracy vs speed frontier."""
    pts = [c for c in cells if c.get("images_per_s_mean") is not None]
    front = [c for c in pts if not any(o["accuracy_mean"] >= c["accuracy_mean"] and o["images_per_s_mean"] >= c["images_per_s_mean"]
                                       and (o["accuracy_mean"] > c["accuracy_mean"] or o["images_per_s_mean"] > c["images_per_s_mean"])
                                       for o in pts)]
    return [{"method": c["method"], "density": c["density"], "accuracy_mean": c["accuracy_mean"],
             "images_per_s_mean": c["images_per_s_mean"]} for c in sorted(front, key=lambda c: -c["images_per_s_mean"])]


def summarize_results(rows: List[dict], baseline: str = "magnitude") -> Dict[str, Any]:
    """``cells`` (method x density: n, mean accuracy, 95% t CI, images/s) and ``paired`` (method
    x density minus ``baseline``, paired by seed: mean diff, 95% CI, p, Holm-adjusted p)."""
    by: Dict[tuple, Dict[int, dict]] = {}
    for r in rows:
        by.setdefault((r["method"], float(r["density"])), {})[int(r["seed"])] = r
    cells = []
    for (m, d), seeds in sorted(by.items()):
        acc = [float(r["accuracy"]) for r in seeds.values()]
        mean, ci, sd = _t_interval(acc)
        ips = [float(r["images_per_s"]) for r in seeds.values() if r.get("images_per_s") not in (None, "")]
        ips_mean, ips_ci, _ = _t_interval(ips) if ips else (None, [None, None], None)
        before = [float(r["accuracy_before_finetune"]) for r in seeds.values()]
        # images/s over the dense model's, timed interleaved with it: steadier than raw
        # images/s on a shared machine
        speed = [float(r["images_per_s"]) / float(r["dense_images_per_s"]) for r in seeds.values()
                 if r.get("images_per_s") not in (None, "") and r.get("dense_images_per_s") not in (None, "", 0)]
        cells.append({"method": m, "density": d, "n": len(acc), "accuracy_mean": mean, "ci95": ci, "sd": sd,
                      "accuracy_before_finetune_mean": sum(before) / len(before),
                      "images_per_s_mean": ips_mean, "images_per_s_ci95": ips_ci,
                      "speedup_vs_dense_mean": sum(speed) / len(speed) if speed else None,
                      "linear_density_mean": sum(float(r["linear_density"]) for r in seeds.values()) / len(acc)})
    paired = []
    for (m, d), seeds in sorted(by.items()):
        if m == baseline or (baseline, d) not in by:
            continue
        base = by[(baseline, d)]
        common = sorted(set(seeds) & set(base))
        diffs = [float(seeds[s]["accuracy"]) - float(base[s]["accuracy"]) for s in common]
        if not diffs:
            continue
        mean, ci, _ = _t_interval(diffs)
        primary = (m == PRIMARY["method"] and baseline == PRIMARY["baseline"] and abs(d - PRIMARY["density"]) < 1e-9)
        paired.append({"method": m, "baseline": baseline, "density": d, "n": len(diffs), "seeds": common,
                       "mean_diff": mean, "ci95": ci, "p_value": _paired_p(diffs), "primary": primary})
    secondary = [p for p in paired if not p["primary"]]
    for p, a in zip(secondary, holm([p["p_value"] for p in secondary])):
        p["p_holm"] = a
    for p in paired:
        if p["primary"]:
            p["p_holm"] = p["p_value"]  # the one question fixed in advance: no correction
    return {"cells": cells, "paired": paired, "frontier": pareto_frontier(cells),
            "multiple_comparisons": "Holm step-down over the secondary comparisons (every method x "
                                    "density against the baseline except the primary one); p-values "
                                    "from two-sided paired t-tests over seeds"}


# ---------------------------------------------------------------------------------------------
# the per-seed steps


class _Study:
    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.B = cfg.block_size or DEFAULT_BLOCK_SIZE.get(data.canonical_name(cfg.dataset), 32)
        self.say = print if cfg.verbose else (lambda *a, **k: None)

    # -- data and model --------------------------------------------------------------------
    def _pool_size(self, record) -> int:
        n = len(data.from_record(record, "train", data_dir=self.cfg.data_dir))
        return min(n, self.cfg.train_subset) if self.cfg.train_subset else n

    def model_for_seed(self, seed: int, seed_dir: str):
        cfg = self.cfg
        ckpt_path = self.checkpoint_path(seed, seed_dir)
        if cfg.checkpoints:
            model, ckpt = load_checkpoint(ckpt_path, map_location="cpu")
            return model, ckpt, "checkpoint"
        train_dir = os.path.dirname(ckpt_path)
        if not os.path.isfile(os.path.join(train_dir, "metrics.json")):
            probe = {"name": data.canonical_name(cfg.dataset), "data_dir": cfg.data_dir}
            pool = self._pool_size(probe)
            if pool <= cfg.val_size:
                raise ConfigError(f"the training split has {pool} samples; the validation split needs fewer "
                                  f"than that (val size {cfg.val_size})")
            fields: Dict[str, Any] = dict(out=train_dir, seed=seed, data_dir=cfg.data_dir, device=str(self.device),
                                          verbose=cfg.verbose, progress=cfg.progress,
                                          train_subset=pool - cfg.val_size, test_subset=cfg.test_subset,
                                          # the test split is read once, after the last epoch (no
                                          # per-epoch test accuracy for anyone to look at)
                                          eval_every=10 ** 6)
            if os.path.isfile(ckpt_path):
                fields["resume"] = "auto"
            if cfg.epochs is not None:
                fields["epochs"] = cfg.epochs
            if cfg.model is not None:
                fields["model"] = cfg.model
            preset = preset_for_dataset(data.canonical_name(cfg.dataset))
            tc = get_preset(preset, **fields) if preset else TrainConfig(dataset=cfg.dataset, **fields)
            self.say(f"[seed {seed}] training {tc.model or 'the default model'} on {cfg.dataset} "
                     f"({pool - cfg.val_size} training images, {tc.epochs} epochs)", flush=True)
            train(tc)
        model, ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        return model, ckpt, "trained"

    def splits(self, ckpt):
        """(train part, validation, test) datasets and the validation's index range."""
        cfg, record = self.cfg, ckpt["dataset"]
        full = data.from_record(record, "train", data_dir=cfg.data_dir)
        pool = min(len(full), cfg.train_subset) if cfg.train_subset else len(full)
        trained_on = ckpt.get("dataset", {}).get("train_subset") or (ckpt.get("metrics") or {}).get("train_subset")
        n_train = pool - cfg.val_size
        if n_train < 1:
            raise ConfigError(f"the training split has {pool} samples, too few for a validation split of {cfg.val_size}")
        train_part = _range_subset(full, 0, n_train)
        val = _range_subset(full, n_train, pool)
        test = data.from_record(record, "eval", data_dir=cfg.data_dir, subset=cfg.test_subset)
        overlap = trained_on is None or int(trained_on) > n_train
        return train_part, val, test, {"split": "train", "start": n_train, "stop": pool,
                                       "seen_in_training": bool(overlap) if cfg.checkpoints else False}

    # -- SNP and validation choices --------------------------------------------------------
    def checkpoint_path(self, seed: int, seed_dir: str) -> str:
        cfg = self.cfg
        return cfg.checkpoints[list(cfg.seeds).index(seed)] if cfg.checkpoints else os.path.join(seed_dir, "train", CHECKPOINT_NAME)

    def snp_for_seed(self, seed, seed_dir, model, train_loader, val_loader, num_classes):
        snp_dir = os.path.join(seed_dir, "snp")
        if not os.path.isfile(os.path.join(snp_dir, "snp.json")):
            self.say(f"[seed {seed}] SNP: readouts on the training part, matrices on validation", flush=True)
            # the checkpoint's digest, as `cctk snp` records it: `cctk prune --snp` takes this directory
            res = snp_mod.run_snp(model, train_loader, val_loader, num_classes, threshold=self.cfg.threshold,
                                  readout_epochs=self.cfg.readout_epochs, readout_optimizer=self.cfg.readout_optimizer,
                                  null_draws=100, seed=seed, device=self.device, split="validation",
                                  dataset=self.cfg.dataset,
                                  extra_config=checkpoint_provenance(self.checkpoint_path(seed, seed_dir)))
            snp_mod.save(res, snp_dir, plots=False)
        return RecognizedSets.from_snp(snp_dir, num_blocks=model.num_blocks), snp_dir

    def snp_variants(self, seed, seed_dir, model, train_loader, val_loader, num_classes) -> dict:
        """SNP of the same model with both readouts (cctk's Adam, the group's SGD without bias)
        at every threshold of SNP_VARIANT_THRESHOLDS, matrices on validation: per block and group
        the readout accuracy, cluster size, noise per node (the group's primitives) and SNR."""
        out = {}
        keys = ("readout_accuracy", "mean_cluster_size", "mean_noise", "snr", "frac_no_cluster")
        for opt in SNP_VARIANT_READOUTS:
            vdirs = {theta: os.path.join(seed_dir, "snp_variants", f"{opt}_theta{theta}") for theta in SNP_VARIANT_THRESHOLDS}
            todo = [t for t, d in vdirs.items() if not os.path.isfile(os.path.join(d, "snp.json"))]
            if todo:   # one measurement per readout, analysed at every threshold still missing
                results = snp_mod.run_snp_thresholds(
                    model, train_loader, val_loader, num_classes, todo, readout_epochs=self.cfg.readout_epochs,
                    readout_optimizer=opt, null_draws=100, seed=seed, device=self.device, split="validation",
                    dataset=self.cfg.dataset)
                for theta in todo:
                    snp_mod.save(results[theta], vdirs[theta], plots=False)
            for theta, vdir in vdirs.items():
                summ = snp_mod.load_snp(vdir).summary
                out[f"{opt}_theta{theta}"] = {"readout": opt, "threshold": theta,
                                              "blocks": [{g: {k: blk[g].get(k) for k in keys} for g in ("mha", "ff")}
                                                         for blk in summ["blocks"]]}
        return out

    def choose_classifier(self, model, val_loader, num_classes):
        """The classifier threshold chosen on validation data (see the module doc)."""
        run = Run(out_dir=self.cfg.out, dataset=self.cfg.dataset, device=self.device, verbose=False)
        run.model, run.num_classes = model, num_classes
        run.analysed_loader = run.test_loader = val_loader   # both validation: no test image
        scan_classifier(run, self.B, self.cfg.classifier_scan, classifier_threshold=None)
        dense_val = evaluate(model.to(self.device), val_loader, self.device)["accuracy"]
        ok = [r for r in run.scan_rows if r["accuracy"] >= dense_val - self.cfg.classifier_tolerance]
        chosen = max(ok, key=lambda r: r["threshold"])["threshold"] if ok else None
        sets = None
        if chosen is not None:
            sets = final_stream_sets(model, final_stream_means(model, val_loader, num_classes, self.device), chosen)
        return chosen, sets, {"threshold": chosen, "chosen_on": "validation", "tolerance": self.cfg.classifier_tolerance,
                              "rule": "largest threshold whose validation accuracy is within tolerance of dense",
                              "dense_validation_accuracy": dense_val, "scan": run.scan_rows}

    # -- one cell ----------------------------------------------------------------------------
    def prune(self, method, density, seed, model, sets, cls_sets, calib):
        """One method at one density through :func:`cctk.prune.workflow.prune_model`: the
        classifier pruned by the label-set rule at the threshold chosen on validation (none
        chosen: dense for every method)."""
        pruned, plan = prune_model(model, method, sets, block_size=self.B, density=density,
                                   classifier=cls_sets is not None, classifier_sets=cls_sets,
                                   calibration=calib, seed=seed, device=self.device)
        keep = None
        if plan.layer_stats:   # ANDC-type: the kept-connection fraction, weighted by layer size
            sizes = {n: pruned.get_submodule(n).weight.numel() for n in plan.layer_stats}
            keep = sum(plan.layer_stats[n]["connection_keep_fraction"] * sizes[n] for n in sizes) / sum(sizes.values())
        return (pruned, relative_linear_density(model, pruned), density_summary(pruned)["classifier_density"], keep)

    def throughput(self, pruned, dense, example):
        dtype = getattr(torch, self.cfg.bench_dtype)
        fast, fast_dense = optimize(pruned, dtype), optimize(dense, dtype)
        x = example.to(self.device, dtype)
        # interleaved rounds, fastest of each (cctk.timing): pruned and dense see the same machine
        r = models_images_per_s({"pruned": fast, "dense": fast_dense}, x, rounds=self.cfg.bench_rounds)
        return r["pruned"]["images_per_s"], r["dense"]["images_per_s"], timing_machine(self.device)


def model_digest(model: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of every tensor of the state dict (weights, masks), in order:
    the fine-tuned model's fingerprint (no decision may depend on the test labels: tested)."""
    import hashlib
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.dtype != torch.bool else t.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _range_subset(dataset, start: int, stop: int):
    from torch.utils.data import Subset
    sub = Subset(dataset, range(start, stop))
    for attr in ("num_classes", "in_channels", "img_size", "classes"):
        if hasattr(dataset, attr):
            setattr(sub, attr, getattr(dataset, attr))
    return sub


def _read_rows(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if set(_REQUIRED_FIELDS) - set(r):
            raise ConfigError(f"{path} is not a cctk study results file (columns {list(r)}); choose another --out")
    return rows


def _write_rows(path: str, rows: List[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in RESULT_FIELDS})
    atomic_write_text(buf.getvalue(), path)


def _cell_key(seed, method, density):
    return (int(seed), str(method), round(float(density), 6))


def run_study(cfg: StudyConfig) -> Dict[str, Any]:
    """Run (or resume) the study; returns the summary dict (also ``out/summary.json``)."""
    cfg.check()
    os.makedirs(cfg.out, exist_ok=True)
    config_path = os.path.join(cfg.out, "study_config.json")
    resumable = {k: v for k, v in cfg.as_dict().items() if k not in ("progress", "verbose", "device", "out")}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            old = json.load(f)
        fixed = ("dataset", "model", "epochs", "block_size", "train_subset", "test_subset", "val_size", "threshold",
                 "readout_epochs", "readout_optimizer", "finetune_epochs", "finetune_subset", "lr", "classifier_tolerance",
                 "classifier_scan", "calibration_images", "checkpoints")
        changed = [k for k in fixed if old.get(k) != resumable.get(k)]
        if changed:
            raise ConfigError(f"{cfg.out} holds a study with other settings ({', '.join(changed)}); "
                              "use another --out or the same options")
        # seeds, densities and methods may grow: new cells are added, finished ones kept
    atomic_write_text(json.dumps(resumable, indent=1) + "\n", config_path)
    st = _Study(cfg)
    preset = preset_for_dataset(data.canonical_name(cfg.dataset))
    threads = get_preset(preset).cpu_threads if preset is not None else None
    threads_before = torch.get_num_threads()
    if threads is not None and st.device.type == "cpu":
        torch.set_num_threads(int(threads))  # the preset's (digits: 1, faster for its tiny ops)
    try:
        return _run_cells(cfg, st, t0=time.perf_counter())
    finally:
        torch.set_num_threads(threads_before)


def _tier(cell) -> int:
    """0: the primary comparison; 1: the other methods at the primary density; 2: the rest."""
    _, method, d = cell
    if d != round(float(PRIMARY["density"]), 6):
        return 2
    return 0 if method in (PRIMARY["method"], PRIMARY["baseline"]) else 1


def cell_order(cfg: StudyConfig, cells) -> List[tuple]:
    """The order the study runs its cells in, most informative first, so that a study stopped
    part-way has answered what matters most: the primary comparison (PRIMARY's method and
    baseline at its density, every seed), then the other methods at that density, then the other
    densities; within a tier method by method (every seed of a method before the next method).
    Every cell restarts from its seed's RNG state, so the order never changes a result."""
    dens = [round(float(d), 6) for d in cfg.densities]
    methods, seeds = list(cfg.methods), [int(s) for s in cfg.seeds]
    return sorted(cells, key=lambda c: (_tier(c), dens.index(c[2]), methods.index(c[1]), seeds.index(c[0])))


def _prepare_seed(cfg: StudyConfig, st: "_Study", seed: int) -> Dict[str, Any]:
    """Everything a seed's cells share: its trained model, loaders, calibration images, SNP
    label sets and the classifier threshold (both chosen on validation), the dense test accuracy."""
    seed_dir = os.path.join(cfg.out, f"seed{seed}")
    model, ckpt, source = st.model_for_seed(seed, seed_dir)
    model = model.to(st.device).eval()
    train_part, val, test, val_info = st.splits(ckpt)
    num_classes = train_part.num_classes
    ft_part = (train_part if cfg.finetune_subset is None
               else _range_subset(train_part, 0, min(len(train_part), cfg.finetune_subset)))
    p = dict(seed_dir=seed_dir, model=model, source=source, val_info=val_info, num_classes=num_classes,
             train_loader=data.build_loader(ft_part, 64, shuffle=True, seed=seed),
             train_plain=data.build_loader(train_part, 256, shuffle=False),
             val_loader=data.build_loader(val, 256, shuffle=False),
             test_loader=data.build_loader(test, 256, shuffle=False),
             example=next(iter(data.build_loader(test, cfg.bench_batch, shuffle=False)))[0])
    p["calib"] = calibration_batches(train_part, cfg.calibration_images)
    p["sets"], p["snp_dir"] = st.snp_for_seed(seed, seed_dir, model, p["train_plain"], p["val_loader"], num_classes)
    p["threshold"], p["cls_sets"], p["cls_info"] = st.choose_classifier(model, p["val_loader"], num_classes)
    p["dense_acc"] = evaluate(model, p["test_loader"], st.device)["accuracy"]
    st.say(f"[seed {seed}] dense test accuracy {p['dense_acc']:.4f}; classifier threshold "
           f"{p['threshold']} (chosen on validation)", flush=True)
    return p


@contextlib.contextmanager
def _results_lock(out: str):
    """An exclusive lock on the study's results (``out/.study.lock``): every read-merge-write of
    results.csv holds it, so processes sharing ``out`` never lose each other's rows."""
    with open(os.path.join(out, ".study.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _claim(out: str, key) -> Optional[Any]:
    """Claim a cell for this process (a non-blocking flock on ``out/.claims/<cell>``; the OS drops
    it if the process dies, so an interrupted cell is claimable again); None if another holds it."""
    d = os.path.join(out, ".claims")
    os.makedirs(d, exist_ok=True)
    f = open(os.path.join(d, f"seed{key[0]}_{key[1]}_{key[2]}"), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _merge_row(path: str, row: dict) -> List[dict]:
    """Add (or replace) one cell's row in results.csv, re-read under the lock; returns all rows."""
    with _results_lock(os.path.dirname(path) or "."):
        rows, key = _read_rows(path), _cell_key(row["seed"], row["method"], row["density"])
        at = [i for i, r in enumerate(rows) if _cell_key(r["seed"], r["method"], r["density"]) == key]
        if at:
            rows[at[0]] = row   # in place: the file's row order is the order the cells finished
        else:
            rows.append(row)
        _write_rows(path, rows)
    return rows


def _read_seeds_info(path: str) -> Dict[str, Any]:
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _prepare_seeds(cfg: StudyConfig, st: "_Study", seeds, seeds_info: Dict[str, Any], info_path: str) -> Dict[int, Dict[str, Any]]:
    prep: Dict[int, Dict[str, Any]] = {}
    for seed in seeds:
        p = prep[seed] = _prepare_seed(cfg, st, seed)
        old = seeds_info.get(str(seed)) or {}
        seeds_info[str(seed)] = {"model_source": p["source"], "validation": p["val_info"], "classifier": p["cls_info"],
                                 "dense_test_accuracy": p["dense_acc"], "snp_dir": os.path.abspath(p["snp_dir"]),
                                 "model": p["model"].config.get("name") if hasattr(p["model"], "config") else None,
                                 "snp_variants": old.get("snp_variants")}
        atomic_write_text(json.dumps(seeds_info, indent=1) + "\n", info_path)
    return prep


def _prune_cell(st: "_Study", p: Dict[str, Any], seed: int, method: str, density: float):
    """A cell's pruned model (on the study's device), its linear and classifier densities and
    kept-connection fraction. Every cell of a seed starts from the same RNG state: a resumed study
    equals an uninterrupted one, the methods share the fine-tune's randomness (paired), and the
    timing pass rebuilds the same structure."""
    seed_everything(seed)
    pruned, lin_d, cls_d, keep = st.prune(method, density, seed, p["model"], p["sets"], p["cls_sets"], p["calib"])
    return pruned.to(st.device), lin_d, cls_d, keep


def _time_pruned(st: "_Study", p: Dict[str, Any], pruned) -> tuple:
    """(pruned images/s, dense images/s, where they were timed); block-masked layers become
    ANDCLinear first (node removal alone: none)."""
    convert_to_andc(pruned)
    return st.throughput(pruned, p["model"], p["example"])


def _run_cell(cfg: StudyConfig, st: "_Study", p: Dict[str, Any], seed: int, method: str, density: float,
              timing: bool = True) -> dict:
    """One cell: prune, test accuracy, fine-tune (masks fixed), test accuracy, images/s (``timing``
    False: left empty for :func:`_retime`, which times the same structure on a quiet machine)."""
    pruned, lin_d, cls_d, keep = _prune_cell(st, p, seed, method, density)
    acc0 = evaluate(pruned, p["test_loader"], st.device)["accuracy"]
    t1 = time.perf_counter()
    finetune(pruned, p["train_loader"], epochs=cfg.finetune_epochs, lr=cfg.lr, device=st.device)
    ft_s = time.perf_counter() - t1
    acc = evaluate(pruned, p["test_loader"], st.device)["accuracy"]
    digest = model_digest(pruned)
    ips, dense_ips, timed_on = _time_pruned(st, p, pruned) if timing else (None, None, None)
    return {"seed": seed, "method": method, "density": density, "accuracy": acc,
            "accuracy_before_finetune": acc0, "images_per_s": ips, "dense_images_per_s": dense_ips,
            "linear_density": lin_d, "classifier_density": cls_d, "connection_keep_fraction": keep,
            "dense_accuracy": p["dense_acc"], "classifier_threshold": p["threshold"],
            "finetune_seconds": ft_s, "model_digest": digest, "timed_on": timed_on}


def _cells(cfg: StudyConfig) -> List[tuple]:
    """Every cell of the study: seed x method x density."""
    return [_cell_key(s, m, d) for s in cfg.seeds for m in cfg.methods for d in cfg.densities]


def _done(rows: List[dict]) -> set:
    return {_cell_key(r["seed"], r["method"], r["density"]) for r in rows}


def _todo(cfg: StudyConfig, rows: List[dict]) -> List[tuple]:
    done = _done(rows)
    return cell_order(cfg, [c for c in _cells(cfg) if c not in done])


def _work_cells(cfg: StudyConfig, st: "_Study", prep: Dict[int, Dict[str, Any]], seeds_info: Dict[str, Any],
                t0: float, timing: bool = True, before_tier2=None, bar=None) -> None:
    """Run every unfinished cell this process can claim, most informative first; each finished
    row is merged into results.csv (under the lock) and the summary rewritten before the next."""
    results_path = os.path.join(cfg.out, "results.csv")
    for key in _todo(cfg, _read_rows(results_path)):
        seed, method, density = key
        if before_tier2 is not None and _tier(key) == 2:
            before_tier2()
            before_tier2 = None
        claim = _claim(cfg.out, key)
        if claim is None:
            continue   # another process of this study is running the cell
        try:
            if key in _done(_read_rows(results_path)):
                continue   # finished by another process meanwhile
            if seed not in prep:   # a worker prepares a seed when it first needs one (all on disk)
                prep[seed] = _prepare_seed(cfg, st, seed)
            if bar is not None:
                bar.set_postfix_str(f"seed {seed} {method} {density}")
            row = _run_cell(cfg, st, prep[seed], seed, method, density, timing=timing)
            rows = _merge_row(results_path, row)   # a finished cell is on disk before the next starts
        finally:
            claim.close()
        if bar is not None:
            bar.update(1)
        ips = "images/s timed after the cells" if row["images_per_s"] is None else f"{row['images_per_s']:.0f} images/s"
        st.say(f"[cell] seed {seed} {method} {density}: accuracy {row['accuracy']:.4f} "
               f"(before fine-tune {row['accuracy_before_finetune']:.4f}), {ips}", flush=True)
        # the summary and report follow every cell: a study stopped part-way reports what it has
        write_summary(cfg, rows, seeds_info, time.perf_counter() - t0)


def _cell_worker(cfg: StudyConfig, threads: int) -> None:
    """A ``--workers`` process: its own intra-op threads, every claimable cell, no timing."""
    torch.set_num_threads(threads)
    st = _Study(cfg)
    seeds_info = _read_seeds_info(os.path.join(cfg.out, "seeds.json"))
    _work_cells(cfg, st, {}, seeds_info, t0=time.perf_counter(), timing=False)


def _rebuild_cell(st: "_Study", p: Dict[str, Any], row: dict):
    """A finished cell's pruned structure again, for timing: same seed, same RNG state, so the
    same masks and widths (checked against the row's linear density); the weights are not
    fine-tuned (speed does not depend on them)."""
    seed, method, density = _cell_key(row["seed"], row["method"], row["density"])
    pruned, lin_d, _, _ = _prune_cell(st, p, seed, method, density)
    if abs(lin_d - float(row["linear_density"])) > 1e-9:
        raise RuntimeError(f"re-pruning cell {(seed, method, density)} gave linear density {lin_d}, "
                           f"the cell had {row['linear_density']}")
    return pruned


def _retime(cfg: StudyConfig, st: "_Study", prep: Dict[int, Dict[str, Any]]) -> None:
    """Images/s of every finished cell that has none (cells run by ``--workers``): the cell's
    pruned structure rebuilt (:func:`_rebuild_cell`), timed against the dense model with nothing
    else running."""
    path = os.path.join(cfg.out, "results.csv")
    wanted = set(_cells(cfg))
    for r in _read_rows(path):
        key = _cell_key(r["seed"], r["method"], r["density"])
        if r.get("images_per_s") not in (None, "") or key not in wanted:
            continue
        seed = key[0]
        if seed not in prep:
            prep[seed] = _prepare_seed(cfg, st, seed)
        r["images_per_s"], r["dense_images_per_s"], r["timed_on"] = _time_pruned(st, prep[seed], _rebuild_cell(st, prep[seed], r))
        _merge_row(path, r)
        st.say(f"[timing] seed {seed} {key[1]} {key[2]}: {r['images_per_s']:.0f} images/s "
               f"(dense {r['dense_images_per_s']:.0f})", flush=True)


def study_cell_models(out: str, seed: int, methods: Sequence[str], density: float,
                      data_dir: Optional[str] = None) -> Dict[str, Any]:
    """The models of one seed of a finished study directory, for timing them against other
    runtimes (``bench/bench_study_peers.py``): ``{"dense": the trained model, "example": a test
    batch of the study's bench batch size, "pruned": {method: the cell's pruned structure}}``
    (:func:`_rebuild_cell`, block-masked layers as ANDCLinear; eval mode, on the CPU). Reads ``out``, writes nothing; a method whose
    cell is not in ``results.csv`` raises ``ConfigError``."""
    config_path = os.path.join(out, "study_config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{out} holds no study (no study_config.json); run `cctk study --out {out}` first")
    with open(config_path) as f:
        fields = json.load(f)
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    fields = {k: v for k, v in fields.items() if k in names}
    fields.update(out=out, device="cpu", verbose=False, progress=False, workers=1,
                  **({"data_dir": data_dir} if data_dir else {}))
    cfg = StudyConfig(**fields)
    rows = {_cell_key(r["seed"], r["method"], r["density"]): r
            for r in _read_rows(os.path.join(out, "results.csv"))}
    missing = [m for m in methods if _cell_key(seed, m, density) not in rows]
    if missing:
        raise ConfigError(f"{out} has no finished cell for seed {seed}, density {density:g}, method(s) {missing}")
    st = _Study(cfg)
    seed_dir = os.path.join(out, f"seed{int(seed)}")
    for need in (st.checkpoint_path(int(seed), seed_dir), os.path.join(seed_dir, "snp", "snp.json")):
        if not os.path.isfile(need):   # never train or measure here: this function only reads
            raise ConfigError(f"{need} is missing: {out} is not a finished study for seed {seed}")
    p = _prepare_seed(cfg, st, int(seed))
    pruned = {m: convert_to_andc(_rebuild_cell(st, p, rows[_cell_key(seed, m, density)])).eval() for m in methods}
    return {"dense": p["model"].eval(), "example": p["example"], "pruned": pruned}


def _run_cells(cfg: StudyConfig, st: "_Study", t0: float) -> Dict[str, Any]:
    results_path = os.path.join(cfg.out, "results.csv")
    info_path = os.path.join(cfg.out, "seeds.json")
    seeds_info = _read_seeds_info(info_path)
    from tqdm.auto import tqdm
    todo = [] if cfg.time_only else _todo(cfg, _read_rows(results_path))
    need_variants = [int(s) for s in cfg.seeds if cfg.snp_variants and not cfg.time_only
                     and not (seeds_info.get(str(s)) or {}).get("snp_variants")]
    # every seed first (training, SNP, validation choices), then the cells, most informative first
    prep = _prepare_seeds(cfg, st, [int(s) for s in cfg.seeds
                                    if any(c[0] == int(s) for c in todo) or int(s) in need_variants],
                          seeds_info, info_path)

    def run_variants():
        # the SNR / cluster claims on the same models (no cell depends on them): after the
        # primary density's cells, before the other densities' (with workers: while they run)
        for seed in need_variants:
            p = prep[seed]
            st.say(f"[seed {seed}] SNP variants: readouts {SNP_VARIANT_READOUTS} x theta {SNP_VARIANT_THRESHOLDS}",
                   flush=True)
            seeds_info[str(seed)]["snp_variants"] = st.snp_variants(seed, p["seed_dir"], p["model"], p["train_plain"],
                                                                    p["val_loader"], p["num_classes"])
            atomic_write_text(json.dumps(seeds_info, indent=1) + "\n", info_path)
        need_variants.clear()

    n_cells = len(_cells(cfg))
    bar = tqdm(total=n_cells, initial=n_cells - len(todo), desc="study cells", disable=not cfg.progress)
    try:
        if todo and cfg.workers > 1:
            _run_workers(cfg, st, run_variants, bar)
        elif todo:   # (--time-only: no cell)
            _work_cells(cfg, st, prep, seeds_info, t0, timing=True, before_tier2=run_variants, bar=bar)
    finally:
        bar.close()
    run_variants()
    _retime(cfg, st, prep)
    return write_summary(cfg, _read_rows(results_path), seeds_info, time.perf_counter() - t0)


def _run_workers(cfg: StudyConfig, st: "_Study", run_variants, bar) -> None:
    """``--workers N``: N processes (spawned, one intra-op thread each, or an equal share of the
    cores) claim the cells; this process runs the SNP variants meanwhile, then waits. Several
    single-threaded processes use this small CPU better than one process with every thread;
    images/s are not measured under that load but afterwards, by :func:`_retime`."""
    import multiprocessing as mp
    threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    wcfg = dataclasses.replace(cfg, progress=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_cell_worker, args=(wcfg, threads), name=f"cctk-study-worker{i}")
             for i in range(cfg.workers)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for pr in procs:
            pr.start()
        run_variants()
        path = os.path.join(cfg.out, "results.csv")
        while any(pr.is_alive() for pr in procs):
            for pr in procs:
                pr.join(timeout=5)
            bar.n = bar.total - len(_todo(cfg, _read_rows(path)))
            bar.refresh()
    finally:
        for pr in procs:
            if pr.is_alive():
                pr.terminate()
            pr.join()
        torch.set_num_threads(before)
    bad = [pr.exitcode for pr in procs if pr.exitcode != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} study worker(s) failed (exit codes {bad}; their messages are above); "
                           f"finished cells are kept: rerun the same command to resume")


def write_summary(cfg: StudyConfig, rows: List[dict], seeds_info: dict, wall: float) -> Dict[str, Any]:
    wanted = set(_cells(cfg))
    rows = [r for r in rows if _cell_key(r["seed"], r["method"], r["density"]) in wanted]
    stats = summarize_results(rows)
    summary = {"primary_question": PRIMARY, "config": cfg.as_dict(), "block_size": _Study(cfg).B,
               "seeds": seeds_info, **stats, "rows": len(rows), "wall_time_s_this_sitting": wall,
               "machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "cpu": cpu_model(), "threads": torch.get_num_threads()},
               "timed_on": sorted({r["timed_on"] for r in rows if r.get("timed_on")})}
    atomic_write_text(json.dumps(summary, indent=1, default=str) + "\n", os.path.join(cfg.out, "summary.json"))
    atomic_write_text(study_markdown(summary), os.path.join(cfg.out, "summary.md"))
    write_study_report(cfg.out, summary)
    return summary


def study_markdown(summary: Dict[str, Any]) -> str:
    """summary.md: the primary result, then accuracy (mean [95% CI], percent) per method x
    density, paired differences against the baseline (points), and images/s relative to the
    dense model: the tables docs/FINDINGS.md quotes, written from summary.json alone."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    ci = lambda c: "[n/a]" if c is None or c[0] is None else f"[{pct(c[0])}, {pct(c[1])}]"  # noqa: E731
    cells = summary["cells"]
    densities = sorted({c["density"] for c in cells}, reverse=True)
    methods = sorted({c["method"] for c in cells}, key=lambda m: (STUDY_METHODS.index(m) if m in STUDY_METHODS else 99, m))
    by = {(c["method"], c["density"]): c for c in cells}
    cfg = summary.get("config", {})
    lines = [f"# cctk study: {cfg.get('dataset')} ({summary.get('rows')} cells)", ""]
    prim = [p for p in summary["paired"] if p["primary"]]
    if prim:
        p = prim[0]
        lines += [f"Primary ({PRIMARY['statistic']}): {p['method']} - {p['baseline']} at density {p['density']}: "
                  f"**{pct(p['mean_diff'])} points, 95% CI {ci(p['ci95'])}**, p = "
                  + ("n/a" if p["p_value"] is None else f"{p['p_value']:.3g}") + f", n = {p['n']} seeds.", ""]
    else:
        lines += ["Primary comparison: no paired cells yet.", ""]
    dense = [v.get("dense_test_accuracy") for v in (summary.get("seeds") or {}).values() if isinstance(v, dict)]
    if dense:
        lines += ["Dense test accuracy per seed: " + ", ".join(pct(a) for a in dense if a is not None) + "%.", ""]
    head = "| method | " + " | ".join(f"density {d:g}" for d in densities) + " |"
    sep = "|---|" + "---|" * len(densities)
    lines += ["Test accuracy after fine-tuning, % (mean [95% CI], n seeds):", "", head, sep]
    for m in methods:
        row = [f"{pct(by[m, d]['accuracy_mean'])} {ci(by[m, d]['ci95'])} (n={by[m, d]['n']})" if (m, d) in by else ""
               for d in densities]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", "Minus the baseline, paired by seed, points (mean [95% CI], p, Holm p):", "", head, sep]
    pair = {(p["method"], p["density"]): p for p in summary["paired"]}
    for m in methods:
        if not any((m, d) in pair for d in densities):
            continue
        row = []
        for d in densities:
            p = pair.get((m, d))
            row.append("" if p is None else
                       f"{pct(p['mean_diff'])} {ci(p['ci95'])}, p "
                       + ("n/a" if p["p_value"] is None else f"{p['p_value']:.3g}")
                       + ("" if p.get("p_holm") is None else f", Holm {p['p_holm']:.3g}") + (" (primary)" if p["primary"] else ""))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", "Images/s over the dense model's (both through cctk.optimize, timed interleaved with each other; with --workers after the last cell):", "",
              head, sep]
    for m in methods:
        row = [("" if (m, d) not in by or by[m, d].get("speedup_vs_dense_mean") is None
                else f"{by[m, d]['speedup_vs_dense_mean']:.2f}x") for d in densities]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    if summary.get("timed_on"):
        lines += ["", "Timed on: " + "; ".join(summary["timed_on"])
                  + (" (rows timed on different machines: compare ratios within one machine only)"
                     if len(summary["timed_on"]) > 1 else "") + "."]
    fr = summary.get("frontier") or []
    lines += ["", "Pareto frontier (accuracy vs images/s): "
              + (", ".join(f"{c['method']} at {c['density']:g}" for c in fr) or "no timings"), ""]
    lines += _variants_markdown(summary.get("seeds") or {})
    return "\n".join(lines)


def _variants_markdown(seeds_info: Dict[str, Any]) -> List[str]:
    """The SNP variants (readout x theta) per block and group: mean over seeds [min, max] of the
    readout accuracy, mean cluster size, noise per node and SNR (the paper's claims: accuracy
    rises, clusters shrink and SNR grows along the blocks)."""
    per = [v["snp_variants"] for v in seeds_info.values() if isinstance(v, dict) and v.get("snp_variants")]
    if not per:
        return []
    keys = (("readout_accuracy", "readout acc", 3), ("mean_cluster_size", "cluster size", 2),
            ("mean_noise", "noise/node", 2), ("snr", "SNR", 2))

    def agg(vals, nd):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "n/a"
        return f"{sum(vals) / len(vals):.{nd}f} [{min(vals):.{nd}f}, {max(vals):.{nd}f}]"
    lines = [f"SNP on the validation split, both readouts x theta (mean over {len(per)} seeds [min, max]):", "",
             "| readout | theta | block | group | " + " | ".join(k[1] for k in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for name in sorted(per[0], key=lambda n: (per[0][n]["readout"], per[0][n]["threshold"])):
        v0 = per[0][name]
        for b in range(len(v0["blocks"])):
            for g in ("mha", "ff"):
                cols = [agg([p[name]["blocks"][b][g].get(k) for p in per if name in p], nd) for k, _, nd in keys]
                lines.append(f"| {v0['readout']} | {v0['threshold']} | {b} | {g} | " + " | ".join(cols) + " |")
    return lines + [""]


def write_study_report(out: str, summary: Dict[str, Any]) -> str:
    """report.html: the primary question first, then accuracy vs density and accuracy vs images/s
    (per method, mean and 95% CI error bars), then the tables."""
    from cctk.report.html import _plt, _png, _img
    cells = summary["cells"]
    methods = sorted({c["method"] for c in cells})
    parts = [f"<h1>cctk study: {html.escape(str(summary['config']['dataset']))}</h1>",
             "<h2>The test this study was designed for (stated before the numbers)</h2>",
             f"<p>Primary: {html.escape(PRIMARY['method'])} minus {html.escape(PRIMARY['baseline'])} at density "
             f"{PRIMARY['density']}: {html.escape(PRIMARY['statistic'])}. Every other comparison is secondary "
             "(Holm-corrected). All tuned choices (SNP label sets, classifier threshold) were made on the "
             "validation split carved from the training split; the test split only gives the numbers below.</p>"]
    plt = _plt()
    if plt is not None and cells:
        for xkey, title in (("density", "accuracy vs density"), ("images_per_s_mean", "accuracy vs images/s")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for m in methods:
                cs = sorted((c for c in cells if c["method"] == m and c.get(xkey) is not None), key=lambda c: c[xkey])
                if not cs:
                    continue
                xs = [c[xkey] for c in cs]
                ys = [c["accuracy_mean"] for c in cs]
                err = [[y - (c["ci95"][0] if c["ci95"][0] is not None else y) for y, c in zip(ys, cs)],
                       [(c["ci95"][1] if c["ci95"][1] is not None else y) - y for y, c in zip(ys, cs)]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=m)
            if xkey != "density" and summary.get("frontier"):
                fr = sorted(summary["frontier"], key=lambda c: c["images_per_s_mean"])
                ax.plot([c["images_per_s_mean"] for c in fr], [c["accuracy_mean"] for c in fr], "k--", lw=1,
                        label="Pareto frontier")
            ax.set_xlabel("target density" if xkey == "density" else "images/s (cctk.optimize)")
            ax.set_ylabel("test accuracy after fine-tuning")
            ax.set_title(title + " (mean, 95% CI over seeds)")
            ax.legend(fontsize=7)
            parts.append(_img(_png(fig), title))
            plt.close(fig)
    parts.append("<h2>Paired differences against magnitude</h2><table border=1><tr><th>method</th><th>density</th>"
                 "<th>n</th><th>mean diff</th><th>95% CI</th><th>p</th><th>p (Holm)</th><th>primary</th></tr>")
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    _ips = lambda v: "" if v is None else f"{v:.0f}"  # noqa: E731
    ci = lambda c: "n/a (n < 2)" if c[0] is None else f"[{c[0]:.4f}, {c[1]:.4f}]"  # noqa: E731
    for p in summary["paired"]:
        parts.append(f"<tr><td>{p['method']}</td><td>{p['density']}</td><td>{p['n']}</td><td>{fmt(p['mean_diff'])}</td>"
                     f"<td>{ci(p['ci95'])}</td><td>{fmt(p['p_value'])}</td>"
                     f"<td>{fmt(p.get('p_holm'))}</td><td>{'yes' if p['primary'] else ''}</td></tr>")
    parts.append("</table><h2>Accuracy vs images/s: the Pareto frontier</h2><p>"
                 + (", ".join(f"{html.escape(c['method'])} at {c['density']} ({c['accuracy_mean']:.4f}, "
                              f"{c['images_per_s_mean']:.0f} images/s)" for c in summary.get("frontier", []))
                    or "no timings") + "</p>"
                 + (f"<p>Timed on: {html.escape('; '.join(summary['timed_on']))}.</p>" if summary.get("timed_on") else ""))
    parts.append("<h2>Cells</h2><table border=1><tr><th>method</th><th>density</th><th>n</th>"
                 "<th>accuracy</th><th>95% CI</th><th>before fine-tune</th><th>images/s</th><th>x dense</th>"
                 "<th>linear density</th></tr>")
    for c in cells:
        parts.append(f"<tr><td>{c['method']}</td><td>{c['density']}</td><td>{c['n']}</td><td>{fmt(c['accuracy_mean'])}</td>"
                     f"<td>{ci(c['ci95'])}</td><td>{fmt(c['accuracy_before_finetune_mean'])}</td>"
                     f"<td>{_ips(c['images_per_s_mean'])}</td><td>{fmt(c.get('speedup_vs_dense_mean'))}</td>"
                     f"<td>{fmt(c['linear_density_mean'])}</td></tr>")
    parts.append("</table>")
    path = os.path.join(out, "report.html")
    atomic_write_text("<!doctype html><html><head><meta charset='utf-8'><title>cctk study</title></head><body>"
                      + "\n".join(parts) + "</body></html>\n", path)
    return path
