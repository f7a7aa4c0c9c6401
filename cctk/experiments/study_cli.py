"""``cctk study``: every pruning method x density x seed with the same fine-tune budget; choices on
validation data only; results.csv, summary.json (95% CIs, paired differences vs magnitude,
Holm) and report.html. Resumable: rerun the same command and finished cells are kept.

    cctk study --dataset digits --seeds 2 --densities 0.25 --methods all --finetune-epochs 1 \\
               --out runs/study_digits
    cctk study --dataset fashion-mnist --seeds 3 --densities 0.5,0.25,0.125 --methods all \\
               --finetune-epochs 1 --out runs/study_fmnist
    # the same trained models, SNP re-measured (token sets), the old rule and each fix alone:
    cctk study --dataset fashion-mnist --seeds 3 --epochs 12 --val-size 5000 --densities 0.25 \\
               --methods andc,magnitude,andc-old,andc-old+tokens,andc-old+kept-fraction,andc-old+node-v \\
               --dense-classifier --models-from docs/study_fmnist --out runs/study_fmnist_ablation
"""
from __future__ import annotations

import argparse

HELP = "pruning as a controlled experiment: methods x densities x seeds, CIs, paired tests, report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (rerun to resume)")
    p.add_argument("--dataset", default="digits", help="dataset name (`cctk datasets`)")
    p.add_argument("--seeds", default="3", help="number of seeds N (seeds 0..N-1) or a comma list")
    p.add_argument("--densities", default="0.5,0.25,0.125", help="comma-separated target densities")
    p.add_argument("--methods", default="all", help="'all' (andc, magnitude, wanda, random, andc-shuffled, "
                   "structured, structured-activation) or a comma list of those, andc-magnitude, structured-andc (the "
                   "hybrid) and the ablation of cctk's first ANDC rule: andc-old (summed overlap, head sets for v, "
                   "token channels assumed to recognise every label), andc-old+tokens, andc-old+kept-fraction, "
                   "andc-old+node-v (that rule with one fix each)")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tune epochs of every pruned model")
    p.add_argument("--block-score", default="kept-fraction", choices=("kept-fraction", "sum"),
                   help="ANDC block score of the label-set methods: the fraction of a block's connections the rule "
                        "keeps, ties by L1 (kept-fraction, default) or the summed overlap (sum, cctk's first rule)")
    p.add_argument("--v-sets", default="node", choices=("node", "head"),
                   help="label sets of qkv's v rows: the MHA node each produces (node, default) or its head's (head)")
    p.add_argument("--token-sets", default="measured", choices=("measured", "assume-all"),
                   help="label sets of the stream entering block 0: measured by the study's SNP (default) or "
                        "assume-all (every token channel recognises every label: cctk's first rule)")
    p.add_argument("--qkv-budget", default=None, choices=("fused", "split"),
                   help="every block method's density of a fused qkv layer: met by q, k and v each (split, "
                        "default) or over the whole layer (fused; a study that ran with it resumes with it)")
    p.add_argument("--models-from", default=None, metavar="DIR[,DIR...]",
                   help="reuse the trained models of other study directories (the first one's seed{s}/train that "
                        "exists, trained with the same dataset, model, epochs, training pool and validation size); "
                        "seeds none has are trained here; SNP and every cell are run here")
    p.add_argument("--finetune-subset", type=int, default=None,
                   help="fine-tune every pruned model on the first N training images (same for all methods)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tune learning rate")
    p.add_argument("--model", default=None, help="model name (default: the dataset's)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the preset's)")
    p.add_argument("--block-size", type=int, default=None, choices=(16, 32, 64),
                   help="block size (default: the dataset's)")
    p.add_argument("--train-subset", type=int, default=None,
                   help="use the first N training images (training part + validation)")
    p.add_argument("--test-subset", type=int, default=None, help="use the first N test images")
    p.add_argument("--val-size", type=int, default=500,
                   help="validation images carved from the end of the training pool")
    p.add_argument("--threshold", type=float, default=0.3, help="SNP threshold theta")
    p.add_argument("--readout-epochs", type=int, default=10, help="SNP readout epochs")
    p.add_argument("--readout-optimizer", default="adam", help="SNP readout optimiser: adam, lbfgs or sgd")
    p.add_argument("--classifier-tolerance", type=float, default=0.005,
                   help="classifier threshold: largest one within this validation-accuracy loss of dense")
    p.add_argument("--dense-classifier", action="store_true",
                   help="keep the classifier dense for every method (no classifier ANDC): the control for "
                        "structured removal, which never prunes the classifier")
    p.add_argument("--compare-with", default=None, metavar="DIR",
                   help="another study of the same models (e.g. another --finetune-epochs): the summary adds each "
                        "paired difference here minus the same one there, paired by seed")
    p.add_argument("--snp-variants", action="store_true",
                   help="also SNP with both readouts (adam, the group's sgd) x theta 0.2/0.3/0.5 on validation")
    p.add_argument("--checkpoints", default=None, help="comma list of trained checkpoints, one per seed")
    p.add_argument("--bench-batch", type=int, default=32, help="images/s batch")
    p.add_argument("--bench-rounds", type=int, default=3, help="interleaved timing rounds (fastest kept)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes running cells at once (one thread each on this CPU); images/s are then "
                        "timed after the cells, with nothing else running")
    p.add_argument("--time-only", action="store_true",
                   help="run no new cell: time the finished cells that have no images/s yet, or were timed while "
                        "other processes held over a quarter of the CPUs, and write the summary")
    p.add_argument("--anatomy", action="store_true",
                   help="run no new cell: write anatomy.json/.md, what each finished block-method cell kept (heads left "
                        "without q/k/v blocks, dead input columns, kept share of |W|), at every --densities")
    p.add_argument("--retime", action="store_true",
                   help="with --time-only: time every finished cell again (e.g. on another machine)")
    p.add_argument("--data-dir", default=None, help="dataset directory")
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _list(text: str, kind, what: str):
    from cctk.errors import ConfigError
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what}: expected a comma-separated list, got {text!r}") from None
    if not values:
        raise ConfigError(f"--{what} is empty")
    return values


