"""``cctk study``'s run: pruning as a controlled experiment (SCIENCE.md section 7).

The test the study is designed for, fixed before any number: **ANDC minus block magnitude, test
accuracy at density 0.25 after the fine-tune budget, paired by seed, 95% CI** (primary); every
other method x density against magnitude, against ANDC and against cctk's first rule
(``andc-old``, when run) is secondary, Holm-corrected.

Per seed s (``out/seed{s}/``):

1. Data: the training split's first ``N - val_size`` samples train the model; its last
   ``val_size`` samples are the *validation* split (recorded as an index range). The test split
   is read only to report accuracies (before and after fine-tuning).
2. Model: trained with the dataset's preset recipe (``seed{s}/train``; resumable), taken from
   ``checkpoints[s]``, or reused from another study trained the same way (``models_from``: its
   ``seed{s}/train`` when it has one; seeds it lacks are trained here).
3. SNP: readouts trained on the training part, node matrices from the validation split
   (``seed{s}/snp``, the stream entering block 0 included): the label sets every SNP-guided
   method uses. A study reusing models measures its own SNP.
4. Classifier threshold: scanned on the validation split; the largest threshold whose
   validation accuracy (dense encoder, classifier-only ANDC) is within ``classifier_tolerance``
   of the dense validation accuracy is chosen (none within, or ``--dense-classifier``: the
   classifier stays dense).
5. Every method x density (same fine-tune budget, lr, training images): prune
   (:func:`cctk.prune.pruner.prune_model`, the label-set methods by the study's ANDC rule or the
   one an ``andc-old*`` method fixes), test accuracy, fine-tune with masks fixed, test accuracy,
   images/s of the pruned model through ``cctk.optimize`` (interleaved rounds with the dense
   model, fastest round).

Steps 1-4 run for every seed first; then the cells run most informative first
(:func:`cctk.experiments.study.ledger.cell_order`), with ``summary.json`` and ``report.html``
rewritten after each, so a study stopped part-way reports what it has; ``--snp-variants`` runs
after the primary density's cells. ``workers > 1``: that many processes claim cells, the SNP
variants run meanwhile, and images/s are measured after the last cell with nothing else running
(:func:`_retime`: the same seed re-prunes to the same structure). ``time_only``: no new cell;
the finished cells that lack images/s are timed and the summary written.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Dict, Optional, Sequence

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from cctk import data
from cctk import snp as snp_mod
from cctk.checkpoint import atomic_write_text, checkpoint_provenance, load_checkpoint
from cctk.errors import ConfigError
from cctk.experiments.pipeline import Run, scan_classifier
from cctk.experiments.study.config import (SNP_VARIANT_READOUTS, SNP_VARIANT_THRESHOLDS, StudyConfig, block_size,
                                           check_resumable, load_config, resumable_dict)
from cctk.experiments.study.ledger import (cell_key, cells, claim, done, merge_row, merge_seed_info, read_rows,
                                           read_seeds_info, run_workers, tier, timed_under_load, todo)
from cctk.experiments.study.report import write_summary
from cctk.optimize import optimize
from cctk.prune.andc import RecognizedSets, final_stream_means, final_stream_sets
from cctk.prune.convert import convert_to_andc, density_summary, relative_linear_density
from cctk.prune.finetune import finetune
from cctk.prune.pruner import PruneSpec, method_rule, prune_model
from cctk.prune.workflow import calibration_batches
from cctk.timing import OtherLoad, models_images_per_s, timing_machine
from cctk.train import CHECKPOINT_NAME, TrainConfig, evaluate, get_preset, preset_for_dataset, train
from cctk.train.state import seed_everything

__all__ = ["run_study", "study_cell_models", "model_digest"]


class _Study:
    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.B = block_size(cfg)
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
        if cfg.reused_checkpoint(seed) is not None:   # trained by a --models-from study, same recipe
            model, ckpt = load_checkpoint(ckpt_path, map_location="cpu")
            return model, ckpt, f"models_from {os.path.abspath(os.path.dirname(os.path.dirname(os.path.dirname(ckpt_path))))}"
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
        """The seed's trained model: from --checkpoints, the --models-from study (when it has
        one for this seed), else trained in this study's ``seed{s}/train``."""
        cfg = self.cfg
        if cfg.checkpoints:
            return cfg.checkpoints[list(cfg.seeds).index(seed)]
        return cfg.reused_checkpoint(seed) or os.path.join(seed_dir, "train", CHECKPOINT_NAME)

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
        sets = RecognizedSets.from_snp(snp_dir, num_blocks=model.num_blocks)
        if sets.tokens is None and self.cfg.needs_token_sets():
            raise ConfigError(f"{snp_dir} has no label sets for the tokens (measured by an older cctk), which "
                              f"this study's rule reads: measure them in a new study (--out NEW --models-from "
                              f"{self.cfg.out}: the trained models are reused, SNP is rerun), or pass "
                              f"--token-sets assume-all for the old assumption")
        return sets, snp_dir

    def snp_variants(self, seed, seed_dir, model, train_loader, val_loader, num_classes) -> dict:
        """SNP of the same model with both readouts (cctk's Adam, the group's SGD without bias)
        at every threshold of SNP_VARIANT_THRESHOLDS, matrices on validation: per block and group
        the readout accuracy, cluster size, noise per node (the group's primitives) and SNR."""
        out = {}
        keys = ("readout_accuracy", "mean_cluster_size", "mean_noise", "snr", "frac_no_cluster")
        for opt in SNP_VARIANT_READOUTS:
            vdirs = {theta: os.path.join(seed_dir, "snp_variants", f"{opt}_theta{theta}") for theta in SNP_VARIANT_THRESHOLDS}
            missing = [t for t, d in vdirs.items() if not os.path.isfile(os.path.join(d, "snp.json"))]
            if missing:   # one measurement per readout, analysed at every threshold still missing
                results = snp_mod.run_snp_thresholds(
                    model, train_loader, val_loader, num_classes, missing, readout_epochs=self.cfg.readout_epochs,
                    readout_optimizer=opt, null_draws=100, seed=seed, device=self.device, split="validation",
                    dataset=self.cfg.dataset)
                for theta in missing:
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
        spec = PruneSpec(method, density=density, block_size=self.B, rule=self.cfg.rule(),
                         classifier=cls_sets is not None, classifier_sets=cls_sets, seed=seed,
                         qkv_budget=self.cfg.qkv_budget)
        pruned, plan = prune_model(model, spec, sets, calibration=calib, device=self.device)
        keep = None
        if plan.layer_stats:   # ANDC-type: the kept-connection fraction, weighted by layer size
            sizes = {n: pruned.get_submodule(n).weight.numel() for n in plan.layer_stats}
            keep = sum(plan.layer_stats[n]["connection_keep_fraction"] * sizes[n] for n in sizes) / sum(sizes.values())
        return (pruned, relative_linear_density(model, pruned), density_summary(pruned)["classifier_density"], keep)

    def throughput(self, pruned, dense, example):
        dtype = getattr(torch, self.cfg.bench_dtype)
        # tuned at the batch it is timed on (cctk.tune: the choices are remembered per machine)
        fast, fast_dense = optimize(pruned, dtype, sample_input=example), optimize(dense, dtype, sample_input=example)
        x = example.to(self.device, dtype)
        # interleaved rounds, fastest of each (cctk.timing): pruned and dense see the same machine
        with OtherLoad() as load:
            r = models_images_per_s({"pruned": fast, "dense": fast_dense}, x, rounds=self.cfg.bench_rounds)
        return (r["pruned"]["images_per_s"], r["dense"]["images_per_s"], timing_machine(self.device),
                load.fraction)


