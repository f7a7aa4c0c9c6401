"""The whole ANDC story on one dataset: train -> SNP -> ANDC and block-magnitude pruning at the
same per-layer densities -> fine-tune both -> evaluate -> dense vs pruned inference throughput
-> accuracy-vs-density sweep -> ``summary.json`` and ``report.html``.

``run_pipeline(out_dir)`` on the default (scikit-learn digits, ``cct_2_3x1_8``: d = 128, 2
heads of 64, d_ff = 128, 2 blocks) finishes in a few minutes on a 2-core CPU. Block size 16 is
the digits default: with d = 128, a 32-block would make each linear only 4 x 4 (qkv 12 x 4)
blocks, too coarse to follow the label structure.

The label sets that guide pruning are measured on the *training* split by default
(``snp_split="train"``), so no pruning decision has seen a test image; the test split is used
only to report accuracies.

The run is a sequence of named steps over one :class:`Run` (``train_dense``, ``measure_snp``,
``scan_classifier``, ``prune_both``, ``time_inference``, ``sweep_densities``, ``summarize``,
``write_outputs``); ``cctk demo`` runs them all, and a study can run its own selection.

Files under ``out_dir``: ``train/`` (dense checkpoint, metrics), ``snp/`` (snp.json, nodes.npz,
PNGs), ``andc/checkpoint.pt`` and ``magnitude/checkpoint.pt`` (pruned checkpoints, loadable with
``cctk.prune.load_pruned`` / ``cctk eval``), ``summary.json``, ``report.html``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import time
from typing import Any, Dict, Optional, Sequence

import torch

from cctk import data
from cctk import snp as snp_mod
from cctk.checkpoint import atomic_write_text, checkpoint_provenance, load_checkpoint, output_dir
from cctk.prune.andc import RecognizedSets, final_stream_means, final_stream_sets
from cctk.optimize import optimize
from cctk.prune.convert import save_pruned, to_masked_dense
from cctk.prune.masks import classifier_keep
from cctk.prune.plan import PrunePlan, apply_masks
from cctk.prune.pruner import PruneSpec
from cctk.prune.workflow import data_loaders, prune_and_finetune
from cctk.report import write_report
from cctk.timing import models_images_per_s
from cctk.train import CHECKPOINT_NAME, TrainConfig, evaluate, get_preset, preset_for_dataset, train

__all__ = ["run_pipeline", "Run", "train_dense", "measure_snp", "scan_classifier", "prune_both",
           "time_inference", "sweep_densities", "summarize", "write_outputs", "train_split_loader",
           "DEFAULT_BLOCK_SIZE", "DEFAULT_DENSITY", "SWEEP_DENSITIES", "DEFAULT_CLASSIFIER_THRESHOLD",
           "CLASSIFIER_SCAN"]

DEFAULT_BLOCK_SIZE = {"digits": 16, "fashion-mnist": 16}
DEFAULT_DENSITY = 0.5
SWEEP_DENSITIES = (0.75, 0.5, 0.25, 0.125)
DEFAULT_CLASSIFIER_THRESHOLD = 0.6
CLASSIFIER_SCAN = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


@dataclasses.dataclass
class Run:
    """What the steps share: where the run writes, its device and data choices, and what each
    step produced for the next ones."""

    out_dir: str
    dataset: str
    device: torch.device
    seed: int = 0
    data_dir: Optional[str] = None
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    verbose: bool = True
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)
    t_start: float = dataclasses.field(default_factory=time.perf_counter)
    # filled by the steps
    model: Any = None
    ckpt: Optional[Dict[str, Any]] = None
    train_metrics: Optional[Dict[str, Any]] = None
    train_loader: Any = None
    test_loader: Any = None
    num_classes: Optional[int] = None
    dense_accuracy: Optional[float] = None
    snp_dir: Optional[str] = None
    snp_split: Optional[str] = None
    snp_result: Any = None
    sets: Any = None
    analysed_loader: Any = None
    classifier_sets: Any = None
    scan_rows: list = dataclasses.field(default_factory=list)
    runs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    throughput: Dict[str, Any] = dataclasses.field(default_factory=dict)
    sweep_rows: list = dataclasses.field(default_factory=list)

    def say(self, *args, **kwargs) -> None:
        if self.verbose:
            print(*args, **kwargs)

    def timed(self, name: str, t0: float) -> None:
        self.timings[name] = time.perf_counter() - t0
        self.say(f"    ({self.timings[name]:.1f} s)", flush=True)


def train_dense(run: Run, epochs: Optional[int] = None) -> None:
    """Step 1: train the dataset's default CCT into ``out_dir/train`` (its preset's recipe);
    reopen the run's data (its own splits) and measure the dense test accuracy."""
    run.say(f"[1/6] training the dense CCT on {run.dataset} ...", flush=True)
    t0 = time.perf_counter()
    train_dir = os.path.join(run.out_dir, "train")
    # the demo regenerates its whole output directory, its training run included
    fields: Dict[str, Any] = dict(out=train_dir, seed=run.seed, data_dir=run.data_dir,
                                  device=str(run.device), verbose=run.verbose, progress=False,
                                  train_subset=run.train_subset, test_subset=run.test_subset,
                                  overwrite=True)
    if epochs is not None:
        fields["epochs"] = epochs
    preset = preset_for_dataset(run.dataset)
    config = get_preset(preset, **fields) if preset is not None else TrainConfig(dataset=run.dataset, **fields)
    run.train_metrics = train(config)
    run.model, run.ckpt = load_checkpoint(os.path.join(train_dir, CHECKPOINT_NAME), map_location="cpu")
    run.timed("train", t0)
    run.train_loader, run.test_loader, run.num_classes = data_loaders(
        run.ckpt["dataset"], run.data_dir, batch_size=64, seed=run.seed, train_subset=run.train_subset,
        test_subset=run.test_subset)
    run.dense_accuracy = evaluate(run.model.to(run.device), run.test_loader, run.device)["accuracy"]
    run.say(f"    dense test accuracy {run.dense_accuracy:.4f}")


