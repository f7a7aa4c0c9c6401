"""The checkpoint layer, at the bottom of the house: the file format, atomic writes, reading
(always ``torch.load(weights_only=True)``), and rebuilding any model, dense or pruned, from a
checkpoint. Train, SNP, prune and the experiments all stand on it; it imports only models and
nn (never train or prune).

A cctk checkpoint is a dict with ``format == "cctk-checkpoint"``, ``model_config`` (the
model's name + constructor kwargs), ``state_dict`` and ``dataset`` (the run's data record, see
:func:`cctk.data.from_record`); ``cctk train`` adds optimizer/scheduler/RNG states, a pruned
checkpoint adds ``pruning`` (block size, block masks, classifier mask, which layers are
ANDCLinear / MaskedLinear), and holds no dense weights of pruned layers.

Every result file goes through :func:`atomic_write` (``mkstemp`` in the target directory +
fsync + ``os.replace``): a fresh name that no pre-placed symlink can take, a reader sees the old
file or the whole new one, and a failed write leaves the old file in place.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import tempfile
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch import nn

from cctk.errors import ConfigError
from cctk.models import CCT
from cctk.nn import ANDCLinear, MaskedLinear, expand_block_mask

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "PRUNED_FORMAT", "CheckpointError",
    "atomic_write", "atomic_save", "atomic_write_text", "atomic_write_files", "output_dir",
    "read_checkpoint", "load_checkpoint", "model_from_config", "build_model",
    "is_pruned_checkpoint", "file_digest", "replace_submodule", "checkpoint_provenance", "plain",
    "TMP_PREFIX", "LOCK_NAME", "RUN_MARKERS", "run_kind", "check_output_dir",
]

CHECKPOINT_FORMAT = "cctk-checkpoint"
CHECKPOINT_VERSION = 1
PRUNED_FORMAT = "cctk-pruned-v1"
TMP_PREFIX = ".tmp-"
LOCK_NAME = ".cctk.lock"


class CheckpointError(ConfigError):
    """A missing, unreadable, foreign or mismatched checkpoint (a user error: exit status 2)."""


# ---------------------------------------------------------------------------------------------
# atomic writes


class _WriteErrors:
    """A file object that remembers the OSError its ``write`` raised."""

    def __init__(self, f):
        self._f = f
        self.error: Optional[OSError] = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _write_temp(path: str, mode: str, write: Callable[[Any], None]) -> str:
    """Write through ``write(file)`` into a fresh ``mkstemp`` file beside ``path`` and fsync it;
    returns the temporary path (removed again on any failure)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + "-", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            rec = _WriteErrors(f)
            try:
                write(rec)
            except Exception as exc:
                # torch.save (and other C++ writers) turn a failed write -- a full disk, a
                # quota -- into a RuntimeError: report the write's own error, naming the file
                error = exc if isinstance(exc, OSError) else rec.error
                if error is None or error.filename is not None:
                    raise
                raise OSError(error.errno, error.strerror, path) from None
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write_files(files: Mapping[Any, Tuple[str, Callable[[Any], None]]]) -> None:
    """Replace several files together: ``{path: (mode, write)}``. Every new file is written
    completely (temporary files) before any is renamed over its target, so a failed write (a
    full disk, an error in ``write``) leaves every old file as it was, never a new one beside
    an old one."""
    temps = []
    try:
        for path, (mode, write) in files.items():
            temps.append((_write_temp(os.fspath(path), mode, write), os.fspath(path)))
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    for tmp, path in temps:
        os.replace(tmp, path)


