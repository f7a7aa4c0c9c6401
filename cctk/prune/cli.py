"""``cctk prune``: prune a trained checkpoint by any method of the registry
(``cctk.prune.pruner.METHODS``), fine-tune with the masks fixed, convert every block-pruned
encoder linear to ANDCLinear.

    cctk prune --checkpoint CKPT [--snp DIR] --method METHOD --density 0.25 --block-size 32
               --finetune-epochs N --out DIR [--tau T] [--min-overlap M] [--lr LR] [--seed S]
               [--order auto|dominant|lexicographic|identity] [--classifier-threshold TH]
               [--data-dir D] [--device DEV]

Methods (the registry ``cctk.prune.pruner.METHODS``): block methods ``andc``, ``andc-shuffled``,
``andc-magnitude`` and the ablation variants ``andc-old*`` (these need --snp), ``magnitude``
(norm-sorted permutations), ``wanda`` (calibration: the first 256 training images), ``random``;
structured node removal ``structured`` (SNP-ranked, needs --snp) and ``structured-activation``:
whole FF units and head dims removed, a smaller dense CCT (``--density`` is then the kept
fraction of nodes); and the hybrid ``structured-andc`` (needs --snp): SNP-ranked node removal,
then ANDC blocks in the smaller model, to the linear density ``--density``.

The ANDC rule (SCIENCE.md 5): ``--block-score kept-fraction|sum``, ``--v-sets node|head``,
``--token-sets measured|assume-all`` (an SNP directory written before cctk measured the tokens is
refused unless ``--token-sets assume-all`` asks for the old assumption).

--snp is the `cctk snp` output directory of the same checkpoint (recognised label sets); an SNP
directory of another checkpoint or model is refused (snp.json records the checkpoint's sha256
and model config). The data are the run's own splits (``cctk.data.from_record``): the training
split for fine-tuning, the split the run evaluated on for the accuracies. With --snp the
non-ANDC block methods keep as many classifier weights as ANDC's label-set rule keeps (and with
--tau meet ANDC's per-layer densities); without --snp they use --density everywhere and leave
the classifier dense. Writes DIR/checkpoint.pt (a pruned cctk checkpoint: `cctk eval` and
`cctk.prune.load_pruned` read it; no dense weights of pruned layers) and DIR/prune.json
(per-layer densities, classifier density, accuracy of the dense model, before and after
fine-tuning).
"""
from __future__ import annotations

import argparse
import json
import os
import zipfile

import numpy as np
import torch

from cctk import data
from cctk.checkpoint import (atomic_write_files, check_output_dir, checkpoint_provenance, is_pruned_checkpoint,
                             load_checkpoint, output_dir)
from cctk.errors import ConfigError
from cctk.prune.andc import TOKEN_SETS, V_SETS, AndcRule, RecognizedSets, final_stream_means, final_stream_sets
from cctk.prune.convert import pruned_checkpoint
from cctk.prune.masks import BLOCK_SCORES
from cctk.prune.plan import DEFAULT_QKV_BUDGET, QKV_BUDGETS
from cctk.prune.pruner import METHODS, STRUCTURED_METHODS, PruneSpec, method_rule
from cctk.prune.workflow import data_loaders, prune_and_finetune
from cctk.train import evaluate, resolve_device

#: the methods that read the SNP label sets
SNP_METHODS = tuple(m.name for m in METHODS.values() if m.needs_sets)

