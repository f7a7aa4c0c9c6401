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

Files under ``out_dir``: ``train/`` (dense checkpoint, metrics), ``snp/`` (snp.json, nodes.npz,
PNGs), ``andc/checkpoint.pt`` and ``magnitude/checkpoint.pt`` (pruned checkpoints, loadable with
``cctk.prune.load_pruned`` / ``cctk eval``), ``summary.json``, ``report.html``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from typing import Any, Dict, Optional, Sequence

import torch

from cctk import data
from cctk import snp as snp_mod
from cctk.checkpoint import atomic_write_text, load_checkpoint
from cctk.prune.andc import (PrunePlan, RecognizedSets, apply_masks, final_stream_means,
                             final_stream_sets)
from cctk.prune.convert import save_pruned, to_masked_dense
from cctk.prune.finetune import images_per_second
from cctk.prune.masks import classifier_keep
from cctk.prune.workflow import data_loaders, prune_and_finetune
from cctk.report import write_report
from cctk.train import CHECKPOINT_NAME, TrainConfig, evaluate, get_preset, preset_for_dataset, train

__all__ = ["run_pipeline", "DEFAULT_BLOCK_SIZE", "DEFAULT_DENSITY", "SWEEP_DENSITIES",
           "DEFAULT_CLASSIFIER_THRESHOLD", "CLASSIFIER_SCAN"]

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
    say = print if verbose else (lambda *a, **k: None)
    t_start = time.perf_counter()
    dev = _device(device)
    os.makedirs(out_dir, exist_ok=True)
    B = block_size or DEFAULT_BLOCK_SIZE.get(dataset, 32)
    timings: Dict[str, float] = {}

    def step(name, t0):
        timings[name] = time.perf_counter() - t0
        say(f"    ({timings[name]:.1f} s)", flush=True)

    # 1. train -------------------------------------------------------------------------------
    say(f"[1/6] training the dense CCT on {dataset} ...", flush=True)
    t0 = time.perf_counter()
    train_dir = os.path.join(out_dir, "train")
    fields: Dict[str, Any] = dict(out=train_dir, seed=seed, data_dir=data_dir,
                                  device=str(dev), verbose=verbose, progress=False,
                                  train_subset=train_subset, test_subset=test_subset)
    if epochs is not None:
        fields["epochs"] = epochs
    preset = preset_for_dataset(dataset)
    config = get_preset(preset, **fields) if preset is not None else TrainConfig(dataset=dataset, **fields)
    train_metrics = train(config)
    model, ckpt = load_checkpoint(os.path.join(train_dir, CHECKPOINT_NAME), map_location="cpu")
    step("train", t0)

    train_loader, test_loader, K = data_loaders(ckpt["dataset"], data_dir, batch_size=64, seed=seed,
                                                train_subset=train_subset, test_subset=test_subset)
    dense_acc = evaluate(model.to(dev), test_loader, dev)["accuracy"]
    say(f"    dense test accuracy {dense_acc:.4f}")

    # 2. SNP -----------------------------------------------------------------------------------
    say(f"[2/6] single-nodal performance of every node (label sets from the {snp_split} split) ...", flush=True)
    t0 = time.perf_counter()
    snp_dir = os.path.join(out_dir, "snp")
    if snp_split not in ("train", "test"):
        raise ValueError(f"snp_split must be 'train' or 'test', got {snp_split!r}")
    snp_train_loader = train_split_loader(ckpt["dataset"], data_dir, train_subset)
    analysed_loader = snp_train_loader if snp_split == "train" else test_loader
    result = snp_mod.run_snp(model, snp_train_loader, analysed_loader, K, threshold=threshold,
                             readout_epochs=snp_readout_epochs, null_draws=null_draws, seed=seed,
                             device=dev, split=snp_split, dataset=dataset, verbose=verbose)
    snp_mod.save(result, snp_dir)
    sets = RecognizedSets.from_snp(result, num_blocks=model.num_blocks)
    step("snp", t0)

    # classifier ANDC threshold: the scan, and the sets used for pruning
    say("    classifier ANDC vs threshold (dense encoder, no fine-tuning):", flush=True)
    means = final_stream_means(model, analysed_loader, K, dev)
    scan_rows = []
    for th in classifier_scan:
        cs = final_stream_sets(model, means, th)
        only_cls = apply_masks(copy.deepcopy(model).cpu(), PrunePlan(
            method="andc", block_size=B, block_masks={}, classifier_mask=classifier_keep(cs))).to(dev)
        acc_th = evaluate(only_cls, test_loader, dev)["accuracy"]
        scan_rows.append({"threshold": th, "classifier_density": float(cs.double().mean()), "accuracy": acc_th})
        say(f"      theta {th:.2f}: classifier density {scan_rows[-1]['classifier_density']:.3f}, accuracy {acc_th:.4f}")
    classifier_sets = None if classifier_threshold is None else final_stream_sets(model, means, classifier_threshold)

    # 3-4. ANDC and magnitude at the same densities, fine-tuned -------------------------------
    say(f"[3/6] ANDC pruning at density {density} (block {B}) and block-magnitude pruning at the "
        f"same per-layer densities, each fine-tuned {finetune_epochs} epoch(s) ...", flush=True)
    t0 = time.perf_counter()
    runs = {}
    for method in ("andc", "magnitude"):
        pruned, plan, rec = prune_and_finetune(model, method, sets, train_loader, test_loader, block_size=B,
                                               density=density, finetune_epochs=finetune_epochs, lr=lr,
                                               device=dev, log=say, classifier_sets=classifier_sets)
        path = os.path.join(out_dir, method, "checkpoint.pt")
        save_pruned(pruned.cpu(), plan, path, source_checkpoint=ckpt,
                    metrics={"test_accuracy": rec["accuracy"], "dense_accuracy": dense_acc})
        rec["checkpoint"] = os.path.abspath(path)
        rec["block_masks"] = {k: v.int().tolist() for k, v in plan.block_masks.items()}
        runs[method] = (pruned, plan, rec)
    step("prune_finetune", t0)

    # 5. throughput ----------------------------------------------------------------------------
    say(f"[4/6] inference throughput, batch {bench_batch}, fp32 ...", flush=True)
    t0 = time.perf_counter()
    andc_model = runs["andc"][0].to(dev).eval()
    x = torch.randn(bench_batch, model.in_channels, model.img_size, model.img_size, device=dev)
    masked_dense = to_masked_dense(copy.deepcopy(andc_model))
    with torch.no_grad():
        max_diff = float((andc_model(x) - masked_dense(x)).abs().max())
    thr_dense = images_per_second(model.to(dev), x)
    thr_pruned = images_per_second(andc_model, x)
    thr_masked = images_per_second(masked_dense, x)
    step("throughput", t0)
    say(f"    dense {thr_dense['images_per_s']:.0f} img/s, ANDCLinear {thr_pruned['images_per_s']:.0f} img/s "
        f"({thr_pruned['images_per_s'] / thr_dense['images_per_s']:.2f}x), masked dense "
        f"{thr_masked['images_per_s']:.0f} img/s")

    # 6. accuracy vs density sweep -------------------------------------------------------------
    say(f"[5/6] accuracy vs density for both methods ({', '.join(str(d) for d in sweep)}), "
        f"{sweep_finetune_epochs} fine-tune epoch(s) each ...", flush=True)
    t0 = time.perf_counter()
    sweep_rows = []
    for d in sweep:
        for method in ("andc", "magnitude"):
            _, _, rec = prune_and_finetune(model, method, sets, train_loader, test_loader, block_size=B,
                                           density=d, finetune_epochs=sweep_finetune_epochs, lr=lr,
                                           device=dev, convert=False, classifier_sets=classifier_sets)
            sweep_rows.append({"method": method, "target_density": d, "linear_density": rec["linear_density"],
                               "classifier_density": rec["classifier_density"],
                               "accuracy_before_finetune": rec["accuracy_before_finetune"],
                               "accuracy": rec["accuracy"]})
            say(f"    {method:9s} density {rec['linear_density']:.3f}: {rec['accuracy_before_finetune']:.4f} -> "
                f"{rec['accuracy']:.4f}")
    step("sweep", t0)

    andc_rec, mag_rec = runs["andc"][2], runs["magnitude"][2]
    summary = {
        "dataset": dataset,
        "model": model.config.get("name"),
        "model_config": model.config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(dev),
        "block_size": B,
        "target_density": density,
        "finetune_epochs": finetune_epochs,
        "finetune_lr": lr,
        "snp_split": snp_split,
        "snp_threshold": threshold,
        "classifier_threshold": classifier_threshold if classifier_threshold is not None else threshold,
        "classifier_scan": scan_rows,
        "sweep_finetune_epochs": sweep_finetune_epochs,
        "dense_accuracy": dense_acc,
        "andc_accuracy": andc_rec["accuracy"],
        "andc_accuracy_before_finetune": andc_rec["accuracy_before_finetune"],
        "magnitude_accuracy": mag_rec["accuracy"],
        "magnitude_accuracy_before_finetune": mag_rec["accuracy_before_finetune"],
        "linear_density": andc_rec["linear_density"],
        "classifier_density": andc_rec["classifier_density"],
        "magnitude_linear_density": mag_rec["linear_density"],
        "magnitude_classifier_density": mag_rec["classifier_density"],
        "layer_density": andc_rec["layers"],
        "dense_images_per_s": thr_dense["images_per_s"],
        "pruned_images_per_s": thr_pruned["images_per_s"],
        "masked_dense_images_per_s": thr_masked["images_per_s"],
        "speedup_vs_dense": thr_pruned["images_per_s"] / thr_dense["images_per_s"],
        "bench_batch": bench_batch,
        "pruned_vs_masked_dense_max_abs_diff": max_diff,
        "andc": andc_rec,
        "magnitude": mag_rec,
        "sweep": sweep_rows,
        "snp": {"dir": os.path.abspath(snp_dir), "blocks": result.summary.get("blocks"),
                "heads": result.summary.get("heads"), "final": result.summary.get("final"),
                "model_accuracy": result.summary.get("model_accuracy")},
        "train": {"epochs": train_metrics.get("epochs"), "test_accuracy": train_metrics.get("test_accuracy"),
                  "wall_time_s": train_metrics.get("wall_time_s"), "checkpoint": os.path.abspath(
                      os.path.join(train_dir, CHECKPOINT_NAME))},
        "timings_s": timings,
        "cpu_threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    summary["wall_time_s"] = time.perf_counter() - t_start
    _write_summary(summary, out_dir)
    say("[6/6] writing the report ...", flush=True)
    if report:
        path = write_report(out_dir, summary, snp_dir=snp_dir)
        say(f"    {path}")
    summary["wall_time_s"] = time.perf_counter() - t_start
    _write_summary(summary, out_dir)
    say(f"done in {summary['wall_time_s']:.0f} s: dense {dense_acc:.4f}, ANDC {andc_rec['accuracy']:.4f}, "
        f"magnitude {mag_rec['accuracy']:.4f} at linear density {andc_rec['linear_density']:.3f} "
        f"(classifier {andc_rec['classifier_density']:.3f}); throughput {summary['speedup_vs_dense']:.2f}x dense")
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