def measure_snp(run: Run, split: str = "train", threshold: float = 0.3, readout_epochs: int = 10,
                null_draws: int = 1000) -> None:
    """Step 2: single-nodal performance of every node into ``out_dir/snp``; the label sets."""
    run.say(f"[2/6] single-nodal performance of every node (label sets from the {split} split) ...",
            flush=True)
    t0 = time.perf_counter()
    if split not in ("train", "test"):
        raise ValueError(f"snp_split must be 'train' or 'test', got {split!r}")
    run.snp_dir = os.path.join(run.out_dir, "snp")
    run.snp_split = split
    snp_train_loader = train_split_loader(run.ckpt["dataset"], run.data_dir, run.train_subset)
    run.analysed_loader = snp_train_loader if split == "train" else run.test_loader
    # the checkpoint's digest and model config, as `cctk snp` records them: `cctk prune --snp`
    # accepts this directory for the run's checkpoint (and refuses it for any other)
    ckpt_path = os.path.join(run.out_dir, "train", CHECKPOINT_NAME)
    provenance = checkpoint_provenance(ckpt_path, run.ckpt) if os.path.isfile(ckpt_path) else None
    run.snp_result = snp_mod.run_snp(run.model, snp_train_loader, run.analysed_loader, run.num_classes,
                                     threshold=threshold, readout_epochs=readout_epochs,
                                     null_draws=null_draws, seed=run.seed, device=run.device, split=split,
                                     dataset=run.dataset, verbose=run.verbose, extra_config=provenance)
    snp_mod.save(run.snp_result, run.snp_dir)
    run.sets = RecognizedSets.from_snp(run.snp_result, num_blocks=run.model.num_blocks)
    run.timed("snp", t0)


def scan_classifier(run: Run, block_size: int, thresholds: Sequence[float] = CLASSIFIER_SCAN,
                    classifier_threshold: Optional[float] = DEFAULT_CLASSIFIER_THRESHOLD) -> None:
    """The classifier's ANDC threshold: for each threshold, the classifier density and the
    accuracy of the dense model with only its classifier pruned; the sets used for pruning."""
    run.say("    classifier ANDC vs threshold (dense encoder, no fine-tuning):", flush=True)
    means = final_stream_means(run.model, run.analysed_loader, run.num_classes, run.device)
    for th in thresholds:
        cs = final_stream_sets(run.model, means, th)
        only_cls = apply_masks(copy.deepcopy(run.model).cpu(), PrunePlan(
            method="andc", block_size=block_size, block_masks={},
            classifier_mask=classifier_keep(cs))).to(run.device)
        acc_th = evaluate(only_cls, run.test_loader, run.device)["accuracy"]
        run.scan_rows.append({"threshold": th, "classifier_density": float(cs.double().mean()),
                              "accuracy": acc_th})
        run.say(f"      theta {th:.2f}: classifier density {run.scan_rows[-1]['classifier_density']:.3f}, "
                f"accuracy {acc_th:.4f}")
    run.classifier_sets = (None if classifier_threshold is None
                           else final_stream_sets(run.model, means, classifier_threshold))


