"""``cctk demo``: the whole job on digits: train, SNP of every node, ANDC vs magnitude pruning,
fine-tune, dense vs pruned speed, summary.json + report.html."""
from __future__ import annotations

import argparse

HELP = ("the whole job on digits: train, SNP of every node, ANDC vs magnitude pruning, fine-tune, "
        "dense vs pruned speed, summary.json + report.html")


def run(args: argparse.Namespace) -> int:
    from cctk import data
    from cctk.checkpoint import check_output_dir
    from cctk.errors import ConfigError
    from cctk.experiments.demo import run_demo
    from cctk.train import resolve_device

    for what in ("epochs", "finetune_epochs", "train_subset", "test_subset", "null_draws"):
        v = getattr(args, what)
        low = 0 if what in ("finetune_epochs", "null_draws") else 1
        if v is not None and v < low:
            raise ConfigError(f"--{what.replace('_', '-')} must be >= {low}, got {v}")
    if args.density is not None and not 0 < args.density <= 1:
        raise ConfigError(f"--density must lie in (0, 1], got {args.density}")
    if args.device is not None:
        resolve_device(args.device)
    try:
        data.dataset_info(args.dataset)
    except (KeyError, ValueError, data.DataError) as exc:
        raise ConfigError(f"--dataset: {exc.args[0] if exc.args else exc}") from None
    check_output_dir(args.out, "demo")
    options = {k: getattr(args, k) for k in ("density", "block_size", "finetune_epochs", "train_subset",
                                              "test_subset", "null_draws") if getattr(args, k) is not None}
    if args.sweep is not None:
        options["sweep"] = args.sweep
    run_demo(args.out, dataset=args.dataset, epochs=args.epochs, seed=args.seed,
             data_dir=args.data_dir, device=args.device, **options)
    return 0


def _densities(text: str):
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated densities, got {text!r}")
    if any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"densities must lie in (0, 1], got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cctk.experiments.demo import DEFAULT_DENSITY, DEFAULT_EPOCHS, SWEEP_DENSITIES

    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--dataset", default="digits", help="dataset (digits needs no files)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs; None: the dataset's preset ({DEFAULT_EPOCHS} for digits)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--data-dir", default=None, help="dataset directory (not needed for digits)")
    p.add_argument("--device", default=None, help="cpu, cuda, ...; None: cuda when available")
    p.add_argument("--density", type=float, default=None,
                   help=f"kept block fraction of every encoder linear (default {DEFAULT_DENSITY})")
    p.add_argument("--block-size", type=int, default=None, choices=(16, 32, 64),
                   help="block size of the sparse layers (default: 16 for digits/fashion-mnist, else 32)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="fine-tune epochs after pruning (default 5)")
    p.add_argument("--sweep", type=_densities, default=None, metavar="D1,D2,...",
                   help="densities of the accuracy-vs-density sweep (default "
                        + ",".join(str(d) for d in SWEEP_DENSITIES) + ")")
    p.add_argument("--train-subset", type=int, default=None, metavar="N", help="train on the first N images only")
    p.add_argument("--test-subset", type=int, default=None, metavar="N", help="test on the first N images only")
    p.add_argument("--null-draws", type=int, default=None, help="draws of the heads' null model (default 1000)")
