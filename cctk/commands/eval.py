"""``cctk eval``: evaluate a checkpoint (dense or pruned) on a dataset split."""
from __future__ import annotations

import argparse
import json
import os

from cctk.commands.options import KeyValueAction, positive

HELP = "evaluate a checkpoint on a dataset split"


REPORT_KEYS = ("checkpoint", "split", "accuracy", "samples")


def _check_report_path(out: str, checkpoint: str) -> None:
    """``--out`` is a new file or an earlier report of ``cctk eval`` (never the checkpoint
    itself, nor any other file: eval replaces only its own JSON reports)."""
    from cctk.errors import ConfigError

    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a directory; give a file name for the JSON result")
    if not os.path.lexists(out):
        return
    if os.path.exists(checkpoint) and os.path.samefile(out, checkpoint):
        raise ConfigError(f"--out {out} is the checkpoint it evaluates; give a new file name for the JSON result")
    try:
        with open(out) as f:
            old = json.load(f)
        ours = isinstance(old, dict) and all(k in old for k in REPORT_KEYS)
    except (OSError, ValueError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise ConfigError(f"--out {out} exists and is not a report of `cctk eval`; give a new file name "
                          f"(eval replaces only its own earlier reports)")


def run(args: argparse.Namespace) -> int:
    import torch

    from cctk import data
    from cctk.train import (ConfigError, check_model_input, evaluate, load_checkpoint,
                            resolve_amp, resolve_device)

    positive("--batch-size", args.batch_size, allow_none=False)
    positive("--subset", args.subset)
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    positive("--img-size", args.img_size)
    if args.out is not None:
        _check_report_path(args.out, args.checkpoint)
    device = resolve_device(args.device)
    model, ckpt = load_checkpoint(args.checkpoint, map_location="cpu")
    model.to(device)
    trained_on = ckpt.get("dataset") if isinstance(ckpt.get("dataset"), dict) else {}
    name = args.dataset or trained_on.get("name")
    if name is None:
        raise ConfigError("the checkpoint names no dataset; pass --dataset")
    try:
        name = data.canonical_name(name)
        # the run's own data record (its directory, image size, options); another dataset
        # starts from nothing; the options given here go on top
        same = name == trained_on.get("name")
        record = dict(trained_on) if same else {"name": name}
        if args.data_dir is not None:
            record["data_dir"] = args.data_dir
        if args.img_size is not None:
            record["img_size"] = args.img_size
        if args.dataset_options:
            record["dataset_options"] = {**(record.get("dataset_options") or {}), **args.dataset_options}
        args.split = args.split or "eval"
        ds = data.from_record(record, args.split, subset=args.subset, download=args.download)
        if args.split == "eval":
            args.split = record.get("eval_split") or data.dataset_info(name).eval_split
    except ConfigError:
        raise
    except (data.DataError, KeyError, ValueError, OSError, RuntimeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise ConfigError(f"dataset {name!r}: {msg}") from exc
    if ds.num_classes != model.num_classes:
        raise ConfigError(f"the checkpoint's model predicts {model.num_classes} classes, dataset "
                          f"{name!r} has {ds.num_classes}")
    check_model_input(model, ds.in_channels, ds.img_size, device)
    if len(ds) == 0:
        raise ConfigError(f"dataset {name!r} split {args.split!r} holds no images")
    loader = data.build_loader(ds, args.batch_size, shuffle=False, num_workers=args.num_workers)
    from cctk.optimize import optimize

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    name_of_model = model.config.get("name")
    if args.optimize:
        # the way to run a trained or pruned model: cctk.optimize (fused kernels, weights in dtype)
        model = optimize(model, dtype=dtype)
    elif dtype != torch.float32:
        model = model.to(dtype)
        # the loader's images are fp32: cast them to the weights' dtype on entry
        model.register_forward_pre_hook(lambda module, inputs: (inputs[0].to(dtype),) + tuple(inputs[1:]))
    amp_dtype = resolve_amp(args.amp, device) if dtype == torch.float32 else None
    result = evaluate(model, loader, device, amp_dtype)
    report = {"checkpoint": os.path.abspath(args.checkpoint),
              "model": name_of_model, "dataset": name, "split": args.split,
              "img_size": ds.img_size, "samples": result["n"], "accuracy": result["accuracy"],
              "loss": result["loss"], "trained_epochs": ckpt.get("epoch"), "dtype": args.dtype,
              "optimized": bool(args.optimize)}
    print(f"{report['model']} ({args.dtype}{', cctk.optimize' if args.optimize else ''}) on {name}/{args.split} "
          f"({result['n']} images): accuracy "
          f"{result['accuracy']:.4f}, loss {result['loss']:.4f}")
    if args.out:
        from cctk.checkpoint import atomic_write_text

        atomic_write_text(json.dumps(report, indent=2) + "\n", args.out)
        print(f"wrote {args.out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="checkpoint.pt written by `cctk train`")
    p.add_argument("--dataset", default=None,
                   help="dataset to evaluate on; None: the one the checkpoint was trained on")
    p.add_argument("--data-dir", default=None,
                   help="dataset directory; None: the checkpoint's, for the same dataset")
    p.add_argument("--split", default=None,
                   help="train, test (flowers102 also val); None: the split the dataset's runs "
                        "evaluate on (test; val for flowers102)")
    p.add_argument("--dataset-options", action=KeyValueAction, default=None, metavar="KEY=VALUE",
                   help="dataset-specific option (none given: the checkpoint's, for the same "
                        "dataset); repeat for several")
    p.add_argument("--img-size", type=int, default=None,
                   help="image side; None: the checkpoint's, for the same dataset")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--subset", type=int, default=None, metavar="N",
                   help="evaluate on the first N images only")
    p.add_argument("--device", default=None, help="cpu, cuda, ...; None: cuda when available")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision for the forward pass (float32 only)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights and activations; bfloat16 is the fast CPU inference type")
    p.add_argument("--no-optimize", dest="optimize", action="store_false",
                   help="run the model as loaded instead of through cctk.optimize (fused kernels)")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--out", default=None, metavar="JSON", help="also write the result to JSON")
