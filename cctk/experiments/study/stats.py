"""The study's statistics: 95% t-intervals, paired t-tests and the exact sign-flip test over
seeds, Holm's step-down correction, the accuracy vs images/s Pareto frontier, and
:func:`summarize_results` (cells and paired comparisons from results.csv rows)."""
from __future__ import annotations

import itertools
import math
from typing import Any, Dict, List, Optional, Sequence

from scipy import stats as _scipy_stats

from cctk.experiments.study.config import PRIMARY, RULE_FIELDS

#: what the other methods are compared with: block magnitude (the primary's baseline), ANDC
#: itself (its controls), and cctk's first rule (the ablation: which fix changes what)
BASELINES = ("magnitude", "andc", "andc-old")

__all__ = ["BASELINES", "t_interval", "paired_p", "sign_flip_p", "holm", "pareto_frontier", "summarize_results",
           "between_studies"]


def t_interval(x: Sequence[float]):
    """(mean, [low, high] 95% t-interval, sd) of ``x``; no interval below two values."""
    n = len(x)
    mean = sum(x) / n
    if n < 2:
        return mean, [None, None], None
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    half = _scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, [mean - half, mean + half], sd


def paired_p(diffs: Sequence[float]) -> Optional[float]:
    """Two-sided paired t-test p-value of the differences ``diffs`` (None below two)."""
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in diffs) / (n - 1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    t = mean / (sd / math.sqrt(n))
    return float(2 * _scipy_stats.t.sf(abs(t), n - 1))


def sign_flip_p(diffs: Sequence[float]) -> Optional[float]:
    """Exact two-sided sign-flip (paired permutation) test of the differences ``diffs``: the
    share of the 2^n sign assignments whose |mean| is at least the observed |mean|. Assumes only
    that each difference is symmetric about 0 under the null; with n seeds it cannot go below
    2 / 2^n (the observed signs and their mirror). None below one difference."""
    n = len(diffs)
    if n < 1:
        return None
    observed = abs(sum(diffs)) - 1e-12 * max(1.0, sum(abs(d) for d in diffs))
    hits = sum(1 for signs in itertools.product((1, -1), repeat=n)
               if abs(sum(s * d for s, d in zip(signs, diffs))) >= observed)
    return hits / 2 ** n


def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm step-down adjusted p-values (None stays None)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    adj: List[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adj[i] = running
    return adj


def pareto_frontier(cells: List[dict]) -> List[dict]:
    """The cells no other cell beats on both mean accuracy and mean images/s (ties kept),
    fastest first: where each method sits on the accuracy vs speed frontier."""
    pts = [c for c in cells if c.get("images_per_s_mean") is not None]
    front = [c for c in pts if not any(o["accuracy_mean"] >= c["accuracy_mean"] and o["images_per_s_mean"] >= c["images_per_s_mean"]
                                       and (o["accuracy_mean"] > c["accuracy_mean"] or o["images_per_s_mean"] > c["images_per_s_mean"])
                                       for o in pts)]
    return [{"method": c["method"], "density": c["density"], "accuracy_mean": c["accuracy_mean"],
             "images_per_s_mean": c["images_per_s_mean"]} for c in sorted(front, key=lambda c: -c["images_per_s_mean"])]


def _by_cell(rows: List[dict]) -> Dict[tuple, Dict[int, dict]]:
    """{(method, density): {seed: row}}."""
    by: Dict[tuple, Dict[int, dict]] = {}
    for r in rows:
        by.setdefault((r["method"], float(r["density"])), {})[int(r["seed"])] = r
    return by


def _paired_diffs(by: Dict[tuple, Dict[int, dict]], baselines: Sequence[str]) -> Dict[tuple, Dict[int, float]]:
    """{(method, baseline, density): {seed: accuracy of method - accuracy of baseline}} for every
    method x density against each baseline present at that density and seed, a pair compared
    once (against the first of ``baselines`` it meets)."""
    out: Dict[tuple, Dict[int, float]] = {}
    for baseline in baselines:   # magnitude, then ANDC itself, then the old rule (the ablation)
        for (m, d), seeds in sorted(by.items()):
            if m == baseline or (baseline, d) not in by or (baseline, m, d) in out:
                continue
            base = by[(baseline, d)]
            diffs = {s: float(seeds[s]["accuracy"]) - float(base[s]["accuracy"]) for s in sorted(set(seeds) & set(base))}
            if diffs:
                out[(m, baseline, d)] = diffs
    return out


def _test(diffs: Dict[int, float]) -> Dict[str, Any]:
    """n, seeds, mean, 95% t CI, paired t p and sign-flip p of per-seed differences."""
    values = [diffs[s] for s in sorted(diffs)]
    mean, ci, _ = t_interval(values)
    return {"n": len(values), "seeds": sorted(diffs), "mean_diff": mean, "ci95": ci, "p_value": paired_p(values),
            "p_sign_flip": sign_flip_p(values)}


def between_studies(rows: List[dict], other_rows: List[dict], baselines: Sequence[str] = BASELINES) -> List[dict]:
    """Each paired comparison (method minus baseline at a density) present in both studies, this
    one's minus the other's, paired by seed (e.g. the ANDC - magnitude gap after 3 fine-tune
    epochs minus the gap after 1, on the same models): a difference of differences, its 95% t
    interval, paired t and sign-flip p (no multiple-comparison correction)."""
    mine, theirs = _paired_diffs(_by_cell(rows), baselines), _paired_diffs(_by_cell(other_rows), baselines)
    out = []
    for (m, baseline, d), diffs in sorted(mine.items()):
        other = theirs.get((m, baseline, d))
        common = sorted(set(diffs) & set(other or {}))
        if common:
            out.append({"method": m, "baseline": baseline, "density": d,
                        "this_mean_diff": sum(diffs[s] for s in common) / len(common),
                        "other_mean_diff": sum(other[s] for s in common) / len(common),
                        **_test({s: diffs[s] - other[s] for s in common})})
    return out


def summarize_results(rows: List[dict], baselines: Sequence[str] = BASELINES) -> Dict[str, Any]:
    """``cells`` (method x density: n, mean accuracy, 95% t CI, images/s, the rule) and ``paired``
    (method x density minus each baseline present at that density, paired by seed: mean diff, 95%
    CI, paired t-test p, sign-flip p, Holm-adjusted p; a pair is compared once, against the first
    of ``baselines`` it meets)."""
    by = _by_cell(rows)
    cells = []
    for (m, d), seeds in sorted(by.items()):
        acc = [float(r["accuracy"]) for r in seeds.values()]
        mean, ci, sd = t_interval(acc)
        ips = [float(r["images_per_s"]) for r in seeds.values() if r.get("images_per_s") not in (None, "")]
        ips_mean, ips_ci, _ = t_interval(ips) if ips else (None, [None, None], None)
        before = [float(r["accuracy_before_finetune"]) for r in seeds.values()]
        # images/s over the dense model's, timed interleaved with it: steadier than raw
        # images/s on a shared machine
        speed = [float(r["images_per_s"]) / float(r["dense_images_per_s"]) for r in seeds.values()
                 if r.get("images_per_s") not in (None, "") and r.get("dense_images_per_s") not in (None, "", 0)]
        first = next(iter(seeds.values()))   # the rule the method pruned by (None: no label-set rule)
        rule = {k: first[k] for k in RULE_FIELDS if first.get(k) not in (None, "")} or None
        cells.append({"method": m, "density": d, "rule": rule, "n": len(acc), "accuracy_mean": mean, "ci95": ci, "sd": sd,
                      "accuracy_before_finetune_mean": sum(before) / len(before),
                      "images_per_s_mean": ips_mean, "images_per_s_ci95": ips_ci,
                      "speedup_vs_dense_mean": sum(speed) / len(speed) if speed else None,
                      "linear_density_mean": sum(float(r["linear_density"]) for r in seeds.values()) / len(acc)})
    paired = []
    for (m, baseline, d), diffs in _paired_diffs(by, baselines).items():
        primary = (m == PRIMARY["method"] and baseline == PRIMARY["baseline"] and abs(d - PRIMARY["density"]) < 1e-9)
        paired.append({"method": m, "baseline": baseline, "density": d, **_test(diffs), "primary": primary})
    secondary = [p for p in paired if not p["primary"]]
    for p, a in zip(secondary, holm([p["p_value"] for p in secondary])):
        p["p_holm"] = a
    for p in paired:
        if p["primary"]:
            p["p_holm"] = p["p_value"]  # the one question fixed in advance: no correction
    return {"cells": cells, "paired": paired, "frontier": pareto_frontier(cells),
            "multiple_comparisons": "Holm step-down over the secondary comparisons (every method x "
                                    "density against each baseline except the primary one); p-values "
                                    "from two-sided paired t-tests over seeds (p_sign_flip: the exact "
                                    "sign-flip test, at least 2/2^n with n seeds)"}
