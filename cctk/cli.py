"""The ``cctk`` command. Every command is a module with ``HELP`` (a one-line summary; else the
first line of its docstring), ``add_arguments(parser)`` and ``run(args) -> int`` (and optionally
``FORMATTER``, its help formatter class), registered by name in :data:`COMMAND_MODULES`: the one
way to add a command. The built-in ones live in ``cctk.commands``; those of the science layers
beside their code (``cctk.snp.cli``, ``cctk.prune.cli``, ``cctk.experiments.study_cli``).

User errors (unknown model or dataset, missing data, an image size the model cannot take, a bad
option, a missing, empty, foreign or damaged file, a device this machine lacks, a read-only or
full file system) print one ``cctk <command>: error: ...`` line on stderr and exit with status 2,
having written nothing (every ``cctk.errors.ConfigError``, ``cctk.data.DataError`` and
``OSError`` of a command ends there).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import Any, Dict, List, Optional

#: Every ``cctk`` command, in the order ``cctk --help`` lists them: name -> module. A module
#: that is not installed is not listed; one that fails to import is listed with its error and
#: exits 1 when run.
COMMAND_MODULES: Dict[str, str] = {
    "models": "cctk.commands.models",
    "train": "cctk.commands.train",
    "eval": "cctk.commands.eval",
    "demo": "cctk.commands.demo",
    "snp": "cctk.snp.cli",
    "prune": "cctk.prune.cli",
    "study": "cctk.experiments.study_cli",
    "export": "cctk.commands.export",
}

EXIT_USAGE = 2


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (an unknown option, a bad choice, a value that is
    not a number) are one line, like every other user error of the command: what is wrong and
    where to look, exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}; see `{self.prog} --help`\n")


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

    parser = _Parser(
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
               "  cctk eval --checkpoint runs/digits/checkpoint.pt\n"
               "  cctk export --checkpoint runs/digits/checkpoint.pt --format onnx --out deploy")
    parser.add_argument("--version", action="version", version=f"cctk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _load_command_modules().items():
        if isinstance(mod, Exception):
            summary = f"(unavailable: {type(mod).__name__}: {mod})"
            p = sub.add_parser(name, help=summary, description=summary)
            p.set_defaults(func=_broken_command(name, mod))
            continue
        summary = getattr(mod, "HELP", None) or (mod.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=summary, description=mod.__doc__ or summary,
                           formatter_class=getattr(mod, "FORMATTER", _Formatter))
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

    from cctk.commands.options import finite_numbers

    try:
        finite_numbers(args)
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