HELP = "prune a checkpoint (ANDC, magnitude, wanda, random, controls, structured), fine-tune, convert"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="dense checkpoint.pt written by `cctk train`")
    p.add_argument("--snp", default=None, metavar="DIR",
                   help="`cctk snp` output directory of the same checkpoint (needed by --method andc)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--method", default="andc", choices=tuple(METHODS),
                   help="pruning method (default: andc): " + "; ".join(f"{m.name}: {m.help}" for m in METHODS.values()))
    p.add_argument("--density", type=float, default=0.25,
                   help="target kept fraction of blocks in every encoder linear (structured methods: "
                        "of FF units and head dims)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random and andc-shuffled methods")
    p.add_argument("--tau", type=float, default=None,
                   help="instead of --density: keep every block whose kept-connection fraction is >= tau")
    p.add_argument("--block-size", type=int, default=32, choices=(16, 32, 64), help="block side B")
    p.add_argument("--min-overlap", type=int, default=1,
                   help="keep a connection iff its nodes share at least this many recognised labels")
    p.add_argument("--block-score", default="kept-fraction", choices=BLOCK_SCORES,
                   help="ANDC block score: the fraction of a block's connections the rule keeps, ties by L1 "
                        "(kept-fraction, default) or the summed overlap counts (sum, cctk's first rule)")
    p.add_argument("--v-sets", default="node", choices=V_SETS,
                   help="label sets of qkv's v rows: the MHA node each produces (node, default) or its head's (head)")
    p.add_argument("--token-sets", default="measured", choices=TOKEN_SETS,
                   help="label sets of the stream entering block 0: measured by `cctk snp` (default; SNP results "
                        "without them are refused) or assume-all (every token channel recognises every label: "
                        "the old assumption)")
    p.add_argument("--qkv-budget", default=DEFAULT_QKV_BUDGET, choices=QKV_BUDGETS,
                   help="a fused qkv layer's density met by q, k and v each (split, default: as three layers) "
                        "or over the whole layer (fused: one of them can take the others' blocks)")
    p.add_argument("--order", default="auto", choices=("auto", "dominant", "lexicographic", "identity"),
                   help="node order used to gather kept connections into blocks")
    p.add_argument("--no-classifier", action="store_true", help="leave the classifier dense")
    p.add_argument("--classifier-threshold", type=float, default=None,
                   help="threshold of the classifier's ANDC (final-stream node matrices from the model's own "
                        "head, measured on the training split); default: the SNP run's sets (its threshold)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="fine-tuning epochs (masks fixed)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak learning rate (AdamW, cosine to lr/10)")
    p.add_argument("--batch-size", type=int, default=64, help="fine-tuning batch size")
    p.add_argument("--sparse-finetune", action="store_true",
                   help="fine-tune the ANDCLinear layers through their sparse autograd (default: masked dense weights)")
    p.add_argument("--data-dir", default=None, help="dataset directory (default: the checkpoint's)")
    p.add_argument("--subset", type=int, default=None, help="use only the first N samples of each split")
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")


def check_snp_provenance(snp_dir: str, checkpoint: str, ckpt: dict) -> None:
    """Refuse an SNP directory computed from another checkpoint or model: its ``snp.json``
    records the checkpoint's sha256 and model config (``cctk snp`` writes them)."""
    rerun = f"rerun `cctk snp --checkpoint {checkpoint} --out {snp_dir}`"
    try:
        with open(os.path.join(snp_dir, "snp.json")) as f:
            summary = json.load(f)
        recorded = summary["config"]
        if not isinstance(recorded, dict) or not isinstance(recorded.get("model_config", {}), dict):
            raise TypeError("its config is not a record of `cctk snp`")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--snp {snp_dir}: cannot read its snp.json ({exc}); {rerun}") from None
    try:
        with np.load(os.path.join(snp_dir, "nodes.npz")) as z:
            npz_digest = str(z["checkpoint_sha256"]) if "checkpoint_sha256" in z.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"--snp {snp_dir}: its nodes.npz is damaged or incomplete ({exc}); {rerun}") from None
    mine = checkpoint_provenance(checkpoint, ckpt)
    if npz_digest is None or npz_digest != recorded.get("checkpoint_sha256"):
        raise ConfigError(f"--snp {snp_dir}: its nodes.npz and snp.json do not name the same checkpoint "
                          f"(written by different runs, or by an older cctk); {rerun}")
    if recorded.get("checkpoint_sha256") is None:
        raise ConfigError(f"--snp {snp_dir} records no checkpoint digest (written by an older "
                          f"cctk); rerun `cctk snp --checkpoint {checkpoint} --out {snp_dir}`")
    if recorded.get("model_config") != mine["model_config"]:
        raise ConfigError(f"--snp {snp_dir} was computed for another model "
                          f"({(recorded.get('model_config') or {}).get('name')!r}, not "
                          f"{mine['model_config'].get('name')!r}); rerun `cctk snp` on {checkpoint}")
    if recorded["checkpoint_sha256"] != mine["checkpoint_sha256"]:
        raise ConfigError(f"--snp {snp_dir} was computed from another checkpoint "
                          f"({recorded.get('checkpoint')}), not {checkpoint}; rerun `cctk snp "
                          f"--checkpoint {checkpoint} --out DIR`")


def _check_args(args: argparse.Namespace) -> None:
    if args.method in SNP_METHODS and args.snp is None:
        raise ConfigError(f"--method {args.method} needs --snp DIR (run `cctk snp --checkpoint CKPT --out DIR` first)")
    if args.method in STRUCTURED_METHODS and args.tau is not None:
        raise ConfigError(f"--method {args.method} takes --density (the kept fraction of nodes), not --tau")
    if not 0 < args.density <= 1:
        raise ConfigError(f"--density must be in (0, 1], got {args.density}")
    if args.tau is not None and not 0 <= args.tau <= 1:
        raise ConfigError(f"--tau must be in [0, 1], got {args.tau}")
    if args.min_overlap < 1:
        raise ConfigError(f"--min-overlap must be >= 1, got {args.min_overlap}")
    if args.finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if not args.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.subset is not None and args.subset < 1:
        raise ConfigError(f"--subset must be >= 1, got {args.subset}")
    if args.classifier_threshold is not None:
        if args.snp is None:
            raise ConfigError("--classifier-threshold needs --snp")
        if not 0 <= args.classifier_threshold < 1:
            raise ConfigError(f"--classifier-threshold must lie in [0, 1), got {args.classifier_threshold}")
    check_output_dir(args.out, "prune", reads=[args.checkpoint, args.snp], writes=["checkpoint.pt", "prune.json"])


