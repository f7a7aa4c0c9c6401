"""``cctk train``: train a CCT (AdamW, warm-up + cosine, label smoothing, mixup/cutmix, AMP,
checkpoints, exact ``--resume``; DDP under torchrun). Every :class:`~cctk.train.TrainConfig`
field is an option."""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Callable, Dict, Sequence

from cctk.commands.options import KeyValueAction

HELP = ("train a CCT (AdamW, warm-up + cosine, label smoothing, mixup/cutmix, AMP, checkpoints, "
        "exact --resume; DDP under torchrun)")
#: the option list is long and its help texts carry their own line breaks
FORMATTER = argparse.RawDescriptionHelpFormatter


def _none_or(cast: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(s: str):
        return None if s.lower() in ("none", "off", "null") else cast(s)
    parse.__name__ = cast.__name__
    return parse


_CASTS = {"int": int, "float": float, "str": str}


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
            kw.update(action=KeyValueAction, metavar="KEY=VALUE",
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
    probe = TrainConfig(out=given.get("out", TrainConfig().out), resume=given.get("resume"))
    resume_from = _resume_path(probe)  # None: a new run (also --resume where no checkpoint is yet)
    if resume_from is not None:
        ckpt = read_resume_checkpoint(resume_from)
        base = TrainConfig.from_dict(ckpt["train_config"]).to_dict()
        if preset is not None:
            raise ConfigError("--preset cannot be combined with --resume (the checkpoint holds "
                              "the run's configuration)")
        source = f"checkpoint {resume_from}"
    else:
        if preset is None:
            preset = preset_for_dataset(given.get("dataset", TrainConfig().dataset))
        if preset is not None:
            base = get_preset(preset).to_dict()
            source = f"preset {preset!r}"
        else:
            base = TrainConfig().to_dict()
            source = "defaults"
        if probe.resume is not None:
            source += f" (no checkpoint in {probe.out} to resume: a new run)"
        # a preset's model belongs to its dataset: --dataset X without --model uses X's default
        if ("dataset" in given and "model" not in given and given["dataset"] != base["dataset"]
                and preset_for_dataset(given["dataset"]) != preset_for_dataset(base["dataset"])):
            base["model"] = None
            base["img_size"] = None
    base.update(given)
    return TrainConfig.from_dict(base).validate(), source


def run(args: argparse.Namespace) -> int:
    from cctk.train import train

    from cctk.checkpoint import check_output_dir

    config, source = config_from_args(args)
    check_output_dir(config.out, "train")
    if config.verbose and int(os.environ.get("RANK", "0")) == 0:
        print(f"configuration: {source} + command-line options", flush=True)
    train(config)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cctk.train import PRESETS, list_presets

    p.add_argument("--preset", choices=list_presets(), default=None,
                   help="start from a named recipe: " + "; ".join(
                       f"{n}: {PRESETS[n].get('model') or 'default model'} on {PRESETS[n]['dataset']}, "
                       f"{PRESETS[n]['epochs']} epochs" for n in list_presets())
                   + ". Without --preset, the preset named like --dataset is used when there is one")

    add_config_arguments(p)
