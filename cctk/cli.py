"""The ``cctk`` command: ``cctk models``, ``cctk train``, ``cctk eval``, ``cctk demo`` (and the
commands of later modules, e.g. ``cctk snp`` and ``cctk prune``, when they are installed).

User errors (unknown model or dataset, missing data, an image size the model cannot take, a bad
option, a missing, empty, foreign or damaged file, a device this machine lacks, a read-only or
full file system) print one ``cctk <command>: error: ...`` line on stderr and exit with status 2,
having written nothing (every ``cctk.errors.ConfigError``, ``cctk.data.DataError`` and
``OSError`` of a command ends there).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

#: Commands that live in other modules, imported only when the CLI is built. Each module has
#: ``add_arguments(parser)`` and ``run(args) -> int`` (and optionally ``HELP``, a one-line
#: summary; otherwise the first line of its docstring). A module that is not installed is not
#: listed; one that fails to import is listed with its error and exits 1 when run.
COMMAND_MODULES: Dict[str, str] = {
    "snp": "cctk.snp.cli",
    "prune": "cctk.prune.cli",
    "study": "cctk.experiments.study_cli",
}

EXIT_USAGE = 2


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


# ---------------------------------------------------------------------------------------------
# cctk models


def _count_parameters(name: str) -> int:
    """Parameter count of the named model, built on the meta device (no memory, no init cost)."""
    import torch

    from cctk import models

    with torch.device("meta"):
        model = models.create_model(name)
    return sum(p.numel() for p in model.parameters())


def cmd_models(args: argparse.Namespace) -> int:
    from cctk import models

    rows = []
    for name in models.list_models():
        cfg = models.model_config(name)
        rows.append({
            "name": name, "layers": cfg["num_layers"], "heads": cfg["num_heads"],
            "dim": cfg["embedding_dim"], "mlp_ratio": cfg["mlp_ratio"],
            "tokenizer": f"{cfg['kernel_size']}x{cfg['n_conv_layers']}",
            "img_size": cfg["img_size"], "in_channels": cfg["in_channels"],
            "classes": cfg["num_classes"], "pos_emb": cfg["positional_embedding"],
            "params": _count_parameters(name),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("name", "layers", "heads", "dim", "mlp_ratio", "tokenizer", "img_size",
              "in_channels", "classes", "pos_emb", "params")
    table = [[str(r[h]) if h != "params" else f"{r[h]:,}" for h in header] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                    for i, (h, w) in enumerate(zip(header, widths))))
    for t in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths))))
    return 0


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the table as JSON")


# ---------------------------------------------------------------------------------------------
# cctk train


def _none_or(cast: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(s: str):
        return None if s.lower() in ("none", "off", "null") else cast(s)
    parse.__name__ = cast.__name__
    return parse


_CASTS = {"int": int, "float": float, "str": str}


def _parse_value(text: str):
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, 'none' -> None, anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


class _KeyValueAction(argparse.Action):
    """``--opt k=v`` (repeatable) accumulates into a dict."""

    def __call__(self, parser, namespace, values, option_string=None):
        if "=" not in values:
            parser.error(f"{option_string} expects KEY=VALUE, got {values!r}")
        key, val = values.split("=", 1)
        current = dict(getattr(namespace, self.dest, None) or {})
        current[key.strip().replace("-", "_")] = _parse_value(val.strip())
        setattr(namespace, self.dest, current)


def add_config_arguments(p: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """One option per :class:`~cctk.train.TrainConfig` field (``--batch-size`` for
    ``batch_size``), help text from the field's metadata; defaults are SUPPRESSed so that only
    the options given on the command line override the preset / checkpoint config."""
    from cctk.train import TrainConfig

    defaults = TrainConfig()
    group = p.add_argument_group(
        "training configuration (every TrainConfig field)",
        "Defaults shown are TrainConfig's; the preset (or, with --resume, the checkpoint's "
        "configuration) replaces them, and the options given here replace those.")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f.metadata.get("help", "")
        if default is not None:
            help_text += f" (default: {default!r})"
        typ = str(f.type).replace("typing.", "")
        kw: Dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if "Dict[" in typ:
            kw.update(action=_KeyValueAction, metavar="KEY=VALUE",
                      help=help_text + "; repeat the option for several")
        elif typ in ("bool", "Optional[bool]"):
            kw["action"] = argparse.BooleanOptionalAction
        elif "Tuple[float" in typ:
            kw.update(nargs=2, type=float, metavar=("A", "B"))
        elif typ.startswith("Optional["):
            inner = typ[len("Optional["):-1]
            kw.update(type=_none_or(_CASTS[inner]), metavar=inner.upper())
        else:
            kw.update(type=_CASTS[typ], metavar=typ.upper())
        if f.name == "resume":
            kw.update(nargs="?", const="auto", metavar="CKPT",
                      help="continue a run exactly from CKPT (default with no value: "
                           "<out>/checkpoint.pt); the checkpoint's configuration is used, "
                           "with the options given here on top")
        group.add_argument(flag, **kw)


def config_from_args(args: argparse.Namespace):
    """TrainConfig = base (the checkpoint's config when resuming, else ``--preset``, else the
    preset named like ``--dataset`` when there is one, else the defaults) + the options given."""
    from cctk.train import ConfigError, TrainConfig, get_preset, preset_for_dataset
    from cctk.train.loop import _resume_path, read_resume_checkpoint

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if hasattr(args, f.name)}
    for k in ("betas", "crop_scale"):
        if k in given:
            given[k] = tuple(given[k])
    preset = getattr(args, "preset", None)
    if "resume" in given and given["resume"] is not None:
        probe = TrainConfig(out=given.get("out", TrainConfig().out), resume=given["resume"])
        ckpt = read_resume_checkpoint(_resume_path(probe))
        base = TrainConfig.from_dict(ckpt["train_config"]).to_dict()
        if preset is not None:
            raise ConfigError("--preset cannot be combined with --resume (the checkpoint holds "
                              "the run's configuration)")
        source = f"checkpoint {_resume_path(probe)}"
    else:
        if preset is None:
            preset = preset_for_dataset(given.get("dataset", TrainConfig().dataset))
        if preset is not None:
            base = get_preset(preset).to_dict()
            source = f"preset {preset!r}"
        else:
            base = TrainConfig().to_dict()
            source = "defaults"
        # a preset's model belongs to its dataset: --dataset X without --model uses X's default
        if ("dataset" in given and "model" not in given and given["dataset"] != base["dataset"]
                and preset_for_dataset(given["dataset"]) != preset_for_dataset(base["dataset"])):
            base["model"] = None
            base["img_size"] = None
    base.update(given)
    return TrainConfig.from_dict(base).validate(), source


def cmd_train(args: argparse.Namespace) -> int:
    from cctk.train import train

    config, source = config_from_args(args)
    if config.verbose and int(os.environ.get("RANK", "0")) == 0:
        print(f"configuration: {source} + command-line options", flush=True)
    train(config)
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from cctk.train import PRESETS, list_presets

    p.add_argument("--preset", choices=list_presets(), default=None,
                   help="start from a named recipe: " + "; ".join(
                       f"{n}: {PRESETS[n].get('model') or 'default model'} on {PRESETS[n]['dataset']}, "
                       f"{PRESETS[n]['epochs']} epochs" for n in list_presets())
                   + ". Without --preset, the preset named like --dataset is used when there is one")

    add_config_arguments(p)


# ---------------------------------------------------------------------------------------------
# cctk eval


def positive(what: str, value, allow_none: bool = True) -> None:
    """A count option (``--batch-size``, ``--subset``) must be >= 1."""
    from cctk.errors import ConfigError

    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise ConfigError(f"{what} must be >= 1, got {value}")


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from cctk import data
    from cctk.train import (ConfigError, check_model_input, evaluate, load_checkpoint,
                            resolve_amp, resolve_device)

    positive("--batch-size", args.batch_size, allow_none=False)
    positive("--subset", args.subset)
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    positive("--img-size", args.img_size)
    if args.out is not None and os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} is a directory; give a file name for the JSON result")
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


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="checkpoint.pt written by `cctk train`")
    p.add_argument("--dataset", default=None,
                   help="dataset to evaluate on; None: the one the checkpoint was trained on")
    p.add_argument("--data-dir", default=None,
                   help="dataset directory; None: the checkpoint's, for the same dataset")
    p.add_argument("--split", default=None,
                   help="train, test (flowers102 also val); None: the split the dataset's runs "
                        "evaluate on (test; val for flowers102)")
    p.add_argument("--dataset-options", action=_KeyValueAction, default=None, metavar="KEY=VALUE",
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


# ---------------------------------------------------------------------------------------------
# cctk demo


def cmd_demo(args: argparse.Namespace) -> int:
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
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} is a file, not a directory; choose a directory")
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


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
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


# ---------------------------------------------------------------------------------------------
# parser


_BUILTIN = {
    "models": ("list the CCT models: layers, heads, width, tokenizer, parameters",
               add_models_arguments, cmd_models),
    "train": ("train a CCT (AdamW, warm-up + cosine, label smoothing, mixup/cutmix, AMP, "
              "checkpoints, exact --resume; DDP under torchrun)", add_train_arguments, cmd_train),
    "eval": ("evaluate a checkpoint on a dataset split", add_eval_arguments, cmd_eval),
    "demo": ("the whole job on digits: train, SNP of every node, ANDC vs magnitude pruning, "
             "fine-tune, dense vs pruned speed, summary.json + report.html",
             add_demo_arguments, cmd_demo),
}


def _load_command_modules() -> Dict[str, Any]:
    """{name: module or the exception that stopped its import}; missing modules are left out."""
    found: Dict[str, Any] = {}
    for name, modname in COMMAND_MODULES.items():
        try:
            if importlib.util.find_spec(modname) is None:
                continue
        except ModuleNotFoundError:
            continue
        except Exception as exc:  # the parent package itself fails to import
            found[name] = exc
            continue
        try:
            found[name] = importlib.import_module(modname)
        except Exception as exc:
            found[name] = exc
    return found


def build_parser() -> argparse.ArgumentParser:
    from cctk import __version__

    parser = argparse.ArgumentParser(
        prog="cctk", formatter_class=_Formatter,
        description="Compact Convolutional Transformers: training, evaluation, single-nodal "
                    "performance (SNP) and ANDC pruning.",
        epilog="examples:\n"
               "  cctk demo --out runs/demo\n"
               "  cctk models\n"
               "  cctk train --dataset digits --epochs 30 --out runs/digits\n"
               "  cctk train --preset cifar100 --data-dir ~/data --out runs/c100\n"
               "  torchrun --nproc_per_node=2 -m cctk.cli train --dataset digits --out runs/ddp\n"
               "  cctk train --out runs/digits --resume\n"
               "  cctk eval --checkpoint runs/digits/checkpoint.pt")
    parser.add_argument("--version", action="version", version=f"cctk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (summary, add_args, func) in _BUILTIN.items():
        fmt = argparse.RawDescriptionHelpFormatter if name == "train" else _Formatter
        p = sub.add_parser(name, help=summary, description=summary, formatter_class=fmt)
        add_args(p)
        p.set_defaults(func=func)
    for name, mod in _load_command_modules().items():
        if isinstance(mod, Exception):
            summary = f"(unavailable: {type(mod).__name__}: {mod})"
            p = sub.add_parser(name, help=summary, description=summary)
            p.set_defaults(func=_broken_command(name, mod))
            continue
        summary = getattr(mod, "HELP", None) or (mod.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=summary, description=mod.__doc__ or summary,
                           formatter_class=_Formatter)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
    return " ".join(text.split()) or type(exc).__name__


def _broken_command(name: str, exc: Exception):
    def run(args) -> int:
        print(f"cctk {name}: error: {COMMAND_MODULES[name]} failed to import: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return run


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``cctk`` console script and ``python -m cctk.cli``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from cctk.data import DataError
    from cctk.errors import ConfigError

    try:
        code = args.func(args)
    except (ConfigError, DataError) as exc:
        print(f"cctk {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a read-only or full file system, a path that is not a directory ...
        if isinstance(exc, BrokenPipeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1
        where = f" {exc.filename}" if exc.filename else ""
        print(f"cctk {args.command}: error: cannot write or read{where}: "
              f"{exc.strerror or exc}; free space or choose a writable path", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"cctk {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `cctk models | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