def _rule(args: argparse.Namespace) -> AndcRule:
    return AndcRule(min_overlap=max(1, args.min_overlap), block_score=args.block_score, v_sets=args.v_sets,
                    token_sets=args.token_sets, order=args.order)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    device = resolve_device(args.device)
    model, ckpt = load_checkpoint(args.checkpoint, map_location="cpu")
    if is_pruned_checkpoint(ckpt):
        raise ConfigError(f"{args.checkpoint} is already pruned; prune the dense checkpoint.pt "
                          f"of `cctk train` (use --density to choose how much to keep)")
    sets = None
    if args.snp is not None:
        if not os.path.isfile(os.path.join(args.snp, "nodes.npz")):
            raise ConfigError(f"{args.snp} holds no nodes.npz: run `cctk snp --checkpoint {args.checkpoint} --out {args.snp}`")
        check_snp_provenance(args.snp, args.checkpoint, ckpt)
        try:
            sets = RecognizedSets.from_snp(args.snp, num_blocks=model.num_blocks)
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"--snp {args.snp}: its nodes.npz is damaged or incomplete ({exc}); "
                              f"rerun `cctk snp --checkpoint {args.checkpoint} --out {args.snp}`") from None
        # the rule reads the token sets (a label-set method, or any block method meeting ANDC's tau densities)
        rule = method_rule(args.method, _rule(args)) or (_rule(args) if args.tau is not None else None)
        if rule is not None and rule.token_sets == "measured" and sets.tokens is None:
            raise ConfigError(f"--snp {args.snp} has no label sets for the tokens (written before cctk measured "
                              f"them): rerun `cctk snp --checkpoint {args.checkpoint} --out {args.snp}`, or pass "
                              f"--token-sets assume-all for the old assumption")
    try:
        train_loader, test_loader, num_classes = data_loaders(
            ckpt.get("dataset"), args.data_dir, batch_size=args.batch_size,
            train_subset=args.subset, test_subset=args.subset)
    except data.DataError as exc:
        raise ConfigError(f"dataset of {args.checkpoint}: {exc}") from exc
    if num_classes != model.num_classes:
        raise ConfigError(f"the checkpoint's model predicts {model.num_classes} classes, its dataset "
                          f"now has {num_classes}")
    if sets is not None and sets.num_labels != num_classes:
        raise ConfigError(f"the SNP sets have {sets.num_labels} labels, the dataset {num_classes}")
    with output_dir(args.out):
        classifier_sets = None
        if args.classifier_threshold is not None:
            means = final_stream_means(model, train_loader, num_classes, device)
            classifier_sets = final_stream_sets(model, means, args.classifier_threshold)
        dense_acc = evaluate(model.to(device), test_loader, device)["accuracy"]
        print(f"dense model: accuracy {dense_acc:.4f}")
        spec = PruneSpec(method=args.method, density=args.density, tau=args.tau, block_size=args.block_size,
                         rule=_rule(args), classifier=not args.no_classifier, classifier_sets=classifier_sets,
                         seed=args.seed, qkv_budget=args.qkv_budget, finetune_epochs=args.finetune_epochs, lr=args.lr,
                         sparse_finetune=args.sparse_finetune)
        pruned, plan, record = prune_and_finetune(model, spec, sets, train_loader, test_loader, device=device,
                                                  log=print)
        record["dense_accuracy"] = dense_acc
        record["classifier_threshold"] = args.classifier_threshold
        ckpt_path = os.path.join(args.out, "checkpoint.pt")
        record["checkpoint"] = os.path.abspath(ckpt_path)
        record["source_checkpoint"] = os.path.abspath(args.checkpoint)
        record["snp"] = os.path.abspath(args.snp) if args.snp else None
        record["data"] = {"train_samples": len(train_loader.dataset), "eval_samples": len(test_loader.dataset),
                          "eval_split": ckpt["dataset"].get("eval_split"),
                          "dataset_options": ckpt["dataset"].get("dataset_options")}
        pruned_ckpt = pruned_checkpoint(pruned.cpu(), plan, source_checkpoint=ckpt,
                                        metrics={"test_accuracy": record["accuracy"],
                                                 "dense_accuracy": dense_acc})
        text = json.dumps(record, indent=1)
        # the pair is replaced together: both new files are complete before either is renamed
        atomic_write_files({ckpt_path: ("wb", lambda f: torch.save(pruned_ckpt, f)),
                            os.path.join(args.out, "prune.json"): ("w", lambda f: f.write(text))})
    print(f"linear density {record['linear_density']:.3f}, classifier density {record['classifier_density']:.3f}; "
          f"accuracy dense {dense_acc:.4f} -> pruned {record['accuracy_before_finetune']:.4f} -> "
          f"fine-tuned {record['accuracy']:.4f}")
    print(f"wrote {record['checkpoint']} and {os.path.join(args.out, 'prune.json')}")
    return 0