def _forget_a_study_that_did_nothing(out: str) -> None:
    """A study directory holds a study (whose settings a rerun must keep) only once it holds a
    result or a trained checkpoint: one stopped before that (an error, kill -9 in its first
    training) is started again with whatever settings are given now."""
    import glob
    import os

    config = os.path.join(out, "study_config.json")
    if not os.path.isfile(config):
        return
    work = glob.glob(os.path.join(glob.escape(out), "results.csv")) + glob.glob(
        os.path.join(glob.escape(out), "seed*", "*", "checkpoint.pt")) + glob.glob(
        os.path.join(glob.escape(out), "seed*", "snp", "snp.json"))
    if not work:
        os.unlink(config)


def run(args: argparse.Namespace) -> int:
    from cctk.errors import ConfigError
    from cctk.experiments.study import StudyConfig, run_study
    from cctk.prune.pruner import ALL_METHODS

    if args.device is not None:
        from cctk.train import resolve_device
        resolve_device(args.device)   # an unknown or absent device is a ConfigError
    from cctk.checkpoint import check_output_dir

    if args.model is not None:
        from cctk.models import list_models
        if args.model not in list_models():
            raise ConfigError(f"unknown model {args.model!r}; `cctk models` lists the {len(list_models())} "
                              f"available names")
    checkpoints = _list(args.checkpoints, str, "checkpoints") if args.checkpoints else None
    check_output_dir(args.out, "study", reads=checkpoints or ())
    _forget_a_study_that_did_nothing(args.out)
    seeds = _list(args.seeds, int, "seeds")
    if len(seeds) == 1 and "," not in args.seeds:
        if seeds[0] < 1:
            raise ConfigError(f"--seeds must be >= 1, got {seeds[0]}")
        seeds = list(range(seeds[0]))
    methods = list(ALL_METHODS) if args.methods.strip() == "all" else _list(args.methods, str, "methods")
    for what in ("finetune_epochs", "finetune_subset", "epochs", "train_subset", "test_subset", "block_size", "readout_epochs"):
        v = getattr(args, what)
        if v is not None and v < (0 if what in ("finetune_epochs", "readout_epochs") else 1):
            raise ConfigError(f"--{what.replace('_', '-')} must be >= {0 if what in ('finetune_epochs', 'readout_epochs') else 1}, got {v}")
    cfg = StudyConfig(out=args.out, dataset=args.dataset, seeds=seeds,
                      densities=_list(args.densities, float, "densities"), methods=methods,
                      finetune_epochs=args.finetune_epochs, finetune_subset=args.finetune_subset, lr=args.lr, model=args.model, epochs=args.epochs,
                      block_size=args.block_size, train_subset=args.train_subset, test_subset=args.test_subset,
                      val_size=args.val_size, threshold=args.threshold, readout_epochs=args.readout_epochs,
                      readout_optimizer=args.readout_optimizer, classifier_tolerance=args.classifier_tolerance,
                      checkpoints=_list(args.checkpoints, str, "checkpoints") if args.checkpoints else None,
                      models_from=_list(args.models_from, str, "models-from") if args.models_from else None, block_score=args.block_score, v_sets=args.v_sets,
                      token_sets=args.token_sets, compare_with=args.compare_with, snp_variants=args.snp_variants, bench_batch=args.bench_batch, bench_rounds=args.bench_rounds, workers=args.workers, time_only=args.time_only, retime=args.retime, data_dir=args.data_dir,
                      device=args.device, progress=not args.no_progress,
                      **({"classifier_scan": ()} if args.dense_classifier else {}),
                      **({"qkv_budget": args.qkv_budget} if args.qkv_budget else {}))
    if args.anatomy:
        if args.time_only:
            raise ConfigError("--anatomy and --time-only are separate runs: give one of them")
        cfg.check()
        from cctk.experiments.study.anatomy import study_anatomy
        study_anatomy(args.out, cfg.densities, None if args.methods.strip() == "all" else methods,
                      data_dir=args.data_dir)
        print(f"wrote {args.out}/anatomy.json, anatomy.md")
        return 0
    summary = run_study(cfg)
    for p in summary["paired"]:
        if p["primary"]:
            lo, hi = p["ci95"]
            ci = "n/a" if lo is None else f"[{lo:+.4f}, {hi:+.4f}]"
            flip = "" if p.get("p_sign_flip") is None else f", sign-flip p = {p['p_sign_flip']:.3g}"
            print(f"primary: {p['method']} - {p['baseline']} at density {p['density']}: "
                  f"{p['mean_diff']:+.4f}, 95% CI {ci}{flip}, n = {p['n']}")
    print(f"wrote {args.out}/results.csv, summary.json, report.html")
    return 0