def atomic_write(path, mode: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` atomically through ``write(file)`` (see :func:`atomic_write_files`)."""
    atomic_write_files({path: (mode, write)})


def atomic_save(obj: Any, path) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, "w", lambda f: f.write(text))


#: The files that make a directory one command's run, checked in this order (a study or a
#: prune run also holds files of the kinds below it).
RUN_MARKERS = (("study", ("study_config.json",)), ("prune", ("prune.json",)),
               ("snp", ("snp.json", "nodes.npz")), ("export", ("export.json",)),
               ("demo", ("summary.json",)), ("train", ("checkpoint.pt", "metrics.json", "metrics.jsonl")))


def run_kind(path) -> Optional[str]:
    """Which command's run the directory ``path`` holds (``"train"``, ``"snp"``, ``"prune"``,
    ``"study"``, ``"demo"``, ``"export"``), or None (missing, empty, or no run's files)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    for kind, names in RUN_MARKERS:
        if any(os.path.lexists(os.path.join(path, n)) for n in names):
            return kind
    return None


def check_output_dir(out, command: str, reads=(), writes=(), what: str = "--out") -> None:
    """The guard every command passes before anything runs: ``out`` is a directory (or does
    not exist yet), it holds no other command's run (``cctk <command>`` replaces only its own
    kind of run, by its own rules), and none of the files the command writes there
    (``writes``: names in ``out``) is one of its inputs (``reads``: files or directories)."""
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"{what} {out} is a file, not a directory; choose a directory")
    kind = run_kind(out)
    if kind is not None and kind != command:
        raise CheckpointError(f"{what} {out} holds a `cctk {kind}` run; `cctk {command}` does not write "
                              f"into another command's run: choose a new directory")
    if kind is None:
        foreign = [n for n in writes if os.path.lexists(os.path.join(out, n))]
        if foreign:
            raise CheckpointError(f"{what} {out} holds {', '.join(foreign)}, not written by a `cctk {command}` "
                                  f"run; `cctk {command}` would replace it: choose a new directory")
    for r in reads:
        if r is None or not os.path.exists(r):
            continue
        if os.path.isdir(r) and os.path.isdir(out) and os.path.samefile(r, out):
            raise CheckpointError(f"{what} {out} is the input directory {r}; choose a new directory")
        for name in writes:
            target = os.path.join(out, name)
            if os.path.exists(target) and os.path.samefile(target, r):
                raise CheckpointError(f"{what} {out}: `cctk {command}` would write {name} over its own "
                                      f"input {r}; choose another directory")


@contextlib.contextmanager
def output_dir(path, what: str = "--out") -> Iterator[str]:
    """Hold ``path`` (created if missing) as this process's output directory: an exclusive
    ``flock`` on ``path/.cctk.lock`` for the whole block (a second run into the same directory
    is refused with a CheckpointError instead of interleaving its files), and the temporary
    files that a killed earlier write left behind (``.tmp-*``) are removed."""
    import fcntl

    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{what} {path} is a file, not a directory: give a directory")
    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    lock = os.path.join(path, LOCK_NAME)
    in_use = CheckpointError(f"{what} {path} is in use by another cctk process; wait for it to "
                             f"finish or choose another directory")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise in_use from None
            raise
        # the holder before us removes the lock file when it ends: a lock on a file that is no
        # longer at the path is no lock
        try:
            same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise in_use
        locked = True
        for stale in glob.glob(os.path.join(glob.escape(path), TMP_PREFIX + "*")):
            with contextlib.suppress(OSError):
                os.unlink(stale)
        yield path
    finally:
        if locked:
            # leave nothing behind: the lock file goes (while still held), and so does the
            # directory when this call created it and nothing was written into it
            with contextlib.suppress(OSError):
                os.unlink(lock)
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(path)
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------------------------
# reading


def file_digest(path) -> str:
    """sha256 of a file's bytes (the provenance of SNP and pruning results)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    """Load a cctk checkpoint dict, always with ``torch.load(weights_only=True)`` (a file that
    the safe loader refuses is refused, never reloaded unsafely). A missing, unreadable, foreign
    or incomplete file is a :class:`CheckpointError`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = os.path.join(path, "checkpoint.pt")
        hint = (f"give the file {inside}" if os.path.isfile(inside) else
                "give a checkpoint.pt written by `cctk train` or `cctk prune`")
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file; {hint}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated, foreign or crafted pickle
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path} ({first[:200]}); give a "
                              f"checkpoint.pt written by `cctk train` or `cctk prune`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a cctk checkpoint; give a checkpoint.pt written by "
                              f"`cctk train` or `cctk prune`")
    sd, cfg = ckpt.get("state_dict"), ckpt.get("model_config")
    if (not isinstance(sd, dict) or not sd
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())):
        raise CheckpointError(f"{path} holds no model weights (its state_dict is missing or "
                              f"damaged); give a complete checkpoint")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("name"), str):
        raise CheckpointError(f"{path} names no model (model_config missing); give a complete "
                              f"checkpoint")
    if "pruning" in ckpt and not isinstance(ckpt["pruning"], dict):
        raise CheckpointError(f"{path}: its 'pruning' entry is damaged")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights (nan or inf in {len(bad)} tensor(s), "
                              f"first {bad[0]}): the run diverged or the file was damaged; resume or "
                              f"use an earlier checkpoint, or retrain with a lower --lr")
    return ckpt


def is_pruned_checkpoint(ckpt: Any) -> bool:
    return isinstance(ckpt, dict) and isinstance(ckpt.get("pruning"), dict)


# ---------------------------------------------------------------------------------------------
# rebuilding


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Set ``model.<name> = module`` (also the ``fc`` alias of ``classifier.fc``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    if name == "classifier.fc" and "fc" in model._modules:  # a registered alias of classifier.fc
        model._modules["fc"] = module


def model_from_config(model_config: Mapping[str, Any]) -> nn.Module:
    """A fresh dense model from ``model.config`` (its name + constructor kwargs)."""
    try:
        return CCT.from_config(dict(model_config))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot build model {model_config.get('name')!r} from the "
                              f"checkpoint's model_config: {exc}") from None


def _install_pruned_layers(model: nn.Module, pruning: Mapping[str, Any]) -> None:
    """Swap in empty ANDCLinear / MaskedLinear modules of the recorded block masks, and the
    narrower dense linears of the recorded structured widths (a smaller dense CCT)."""
    for b, w in (pruning.get("structured") or {}).items():
        blk = model.blocks[int(b)]
        ff, dh = int(w["ff"]), int(w["head_dim"])
        if ff < 1 or dh < 1:
            raise ValueError(f"block {b}: structured widths must be >= 1, got {w}")
        l1, l2, attn = blk.linear1, blk.linear2, blk.self_attn
        blk.linear1 = nn.Linear(l1.in_features, ff, bias=l1.bias is not None)
        blk.linear2 = nn.Linear(ff, l2.out_features, bias=l2.bias is not None)
        inner = attn.num_heads * dh
        attn.qkv = nn.Linear(attn.qkv.in_features, 3 * inner, bias=attn.qkv.bias is not None)
        attn.proj = nn.Linear(inner, attn.proj.out_features, bias=attn.proj.bias is not None)
        attn.head_dim = dh  # attn.scale keeps the trained d_h**-0.5 of the full width
    if pruning.get("structured"):
        model.refresh_widths()
    B = int(pruning["block_size"])
    modules = pruning.get("modules", {})
    for name, bm in pruning["block_masks"].items():
        lin = model.get_submodule(name)
        bm = bm.bool()
        if modules.get(name, "andc") == "andc":
            new = ANDCLinear(lin.in_features, lin.out_features, B, bm, bias=lin.bias is not None)
        else:
            new = MaskedLinear(lin.in_features, lin.out_features,
                               expand_block_mask(bm, B, lin.weight.shape),
                               bias=lin.bias is not None, block_mask=bm, block_size=B)
        replace_submodule(model, name, new)
    cm = pruning.get("classifier_mask")
    if cm is not None:
        fc = model.get_submodule("classifier.fc")
        replace_submodule(model, "classifier.fc",
                          MaskedLinear(fc.in_features, fc.out_features, cm.bool(),
                                       bias=fc.bias is not None))


def build_model(ckpt: Mapping[str, Any]) -> nn.Module:
    """The model of a checkpoint dict (dense or pruned), its weights loaded strictly, in eval
    mode on the CPU. A state dict that does not fit the recorded architecture is a
    CheckpointError."""
    model = model_from_config(ckpt["model_config"])
    if is_pruned_checkpoint(ckpt):
        missing = [k for k in ("block_size", "block_masks") if k not in ckpt["pruning"]]
        if missing:
            raise CheckpointError(f"the checkpoint's pruning record lacks {' and '.join(missing)} (which "
                                  f"blocks each pruned layer keeps): the file is incomplete or was "
                                  f"edited; rerun `cctk prune` to write it again")
        try:
            _install_pruned_layers(model, ckpt["pruning"])
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint's pruning record does not fit model "
                                  f"{model.config.get('name')!r}: {exc}") from None
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(s.strip() for s in first[:3])[:300]
        raise CheckpointError(f"the checkpoint's weights do not fit its model "
                              f"{model.config.get('name')!r} ({detail}); the file is damaged or "
                              f"was edited") from None
    model.eval()
    return model


def load_checkpoint(path, map_location="cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """``(model, ckpt)``: the model rebuilt from the checkpoint (dense, or pruned with its
    ANDCLinear / MaskedLinear layers) with its weights, in eval mode on ``map_location``;
    ``ckpt`` is the whole checkpoint dict."""
    ckpt = read_checkpoint(path, map_location)
    model = build_model(ckpt)
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    return model, ckpt


def checkpoint_provenance(path, ckpt: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """What identifies the checkpoint a result was computed from: its path, the sha256 of its
    bytes and its model config (SNP records it; prune compares it)."""
    if ckpt is None:
        ckpt = read_checkpoint(path)
    return {"checkpoint": os.path.abspath(os.fspath(path)), "checkpoint_sha256": file_digest(path),
            "model_config": plain(dict(ckpt.get("model_config") or {}))}


def plain(x):
    """Tuples as lists, recursively through dicts and lists: the form a value has after a JSON
    round trip (so recorded configs compare equal to what is read back)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x
