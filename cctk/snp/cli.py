"""``cctk snp``: single-nodal performance of every MHA and FF node of a trained checkpoint.

    cctk snp --checkpoint CKPT --out DIR [--threshold 0.3] [--readout-mode pooled|token|seqpool]
             [--readout-epochs N] [--split test] [--data-dir D] [--batch-size B]
             [--null-draws 1000] [--backend auto|triton|torch] [--device DEV]

The model and the dataset (name, directory, image size, dataset options: the same splits the
run trained and tested on) come from the checkpoint (``cctk.data.from_record``). The
readouts are trained on the training split (no augmentation); the node matrices come from the
analysed split (``--split``, test by default). Writes DIR/snp.json, DIR/nodes.npz and the PNG
figures, and prints a short summary.
"""
from __future__ import annotations

import argparse
import os

from cctk import data
from cctk.checkpoint import (check_output_dir, checkpoint_provenance, is_pruned_checkpoint,
                             load_checkpoint, output_dir)
from cctk.errors import ConfigError
from cctk.snp.pipeline import run_snp, save
from cctk.snp.plots import figure_paths
from cctk.train import resolve_device

HELP = "single-nodal performance (SNP) of a checkpoint's nodes and heads"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="checkpoint.pt written by `cctk train`")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--threshold", type=float, default=0.3,
                   help="binarisation threshold theta on M / max (strict >)")
    p.add_argument("--readout-mode", default="pooled", choices=("pooled", "token", "seqpool"),
                   help="readout features: token means (pooled), every token's nodes (token), or a "
                        "learned sequence pooling of the tokens (seqpool; features held in memory)")
    p.add_argument("--readout-epochs", type=int, default=10, help="readout training epochs")
    p.add_argument("--readout-optimizer", default="adam", choices=("adam", "lbfgs", "sgd"),
                   help="readout optimiser; sgd is the group's readout: no bias, SGD momentum 0.975 "
                        "Nesterov, weight decay 1e-3, lr x0.975 per epoch")
    p.add_argument("--readout-lr", type=float, default=1e-2, help="readout learning rate (Adam, SGD)")
    p.add_argument("--split", default="test", choices=("train", "test", "val"),
                   help="split whose label-conditioned means build the node matrices")
    p.add_argument("--data-dir", default=None,
                   help="dataset directory (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size of the passes")
    p.add_argument("--subset", type=int, default=None,
                   help="use only the first N samples of each split (quick looks)")
    p.add_argument("--null-draws", type=int, default=1000,
                   help="random node-to-head assignments of the heads' null model")
    p.add_argument("--seed", type=int, default=0, help="seed of readouts and null model")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                   help="fused statistics ops backend")
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    p.add_argument("--cache-limit-gb", type=float, default=2.0,
                   help="largest readout feature cache; above it features are streamed")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")


