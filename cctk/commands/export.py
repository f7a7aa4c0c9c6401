"""``cctk export``: a cctk checkpoint (dense, structured or block-pruned) as a file ONNX Runtime or
OpenVINO loads, checked against PyTorch's logits before it is called done.

    cctk export --checkpoint CKPT --format onnx|openvino --out DIR [--dtype float32|bfloat16]
                [--batch N|dynamic]

Writes DIR/model.onnx (ONNX Runtime) or DIR/model.xml + DIR/model.bin (OpenVINO IR), and
DIR/export.json (the checkpoint and its sha256, format, dtype, batch, the logit check). The
exported file is run once on seeded images and its logits compared with the PyTorch model's
(fp32: within 1e-4 of the logit scale; bf16: 5%). A block-pruned model (``ANDCLinear`` layers)
exports as dense weights with its pruned blocks as zeros: the runtime does not skip them (run
the pruned model fast with ``cctk.optimize``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

HELP = "export a checkpoint to ONNX or OpenVINO (checked against PyTorch's logits)"


def _batch(text: str):
    if text.strip().lower() == "dynamic":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a batch size N >= 1 or 'dynamic', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a batch size N >= 1 or 'dynamic', got {text!r}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cctk.deploy import DTYPES, FORMATS

    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="checkpoint.pt written by `cctk train` or `cctk prune`")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx: model.onnx for ONNX Runtime; openvino: model.xml + model.bin (IR)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                   help="weights and activations of the exported graph (bfloat16: openvino only)")
    p.add_argument("--batch", default=None, type=_batch, metavar="N|dynamic",
                   help="a fixed batch size N, or dynamic (default: dynamic)")


def run(args: argparse.Namespace) -> int:
    from cctk import deploy
    from cctk.checkpoint import (TMP_PREFIX, atomic_write_text, check_output_dir, file_digest,
                                 is_pruned_checkpoint, load_checkpoint, output_dir)
    from cctk.errors import ConfigError

    if args.format == "onnx" and args.dtype != "float32":
        raise ConfigError("--dtype bfloat16 is for --format openvino: ONNX Runtime's CPU provider has no "
                          "bfloat16 kernels for this model; export float32 to ONNX")
    try:
        deploy.runtime_module(args.format)
    except ImportError as exc:
        raise ConfigError(str(exc)) from None
    names = ["model.onnx"] if args.format == "onnx" else ["model.xml", "model.bin"]
    check_output_dir(args.out, "export", reads=[args.checkpoint], writes=names + ["export.json"])
    model, ckpt = load_checkpoint(args.checkpoint, map_location="cpu")
    sparse_layers = deploy.count_block_sparse(model)
    with output_dir(args.out):
        # export into a temporary directory beside the results (cleared by output_dir if this
        # process is killed) and move the files into place only after the check passed
        tmp = tempfile.mkdtemp(prefix=TMP_PREFIX + "export-", dir=args.out)
        try:
            files = deploy.export_model(model, tmp, args.format, args.dtype, args.batch)
            check = deploy.check_exported(model, files, args.format, args.dtype, args.batch)
            record = {"checkpoint": os.path.abspath(args.checkpoint),
                      "checkpoint_sha256": file_digest(args.checkpoint),
                      "model": model.config.get("name"), "format": args.format, "dtype": args.dtype,
                      "batch": args.batch or "dynamic",
                      "input_shape": ["batch" if args.batch is None else args.batch, int(model.in_channels),
                                      int(model.img_size), int(model.img_size)],
                      "pruned": is_pruned_checkpoint(ckpt), "block_sparse_layers_as_dense": sparse_layers,
                      "files": names, "check": check}
            for f in files:
                os.replace(f, os.path.join(args.out, os.path.basename(f)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        atomic_write_text(json.dumps(record, indent=2) + "\n", os.path.join(args.out, "export.json"))
    if sparse_layers:
        print(f"note: the {sparse_layers} block-pruned (ANDCLinear) layers are exported as dense weights with "
              f"their pruned blocks as zeros; {'ONNX Runtime' if args.format == 'onnx' else 'OpenVINO'} "
              f"will not skip them (cctk.optimize runs the block-sparse kernels)")
    print(f"checked: {args.format} logits equal PyTorch's within {check['max_abs_diff']:.2g} (logit scale "
          f"{check['logit_scale']:.3g}, {args.dtype}, batch {args.batch or 'dynamic'})")
    print(f"wrote {', '.join(os.path.join(args.out, n) for n in names + ['export.json'])}")
    return 0
