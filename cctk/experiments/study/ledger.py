"""The study's ledger: its cells (seed x method x density), their order, ``results.csv`` (read,
merged under a lock, written atomically), the per-cell claims that let several processes share a
study, and the worker processes that claim cells.

A results.csv written by an older cctk resumes: its missing columns read as empty, except the
ANDC rule's (``block_score``, ``v_sets``, ``token_sets``) on rows of label-set methods, which read
as the rule that cctk used (:data:`cctk.experiments.study.config.LEGACY_DEFAULTS`)."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import io
import json
import multiprocessing as mp
import os
from typing import Any, Callable, List, Optional

import torch

from cctk.checkpoint import atomic_write_text
from cctk.errors import ConfigError
from cctk.experiments.study.config import LEGACY_DEFAULTS, PRIMARY, RULE_FIELDS, StudyConfig
from cctk.prune.pruner import METHODS
from cctk.tune import BUSY_LIMIT

__all__ = ["RESULT_FIELDS", "REQUIRED_FIELDS", "read_rows", "write_rows", "merge_row", "cell_key", "cells", "done",
           "todo", "tier", "cell_order", "claim", "results_lock", "run_workers", "timed_under_load",
           "read_seeds_info", "merge_seed_info"]

RESULT_FIELDS = ["seed", "method", "density", "accuracy", "accuracy_before_finetune", "images_per_s",
                 "dense_images_per_s", "linear_density", "classifier_density", "connection_keep_fraction",
                 "dense_accuracy", "classifier_threshold", "finetune_seconds", "model_digest", "timed_on",
                 *RULE_FIELDS, "finetune_epochs", "timing_other_load"]
# columns every results.csv has (``timed_on``, the rule's and the timing's load came later: older
# files resume without them)
REQUIRED_FIELDS = [f for f in RESULT_FIELDS if f not in ("timed_on", "finetune_epochs", "timing_other_load",
                                                         *RULE_FIELDS)]


def _legacy_row(r: dict) -> dict:
    """A row of an older results.csv: the rule's columns it lacks, as the older cctk's rule."""
    uses_rule = r["method"] in METHODS and METHODS[r["method"]].uses_rule
    for k in RULE_FIELDS:
        if r.get(k) is None:
            r[k] = LEGACY_DEFAULTS[k] if uses_rule else ""
    return r


def read_rows(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if set(REQUIRED_FIELDS) - set(r):
            raise ConfigError(f"{path} is not a cctk study results file (columns {list(r)}); choose another --out")
    return [_legacy_row(r) for r in rows]


def timed_under_load(row: dict) -> bool:
    """Whether a row's images/s were measured while other processes held more than
    :data:`cctk.tune.BUSY_LIMIT` of the CPUs (unknown, for rows of an older cctk: False)."""
    try:
        return float(row.get("timing_other_load")) > BUSY_LIMIT
    except (TypeError, ValueError):
        return False


def write_rows(path: str, rows: List[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in RESULT_FIELDS})
    atomic_write_text(buf.getvalue(), path)


def cell_key(seed, method, density):
    return (int(seed), str(method), round(float(density), 6))


def tier(cell) -> int:
    """0: the primary comparison; 1: the other methods at the primary density; 2: the rest."""
    _, method, d = cell
    if d != round(float(PRIMARY["density"]), 6):
        return 2
    return 0 if method in (PRIMARY["method"], PRIMARY["baseline"]) else 1


def cell_order(cfg: StudyConfig, cells) -> List[tuple]:
    """The order the study runs its cells in, most informative first, so that a study stopped
    part-way has answered what matters most: the primary comparison (PRIMARY's method and
    baseline at its density, every seed), then the other methods at that density, then the other
    densities; within a tier method by method (every seed of a method before the next method).
    Every cell restarts from its seed's RNG state, so the order never changes a result."""
    dens = [round(float(d), 6) for d in cfg.densities]
    methods, seeds = list(cfg.methods), [int(s) for s in cfg.seeds]
    return sorted(cells, key=lambda c: (tier(c), dens.index(c[2]), methods.index(c[1]), seeds.index(c[0])))


