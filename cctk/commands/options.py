"""Option helpers shared by the ``cctk`` commands (argument parsing and the checks every
command makes before anything runs)."""
from __future__ import annotations

import argparse
import math

from cctk.errors import ConfigError

def parse_value(text: str):
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


class KeyValueAction(argparse.Action):
    """``--opt k=v`` (repeatable) accumulates into a dict."""

    def __call__(self, parser, namespace, values, option_string=None):
        if "=" not in values:
            parser.error(f"{option_string} expects KEY=VALUE, got {values!r}")
        key, val = values.split("=", 1)
        current = dict(getattr(namespace, self.dest, None) or {})
        current[key.strip().replace("-", "_")] = parse_value(val.strip())
        setattr(namespace, self.dest, current)


def positive(what: str, value, allow_none: bool = True) -> None:
    """A count option (``--batch-size``, ``--subset``) must be >= 1."""
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise ConfigError(f"{what} must be >= 1, got {value}")


def finite_numbers(args: argparse.Namespace) -> None:
    """Every number an option holds (alone, or in a list / KEY=VALUE dict) must be finite: a
    ``nan`` or ``inf`` given for any option of any command is refused before anything runs."""
    def check(name, value):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if isinstance(value, (list, tuple)):
            for v in value:
                check(name, v)
        if isinstance(value, dict):
            for v in value.values():
                check(name, v)
    for name, value in vars(args).items():
        check(name, value)


def in_range(what: str, value, low=None, high=None, low_open: bool = False, high_open: bool = False) -> None:
    """``value`` (None: not given, accepted) must lie in the interval [low, high] (``*_open``:
    the bound itself excluded); the error names the option and the interval."""
    if value is None:
        return
    ok = ((low is None or (value > low if low_open else value >= low))
          and (high is None or (value < high if high_open else value <= high)))
    if not ok:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ConfigError(f"{what} must lie in {interval}, got {value}")