def _datasets(ckpt: dict, args):
    """The run's training split and the analysed split, reopened from the checkpoint's data
    record (:func:`cctk.data.from_record`: same dataset options, so the same splits)."""
    record = ckpt.get("dataset")
    try:
        sets = {split: data.from_record(record, split, data_dir=args.data_dir, subset=args.subset)
                for split in dict.fromkeys(("train", args.split))}
    except data.DataError as exc:
        raise ConfigError(f"dataset of {args.checkpoint}: {exc}") from exc
    return record["name"], sets


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.threshold < 1:
        raise ConfigError(f"--threshold must lie in [0, 1), got {args.threshold}")
    if args.readout_epochs < 0 or args.null_draws < 0 or args.batch_size < 1:
        raise ConfigError("--readout-epochs and --null-draws must be >= 0, --batch-size >= 1")
    if args.subset is not None and args.subset < 1:
        raise ConfigError(f"--subset must be >= 1, got {args.subset}")
    if not args.cache_limit_gb >= 0:
        raise ConfigError(f"--cache-limit-gb must be >= 0, got {args.cache_limit_gb}")
    if args.readout_lr <= 0:
        raise ConfigError(f"--readout-lr must be > 0, got {args.readout_lr}")
    device = resolve_device(args.device)
    if args.backend == "triton" and device.type != "cuda":
        raise ConfigError(f"--backend triton runs on a CUDA GPU, not on {device}; use --backend "
                          f"auto or torch")
    check_output_dir(args.out, "snp", reads=[args.checkpoint], writes=["snp.json", "nodes.npz"])
    model, ckpt = load_checkpoint(args.checkpoint, map_location="cpu")
    if is_pruned_checkpoint(ckpt):
        raise ConfigError(f"{args.checkpoint} is a pruned checkpoint; SNP analyses the dense "
                          f"model: give the checkpoint.pt of `cctk train`")
    name, sets = _datasets(ckpt, args)
    num_classes = int(model.num_classes)
    if sets["train"].num_classes != num_classes:
        raise ConfigError(f"the checkpoint's model predicts {num_classes} classes, its dataset "
                          f"{name!r} now has {sets['train'].num_classes}")
    provenance = checkpoint_provenance(args.checkpoint, ckpt)
    with output_dir(args.out):
        loaders = {k: data.build_loader(v, args.batch_size, shuffle=False) for k, v in sets.items()}
        result = run_snp(
            model, loaders["train"], loaders[args.split], num_classes, threshold=args.threshold,
            readout_mode=args.readout_mode, readout_epochs=args.readout_epochs,
            readout_optimizer=args.readout_optimizer, readout_lr=args.readout_lr,
            backend=args.backend, null_draws=args.null_draws, seed=args.seed, device=device,
            cache_limit_bytes=int(args.cache_limit_gb * (1 << 30)), split=args.split, dataset=name,
            model_name=model.config.get("name"),
            extra_config={**provenance,
                          "dataset_options": (ckpt.get("dataset") or {}).get("dataset_options"),
                          "subset": args.subset, "trained_epochs": ckpt.get("epoch")})
        paths = save(result, args.out, plots=not args.no_plots)
        # an earlier run's figures that this run did not draw (--no-plots, fewer blocks) go
        for stale in figure_paths(args.out):
            if stale not in paths.values():
                os.unlink(stale)
    print(format_summary(result.summary))
    print(f"wrote {', '.join(sorted(os.path.basename(p) for p in paths.values()))} to {args.out}")
    return 0


def _f(v, spec=".3f"):
    return "  n/a" if v is None else format(v, spec)


def format_summary(summary: dict) -> str:
    """A short readable table: per block readout accuracy, cluster size and SNR of mha and ff;
    the heads' specialisation z and p; the final-stream nodes."""
    cfg = summary["config"]
    lines = [f"SNP of {cfg.get('model')} on {cfg.get('dataset')}/{cfg.get('split')} "
             f"({summary.get('num_samples')} samples, model accuracy "
             f"{_f(summary.get('model_accuracy'))}; readout {cfg['readout_mode']}, "
             f"theta {cfg['threshold']})",
             "block  | mha: acc  size   SNR   | ff: acc  size   SNR   | heads: share  z      p"]
    for b, (blk, head) in enumerate(zip(summary["blocks"], summary["heads"])):
        def snr(e):
            return "  inf" if e.get("snr") is None and e.get("snr_infinite") else _f(e.get("snr"), ".2f")
        m, f = blk["mha"], blk["ff"]
        lines.append(f"{b:>5}  |      {_f(m['readout_accuracy'])} {_f(m['mean_cluster_size'], '.2f')} "
                     f"{snr(m):>6} |     {_f(f['readout_accuracy'])} {_f(f['mean_cluster_size'], '.2f')} "
                     f"{snr(f):>6} |        {_f(head['share_mean'])} {_f(head['null_z'], '6.2f')} "
                     f"{_f(head['p_value'], '.4f')}")
    tok = summary.get("tokens")
    if tok is not None:
        lines.append(f"tokens (stream entering block 0): readout acc {_f(tok['readout_accuracy'])}, "
                     f"mean |D| {_f(tok['mean_recognized'], '.2f')}")
    fin = summary["final"]
    lines.append(f"final stream: mean |D| {_f(fin['mean_recognized'], '.2f')}, fc weights kept by "
                 f"ANDC {_f(fin['fc_kept_fraction'])}")
    return "\n".join(lines)