def cells(cfg: StudyConfig) -> List[tuple]:
    """Every cell of the study: seed x method x density."""
    return [cell_key(s, m, d) for s in cfg.seeds for m in cfg.methods for d in cfg.densities]


def done(rows: List[dict]) -> set:
    return {cell_key(r["seed"], r["method"], r["density"]) for r in rows}


def todo(cfg: StudyConfig, rows: List[dict]) -> List[tuple]:
    finished = done(rows)
    return cell_order(cfg, [c for c in cells(cfg) if c not in finished])


@contextlib.contextmanager
def results_lock(out: str):
    """An exclusive lock on the study's results (``out/.study.lock``): every read-merge-write of
    results.csv holds it, so processes sharing ``out`` never lose each other's rows."""
    with open(os.path.join(out, ".study.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_seeds_info(out: str) -> dict:
    """``out/seeds.json``: per seed, where its model came from, its validation choices, its dense
    accuracy and SNP variants (empty if none yet)."""
    path = os.path.join(out, "seeds.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def merge_seed_info(out: str, seed: int, entry: dict) -> dict:
    """Set (update) one seed's entry of ``out/seeds.json``, re-read under the results lock, so
    processes sharing ``out`` each add their own seeds and none drops another's; returns the
    whole file as written."""
    with results_lock(out):
        info = read_seeds_info(out)
        info[str(int(seed))] = {**(info.get(str(int(seed))) or {}), **entry}
        atomic_write_text(json.dumps(info, indent=1) + "\n", os.path.join(out, "seeds.json"))
    return info


def claim(out: str, key) -> Optional[Any]:
    """Claim a cell for this process (a non-blocking flock on ``out/.claims/<cell>``; the OS drops
    it if the process dies, so an interrupted cell is claimable again); None if another holds it."""
    d = os.path.join(out, ".claims")
    os.makedirs(d, exist_ok=True)
    f = open(os.path.join(d, f"seed{key[0]}_{key[1]}_{key[2]}"), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def merge_row(path: str, row: dict) -> List[dict]:
    """Add (or replace) one cell's row in results.csv, re-read under the lock; returns all rows."""
    with results_lock(os.path.dirname(path) or "."):
        rows, key = read_rows(path), cell_key(row["seed"], row["method"], row["density"])
        at = [i for i, r in enumerate(rows) if cell_key(r["seed"], r["method"], r["density"]) == key]
        if at:
            rows[at[0]] = row   # in place: the file's row order is the order the cells finished
        else:
            rows.append(row)
        write_rows(path, rows)
    return rows


def run_workers(cfg: StudyConfig, worker: Callable[[StudyConfig, int], Any], run_variants, bar) -> None:
    """``--workers N``: N processes (spawned, one intra-op thread each, or an equal share of the
    cores) each run ``worker(cfg, threads)`` (a module-level function: it claims and runs cells);
    this process runs the SNP variants meanwhile, then waits. Several
    single-threaded processes use this small CPU better than one process with every thread;
    images/s are not measured under that load but afterwards, by the run's retiming pass."""
    threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    wcfg = dataclasses.replace(cfg, progress=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(wcfg, threads), name=f"cctk-study-worker{i}")
             for i in range(cfg.workers)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for pr in procs:
            pr.start()
        run_variants()
        path = os.path.join(cfg.out, "results.csv")
        while any(pr.is_alive() for pr in procs):
            for pr in procs:
                pr.join(timeout=5)
            bar.n = bar.total - len(todo(cfg, read_rows(path)))
            bar.refresh()
    finally:
        for pr in procs:
            if pr.is_alive():
                pr.terminate()
            pr.join()
        torch.set_num_threads(before)
    bad = [pr.exitcode for pr in procs if pr.exitcode != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} study worker(s) failed (exit codes {bad}; their messages are above); "
                           f"finished cells are kept: rerun the same command to resume")