def prune_both(run: Run, block_size: int, density: float, finetune_epochs: int, lr: float) -> None:
    """Steps 3-4: ANDC and block magnitude at the same per-layer densities, fine-tuned, saved
    as pruned checkpoints under ``out_dir/andc`` and ``out_dir/magnitude``."""
    run.say(f"[3/6] ANDC pruning at density {density} (block {block_size}) and block-magnitude pruning "
            f"at the same per-layer densities, each fine-tuned {finetune_epochs} epoch(s) ...", flush=True)
    t0 = time.perf_counter()
    for method in ("andc", "magnitude"):
        spec = PruneSpec(method, density=density, block_size=block_size, classifier_sets=run.classifier_sets,
                         finetune_epochs=finetune_epochs, lr=lr)
        pruned, plan, rec = prune_and_finetune(run.model, spec, run.sets, run.train_loader, run.test_loader,
                                               device=run.device, log=run.say)
        path = os.path.join(run.out_dir, method, "checkpoint.pt")
        save_pruned(pruned.cpu(), plan, path, source_checkpoint=run.ckpt,
                    metrics={"test_accuracy": rec["accuracy"], "dense_accuracy": run.dense_accuracy})
        rec["checkpoint"] = os.path.abspath(path)
        rec["block_masks"] = {k: v.int().tolist() for k, v in plan.block_masks.items()}
        run.runs[method] = (pruned, plan, rec)
    run.timed("prune_finetune", t0)


def time_inference(run: Run, bench_batch: int = 32) -> None:
    """Step 5: inference throughput (fp32), all models timed interleaved (cctk.timing): the
    dense model as stock PyTorch runs it and through ``cctk.optimize``, the pruned model as
    loaded (ANDCLinear) and through ``cctk.optimize``, and its masked-dense twin."""
    run.say(f"[4/6] inference throughput, batch {bench_batch}, fp32 (interleaved rounds) ...", flush=True)
    t0 = time.perf_counter()
    model, dev = run.model, run.device
    andc_model = run.runs["andc"][0].to(dev).eval()
    x = torch.randn(bench_batch, model.in_channels, model.img_size, model.img_size, device=dev)
    masked_dense = to_masked_dense(copy.deepcopy(andc_model))
    with torch.no_grad():
        max_diff = float((andc_model(x) - masked_dense(x)).abs().max())
    models = {"dense": model.to(dev), "dense_optimized": optimize(model, dtype=torch.float32, sample_input=x),
              "pruned_eager": andc_model, "pruned": optimize(andc_model, dtype=torch.float32, sample_input=x),
              "masked": masked_dense}
    thr = models_images_per_s(models, x, rounds=15)
    best_dense = max(thr["dense"]["images_per_s"], thr["dense_optimized"]["images_per_s"])
    run.throughput = {**thr, "best_dense_images_per_s": best_dense, "max_diff": max_diff, "bench_batch": bench_batch}
    run.timed("throughput", t0)
    run.say(f"    dense {thr['dense']['images_per_s']:.0f} img/s (cctk.optimize {thr['dense_optimized']['images_per_s']:.0f}), "
            f"pruned through cctk.optimize {thr['pruned']['images_per_s']:.0f} img/s "
            f"({thr['pruned']['images_per_s'] / best_dense:.2f}x the faster dense), as loaded "
            f"{thr['pruned_eager']['images_per_s']:.0f}, masked dense {thr['masked']['images_per_s']:.0f}")


def sweep_densities(run: Run, densities: Sequence[float], block_size: int, finetune_epochs: int,
                    lr: float) -> None:
    """Step 6: accuracy vs density for both methods."""
    run.say(f"[5/6] accuracy vs density for both methods ({', '.join(str(d) for d in densities)}), "
            f"{finetune_epochs} fine-tune epoch(s) each ...", flush=True)
    t0 = time.perf_counter()
    for d in densities:
        for method in ("andc", "magnitude"):
            spec = PruneSpec(method, density=d, block_size=block_size, classifier_sets=run.classifier_sets,
                             finetune_epochs=finetune_epochs, lr=lr, convert=False)
            _, _, rec = prune_and_finetune(run.model, spec, run.sets, run.train_loader, run.test_loader,
                                           device=run.device)
            run.sweep_rows.append({"method": method, "target_density": d, "linear_density": rec["linear_density"],
                                   "classifier_density": rec["classifier_density"],
                                   "accuracy_before_finetune": rec["accuracy_before_finetune"],
                                   "accuracy": rec["accuracy"]})
            run.say(f"    {method:9s} density {rec['linear_density']:.3f}: {rec['accuracy_before_finetune']:.4f} -> "
                    f"{rec['accuracy']:.4f}")
    run.timed("sweep", t0)