def model_digest(model: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of every tensor of the state dict (weights, masks), in order:
    the fine-tuned model's fingerprint (no decision may depend on the test labels: tested)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.dtype != torch.bool else t.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _range_subset(dataset, start: int, stop: int):
    sub = Subset(dataset, range(start, stop))
    for attr in ("num_classes", "in_channels", "img_size", "classes"):
        if hasattr(dataset, attr):
            setattr(sub, attr, getattr(dataset, attr))
    return sub


def run_study(cfg: StudyConfig) -> Dict[str, Any]:
    """Run (or resume) the study; returns the summary dict (also ``out/summary.json``)."""
    cfg.check()
    config_path = os.path.join(cfg.out, "study_config.json")
    check_resumable(cfg, config_path)   # seeds, densities and methods may grow: new cells are added
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_text(json.dumps(resumable_dict(cfg), indent=1) + "\n", config_path)
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


def _prepare_seed(cfg: StudyConfig, st: "_Study", seed: int, measure: bool = True) -> Dict[str, Any]:
    """Everything a seed's cells share: its trained model, loaders, calibration images, SNP
    label sets and the classifier threshold (both chosen on validation), the dense test accuracy
    (``measure`` False: no accuracy that rebuilding a cell's structure does not need, i.e. no
    test pass, and no validation pass when the classifier stays dense)."""
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
    if measure or cfg.classifier_scan:
        p["threshold"], p["cls_sets"], p["cls_info"] = st.choose_classifier(model, p["val_loader"], num_classes)
    else:
        p["threshold"], p["cls_sets"], p["cls_info"] = None, None, {"threshold": None}
    if not measure:
        p["dense_acc"] = None
        return p
    p["dense_acc"] = evaluate(model, p["test_loader"], st.device)["accuracy"]
    st.say(f"[seed {seed}] dense test accuracy {p['dense_acc']:.4f}; classifier threshold "
           f"{p['threshold']} (chosen on validation)", flush=True)
    return p


def _prepare_seeds(cfg: StudyConfig, st: "_Study", seeds) -> Dict[int, Dict[str, Any]]:
    prep: Dict[int, Dict[str, Any]] = {}
    for seed in seeds:
        p = prep[seed] = _prepare_seed(cfg, st, seed)
        merge_seed_info(cfg.out, seed, {
            "model_source": p["source"], "validation": p["val_info"], "classifier": p["cls_info"],
            "dense_test_accuracy": p["dense_acc"], "snp_dir": os.path.abspath(p["snp_dir"]),
            "model": p["model"].config.get("name") if hasattr(p["model"], "config") else None})
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
    """(pruned images/s, dense images/s, where they were timed, the share of the CPUs other
    processes used meanwhile or None); block-masked layers become ANDCLinear first (node
    removal alone: none)."""
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
    ips, dense_ips, timed_on, load = _time_pruned(st, p, pruned) if timing else (None, None, None, None)
    return {"seed": seed, "method": method, "density": density, "accuracy": acc,
            "accuracy_before_finetune": acc0, "images_per_s": ips, "dense_images_per_s": dense_ips,
            "linear_density": lin_d, "classifier_density": cls_d, "connection_keep_fraction": keep,
            "dense_accuracy": p["dense_acc"], "classifier_threshold": p["threshold"],
            "finetune_seconds": ft_s, "model_digest": digest, "timed_on": timed_on,
            "finetune_epochs": cfg.finetune_epochs, "timing_other_load": load, **_rule_columns(cfg, method)}


def _rule_columns(cfg: StudyConfig, method: str) -> dict:
    """The ANDC rule a cell's method pruned by (empty for methods without a label-set rule)."""
    rule = method_rule(method, cfg.rule())
    return {k: ("" if rule is None else getattr(rule, k)) for k in ("block_score", "v_sets", "token_sets")}


def _work_cells(cfg: StudyConfig, st: "_Study", prep: Dict[int, Dict[str, Any]],
                t0: float, timing: bool = True, before_tier2=None, bar=None) -> None:
    """Run every unfinished cell this process can claim, most informative first; each finished
    row is merged into results.csv (under the lock) and the summary rewritten before the next."""
    results_path = os.path.join(cfg.out, "results.csv")
    for key in todo(cfg, read_rows(results_path)):
        seed, method, density = key
        if before_tier2 is not None and tier(key) == 2:
            before_tier2()
            before_tier2 = None
        held = claim(cfg.out, key)
        if held is None:
            continue   # another process of this study is running the cell
        try:
            if key in done(read_rows(results_path)):
                continue   # finished by another process meanwhile
            if seed not in prep:   # a worker prepares a seed when it first needs one (all on disk)
                prep[seed] = _prepare_seed(cfg, st, seed)
            if bar is not None:
                bar.set_postfix_str(f"seed {seed} {method} {density}")
            row = _run_cell(cfg, st, prep[seed], seed, method, density, timing=timing)
            rows = merge_row(results_path, row)   # a finished cell is on disk before the next starts
        finally:
            held.close()
        if bar is not None:
            bar.update(1)
        ips = "images/s timed after the cells" if row["images_per_s"] is None else f"{row['images_per_s']:.0f} images/s"
        st.say(f"[cell] seed {seed} {method} {density}: accuracy {row['accuracy']:.4f} "
               f"(before fine-tune {row['accuracy_before_finetune']:.4f}), {ips}", flush=True)
        # the summary and report follow every cell: a study stopped part-way reports what it has
        write_summary(cfg, rows, time.perf_counter() - t0)


def _cell_worker(cfg: StudyConfig, threads: int) -> None:
    """A ``--workers`` process: its own intra-op threads, every claimable cell, no timing."""
    torch.set_num_threads(threads)
    st = _Study(cfg)
    _work_cells(cfg, st, {}, t0=time.perf_counter(), timing=False)


def _rebuild_cell(st: "_Study", p: Dict[str, Any], row: dict):
    """A finished cell's pruned structure again, for timing: same seed, same RNG state, so the
    same masks and widths (checked against the row's linear density); the weights are not
    fine-tuned (speed does not depend on them)."""
    seed, method, density = cell_key(row["seed"], row["method"], row["density"])
    pruned, lin_d, _, _ = _prune_cell(st, p, seed, method, density)
    if abs(lin_d - float(row["linear_density"])) > 1e-9:
        raise RuntimeError(f"re-pruning cell {(seed, method, density)} gave linear density {lin_d}, "
                           f"the cell had {row['linear_density']}")
    return pruned


def _needs_timing(cfg: StudyConfig, row: dict) -> bool:
    """A finished cell to time now: one without images/s (cells run by ``--workers``); with
    ``--time-only`` also one timed under load, and with ``--retime`` every one."""
    if row.get("images_per_s") in (None, ""):
        return True
    return cfg.time_only and (cfg.retime or timed_under_load(row))


def _retime(cfg: StudyConfig, st: "_Study", prep: Dict[int, Dict[str, Any]]) -> None:
    """Images/s of the finished cells that need them (:func:`_needs_timing`): the cell's pruned
    structure rebuilt (:func:`_rebuild_cell`), timed against the dense model; the share of the
    CPUs other processes used meanwhile is recorded with it."""
    path = os.path.join(cfg.out, "results.csv")
    wanted = set(cells(cfg))
    for r in read_rows(path):
        key = cell_key(r["seed"], r["method"], r["density"])
        if not _needs_timing(cfg, r) or key not in wanted:
            continue
        seed = key[0]
        if seed not in prep:
            prep[seed] = _prepare_seed(cfg, st, seed)
        (r["images_per_s"], r["dense_images_per_s"], r["timed_on"],
         r["timing_other_load"]) = _time_pruned(st, prep[seed], _rebuild_cell(st, prep[seed], r))
        merge_row(path, r)
        st.say(f"[timing] seed {seed} {key[1]} {key[2]}: {r['images_per_s']:.0f} images/s "
               f"(dense {r['dense_images_per_s']:.0f})", flush=True)


def study_cell_models(out: str, seed: int, methods: Sequence[str], density: float,
                      data_dir: Optional[str] = None) -> Dict[str, Any]:
    """The models of one seed of a finished study directory, for timing them against other
    runtimes (``bench/bench_study_peers.py``): ``{"dense": the trained model, "example": a test
    batch of the study's bench batch size, "pruned": {method: the cell's pruned structure}}``
    (:func:`_rebuild_cell`, block-masked layers as ANDCLinear; eval mode, on the CPU). Reads ``out``, writes nothing; a method whose
    cell is not in ``results.csv`` raises ``ConfigError``."""
    if not os.path.isfile(os.path.join(out, "study_config.json")):
        raise ConfigError(f"{out} holds no study (no study_config.json); run `cctk study --out {out}` first")
    cfg = load_config(out, device="cpu", verbose=False, progress=False, workers=1,
                      **({"data_dir": data_dir} if data_dir else {}))
    rows = {cell_key(r["seed"], r["method"], r["density"]): r
            for r in read_rows(os.path.join(out, "results.csv"))}
    missing = [m for m in methods if cell_key(seed, m, density) not in rows]
    if missing:
        raise ConfigError(f"{out} has no finished cell for seed {seed}, density {density:g}, method(s) {missing}")
    st = _Study(cfg)
    seed_dir = os.path.join(out, f"seed{int(seed)}")
    for need in (st.checkpoint_path(int(seed), seed_dir), os.path.join(seed_dir, "snp", "snp.json")):
        if not os.path.isfile(need):   # never train or measure here: this function only reads
            raise ConfigError(f"{need} is missing: {out} is not a finished study for seed {seed}")
    p = _prepare_seed(cfg, st, int(seed), measure=False)
    pruned = {m: convert_to_andc(_rebuild_cell(st, p, rows[cell_key(seed, m, density)])).eval() for m in methods}
    return {"dense": p["model"].eval(), "example": p["example"], "pruned": pruned}


def _run_cells(cfg: StudyConfig, st: "_Study", t0: float) -> Dict[str, Any]:
    results_path = os.path.join(cfg.out, "results.csv")
    seeds_info = read_seeds_info(cfg.out)
    pending = [] if cfg.time_only else todo(cfg, read_rows(results_path))
    need_variants = [int(s) for s in cfg.seeds if cfg.snp_variants and not cfg.time_only
                     and not (seeds_info.get(str(s)) or {}).get("snp_variants")]
    # every seed first (training, SNP, validation choices), then the cells, most informative first
    prep = _prepare_seeds(cfg, st, [int(s) for s in cfg.seeds
                                    if any(c[0] == int(s) for c in pending) or int(s) in need_variants],
)

    def run_variants():
        # the SNR / cluster claims on the same models (no cell depends on them): after the
        # primary density's cells, before the other densities' (with workers: while they run)
        for seed in need_variants:
            p = prep[seed]
            st.say(f"[seed {seed}] SNP variants: readouts {SNP_VARIANT_READOUTS} x theta {SNP_VARIANT_THRESHOLDS}",
                   flush=True)
            variants = st.snp_variants(seed, p["seed_dir"], p["model"], p["train_plain"],
                                                                    p["val_loader"], p["num_classes"])
            merge_seed_info(cfg.out, seed, {"snp_variants": variants})
        need_variants.clear()

    n_cells = len(cells(cfg))
    bar = tqdm(total=n_cells, initial=n_cells - len(pending), desc="study cells", disable=not cfg.progress)
    try:
        if pending and cfg.workers > 1:
            run_workers(cfg, _cell_worker, run_variants, bar)
        elif pending:   # (--time-only: no cell)
            _work_cells(cfg, st, prep, t0, timing=True, before_tier2=run_variants, bar=bar)
    finally:
        bar.close()
    run_variants()
    _retime(cfg, st, prep)
    return write_summary(cfg, read_rows(results_path), time.perf_counter() - t0)
