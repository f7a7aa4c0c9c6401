"""The one base class of user errors: bad input that the ``cctk`` command reports as a single
``cctk <command>: error: ...`` line with exit status 2 (never a traceback)."""
from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A user error (unknown model or dataset, missing data, a bad option value, a missing,
    foreign or mismatched file): the message says what is wrong and what to do; nothing has been
    written or changed when it is raised. The CLI prints it and exits with status 2."""