def summarize(run: Run, **settings) -> Dict[str, Any]:
    """The summary dict of the steps' results (``settings``: the run's choices, recorded)."""
    model, result, thr = run.model, run.snp_result, run.throughput
    andc_rec, mag_rec = run.runs["andc"][2], run.runs["magnitude"][2]
    train_dir = os.path.join(run.out_dir, "train")
    summary = {
        "dataset": run.dataset,
        "model": model.config.get("name"),
        "model_config": model.config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(run.device),
        "block_size": settings["block_size"],
        "target_density": settings["density"],
        "finetune_epochs": settings["finetune_epochs"],
        "finetune_lr": settings["lr"],
        "snp_split": run.snp_split,
        "snp_threshold": settings["threshold"],
        "classifier_threshold": (settings["classifier_threshold"] if settings["classifier_threshold"] is not None
                                 else settings["threshold"]),
        "classifier_scan": run.scan_rows,
        "sweep_finetune_epochs": settings["sweep_finetune_epochs"],
        "dense_accuracy": run.dense_accuracy,
        "andc_accuracy": andc_rec["accuracy"],
        "andc_accuracy_before_finetune": andc_rec["accuracy_before_finetune"],
        "magnitude_accuracy": mag_rec["accuracy"],
        "magnitude_accuracy_before_finetune": mag_rec["accuracy_before_finetune"],
        "linear_density": andc_rec["linear_density"],
        "classifier_density": andc_rec["classifier_density"],
        "magnitude_linear_density": mag_rec["linear_density"],
        "magnitude_classifier_density": mag_rec["classifier_density"],
        "layer_density": andc_rec["layers"],
        "dense_images_per_s": thr["best_dense_images_per_s"],
        "dense_eager_images_per_s": thr["dense"]["images_per_s"],
        "dense_optimized_images_per_s": thr["dense_optimized"]["images_per_s"],
        "pruned_images_per_s": thr["pruned"]["images_per_s"],
        "pruned_eager_images_per_s": thr["pruned_eager"]["images_per_s"],
        "masked_dense_images_per_s": thr["masked"]["images_per_s"],
        "speedup_vs_dense": thr["pruned"]["images_per_s"] / thr["best_dense_images_per_s"],
        "throughput_timing": "fastest of 15 interleaved rounds (cctk.timing); pruned = cctk.optimize",
        "bench_batch": thr["bench_batch"],
        "pruned_vs_masked_dense_max_abs_diff": thr["max_diff"],
        "andc": andc_rec,
        "magnitude": mag_rec,
        "sweep": run.sweep_rows,
        "snp": {"dir": os.path.abspath(run.snp_dir), "blocks": result.summary.get("blocks"),
                "heads": result.summary.get("heads"), "final": result.summary.get("final"),
                "model_accuracy": result.summary.get("model_accuracy")},
        "train": {"epochs": run.train_metrics.get("epochs"), "test_accuracy": run.train_metrics.get("test_accuracy"),
                  "wall_time_s": run.train_metrics.get("wall_time_s"), "checkpoint": os.path.abspath(
                      os.path.join(train_dir, CHECKPOINT_NAME))},
        "timings_s": run.timings,
        "cpu_threads": torch.get_num_threads() if run.device.type == "cpu" else None,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    summary["wall_time_s"] = time.perf_counter() - run.t_start
    return summary


def write_outputs(run: Run, summary: Dict[str, Any], report: bool = True) -> None:
    """``summary.json`` and (``report``) ``report.html``; the summary is written again at the
    end with the final wall time."""
    _write_summary(summary, run.out_dir)
    run.say("[6/6] writing the report ...", flush=True)
    if report:
        path = write_report(run.out_dir, summary, snp_dir=run.snp_dir)
        run.say(f"    {path}")
    summary["wall_time_s"] = time.perf_counter() - run.t_start
    _write_summary(summary, run.out_dir)
    andc_rec, mag_rec = run.runs["andc"][2], run.runs["magnitude"][2]
    run.say(f"done in {summary['wall_time_s']:.0f} s: dense {run.dense_accuracy:.4f}, ANDC {andc_rec['accuracy']:.4f}, "
            f"magnitude {mag_rec['accuracy']:.4f} at linear density {andc_rec['linear_density']:.3f} "
            f"(classifier {andc_rec['classifier_density']:.3f}); throughput {summary['speedup_vs_dense']:.2f}x dense")


def _pipeline(out_dir: str, dataset: str = "digits", epochs: Optional[int] = None,
              density: float = DEFAULT_DENSITY, block_size: Optional[int] = None,
              finetune_epochs: int = 5, data_dir: Optional[str] = None, device=None,
              sweep: Sequence[float] = SWEEP_DENSITIES, sweep_finetune_epochs: int = 2,
              lr: float = 1e-3, seed: int = 0, snp_split: str = "train", snp_readout_epochs: int = 10,
              null_draws: int = 1000, threshold: float = 0.3,
              classifier_threshold: Optional[float] = DEFAULT_CLASSIFIER_THRESHOLD,
              classifier_scan: Sequence[float] = CLASSIFIER_SCAN, train_subset: Optional[int] = None,
              test_subset: Optional[int] = None, bench_batch: int = 32, verbose: bool = True,
              report: bool = True) -> Dict[str, Any]:
    """Run everything (see the module docstring); returns the summary dict (also written to
    ``out_dir/summary.json``). ``epochs``: training epochs (None: the dataset preset's).

    ``cpu_threads``: torch intra-op threads for the whole run on a CPU (restored afterwards);
    None takes the dataset preset's (digits: 1 thread, faster than 2 for such a small model).

    ``threshold`` is the SNP threshold (SCIENCE.md's 0.3): it gives the label sets of every
    hidden node. ``classifier_threshold`` (None: the SNP's) thresholds the final-stream node
    matrices for the classifier's ANDC; the demo uses 0.6 because at 0.3 the digits model's
    classifier keeps about a third of its weights, and ``classifier_scan`` records, for each
    threshold, the classifier density and the accuracy of the dense model with only its
    classifier pruned (no fine-tuning).
    """
    B = block_size or DEFAULT_BLOCK_SIZE.get(dataset, 32)
    with output_dir(out_dir):
        run = Run(out_dir=out_dir, dataset=dataset, device=_device(device), seed=seed, data_dir=data_dir,
                  train_subset=train_subset, test_subset=test_subset,
                  verbose=verbose)
        train_dense(run, epochs)
        measure_snp(run, snp_split, threshold, snp_readout_epochs, null_draws)
        scan_classifier(run, B, classifier_scan, classifier_threshold)
        prune_both(run, B, density, finetune_epochs, lr)
        time_inference(run, bench_batch)
        sweep_densities(run, sweep, B, sweep_finetune_epochs, lr)
        summary = summarize(run, block_size=B, density=density, finetune_epochs=finetune_epochs, lr=lr,
                            threshold=threshold, classifier_threshold=classifier_threshold,
                            sweep_finetune_epochs=sweep_finetune_epochs)
        write_outputs(run, summary, report)
    return summary


def run_pipeline(out_dir: str, dataset: str = "digits", epochs: Optional[int] = None,
                 density: float = DEFAULT_DENSITY, block_size: Optional[int] = None,
                 finetune_epochs: int = 5, data_dir: Optional[str] = None, device=None,
                 cpu_threads: Optional[int] = None, **options) -> Dict[str, Any]:
    dev = _device(device)
    if cpu_threads is None:
        preset = preset_for_dataset(dataset)
        cpu_threads = get_preset(preset).cpu_threads if preset is not None else None
    threads_before = torch.get_num_threads()
    if cpu_threads is not None and dev.type == "cpu":
        torch.set_num_threads(int(cpu_threads))
    try:
        return _pipeline(out_dir, dataset=dataset, epochs=epochs, density=density, block_size=block_size,
                         finetune_epochs=finetune_epochs, data_dir=data_dir, device=dev, **options)
    finally:
        torch.set_num_threads(threads_before)


run_pipeline.__doc__ = _pipeline.__doc__


def _write_summary(summary: Dict[str, Any], out_dir: str) -> None:
    atomic_write_text(json.dumps(summary, indent=1, default=_json_default), os.path.join(out_dir, "summary.json"))


def train_split_loader(dataset: dict, data_dir, train_subset):
    """The run's training split, no augmentation, not shuffled (for the SNP passes)."""
    return data.build_loader(data.from_record(dataset, "train", data_dir=data_dir, subset=train_subset),
                             256, shuffle=False)
