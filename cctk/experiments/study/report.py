"""The study's report: ``summary.json`` (the primary question, the config, the seeds' validation
choices, cells, paired comparisons, frontier, machine), ``summary.md`` (the tables
docs/FINDINGS.md quotes) and ``report.html`` (plots and tables), all written from the rows alone."""
from __future__ import annotations

import html
import json
import os
import platform
from typing import Any, Dict, List

import torch

from cctk.checkpoint import atomic_write_text
from cctk.experiments.study.config import PRIMARY, StudyConfig, block_size, load_config
from cctk.experiments.study.ledger import read_rows, read_seeds_info, timed_under_load
from cctk.experiments.study.stats import BASELINES, between_studies, summarize_results
from cctk.prune.pruner import METHODS
from cctk.report.html import _img, _plt, _png
from cctk.timing import cpu_model

__all__ = ["write_summary", "study_markdown", "write_study_report"]


def write_summary(cfg: StudyConfig, rows: List[dict], wall: float) -> Dict[str, Any]:
    # every row of results.csv: all sittings of a study share its fixed settings (config.FIXED_KEYS),
    # so a sitting that runs a few more methods or densities reports the whole study
    stats = summarize_results(rows)
    if cfg.compare_with is not None:   # the same comparisons in another study (another budget, same models)
        other = load_config(cfg.compare_with)
        stats["between_studies"] = {
            "other": cfg.compare_with, "other_finetune_epochs": other.finetune_epochs,
            "this_finetune_epochs": cfg.finetune_epochs,
            "statistic": "this study's paired difference minus the other's, paired by seed",
            "comparisons": between_studies(rows, read_rows(os.path.join(cfg.compare_with, "results.csv")))}
    summary = {"primary_question": PRIMARY, "config": cfg.as_dict(), "block_size": block_size(cfg),
               "rule": {"label-set methods": cfg.rule().as_dict(),
                        "fixed by the ablation methods": {m: dict(METHODS[m].rule) for m in cfg.methods
                                                          if METHODS[m].rule}},
               "seeds": read_seeds_info(cfg.out), **stats, "rows": len(rows), "wall_time_s_this_sitting": wall,
               "machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "cpu": cpu_model(), "threads": torch.get_num_threads()},
               "timed_on": sorted({r["timed_on"] for r in rows if r.get("timed_on")}),
               "timed_under_load": sum(timed_under_load(r) for r in rows)}
    atomic_write_text(json.dumps(summary, indent=1, default=str) + "\n", os.path.join(cfg.out, "summary.json"))
    atomic_write_text(study_markdown(summary), os.path.join(cfg.out, "summary.md"))
    write_study_report(cfg.out, summary)
    return summary


def study_markdown(summary: Dict[str, Any]) -> str:
    """summary.md: the primary result, then accuracy (mean [95% CI], percent) per method x
    density, paired differences against the baseline (points), and images/s relative to the
    dense model: the tables docs/FINDINGS.md quotes, written from summary.json alone."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    ci = lambda c: "[n/a]" if c is None or c[0] is None else f"[{pct(c[0])}, {pct(c[1])}]"  # noqa: E731
    cells = summary["cells"]
    densities = sorted({c["density"] for c in cells}, reverse=True)
    methods = sorted({c["method"] for c in cells}, key=lambda m: (list(METHODS).index(m) if m in METHODS else 99, m))
    by = {(c["method"], c["density"]): c for c in cells}
    cfg = summary.get("config", {})
    lines = [f"# cctk study: {cfg.get('dataset')} ({summary.get('rows')} cells)", ""]
    prim = [p for p in summary["paired"] if p["primary"]]
    if prim:
        p = prim[0]
        lines += [f"Primary ({PRIMARY['statistic']}): {p['method']} - {p['baseline']} at density {p['density']}: "
                  f"**{pct(p['mean_diff'])} points, 95% CI {ci(p['ci95'])}**, p = "
                  + ("n/a" if p["p_value"] is None else f"{p['p_value']:.3g}")
                  + ("" if p.get("p_sign_flip") is None else f" (sign-flip p = {p['p_sign_flip']:.3g}, "
                     f"at least {2 / 2 ** p['n']:.3g} with {p['n']} seeds)") + f", n = {p['n']} seeds.", ""]
    else:
        lines += ["Primary comparison: no paired cells yet.", ""]
    # by seed number (seeds.json holds them in the order the seeds finished)
    seeds = summary.get("seeds") or {}
    dense = [(int(k), v["dense_test_accuracy"]) for k, v in seeds.items()
             if isinstance(v, dict) and v.get("dense_test_accuracy") is not None]
    if dense:
        lines += ["Dense test accuracy per seed: " + ", ".join(f"{pct(a)}% (seed {s})" for s, a in sorted(dense)) + ".", ""]
    head = "| method | " + " | ".join(f"density {d:g}" for d in densities) + " |"
    sep = "|---|" + "---|" * len(densities)
    lines += ["Test accuracy after fine-tuning, % (mean [95% CI], n seeds):", "", head, sep]
    for m in methods:
        row = [f"{pct(by[m, d]['accuracy_mean'])} {ci(by[m, d]['ci95'])} (n={by[m, d]['n']})" if (m, d) in by else ""
               for d in densities]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    for baseline in BASELINES:
        pair = {(p["method"], p["density"]): p for p in summary["paired"] if p.get("baseline", "magnitude") == baseline}
        if not pair:
            continue
        lines += ["", f"Minus {baseline}, paired by seed, points (mean [95% CI], p, sign-flip p, Holm p):", "", head, sep]
        for m in methods:
            if not any((m, d) in pair for d in densities):
                continue
            row = []
            for d in densities:
                p = pair.get((m, d))
                row.append("" if p is None else
                           f"{pct(p['mean_diff'])} {ci(p['ci95'])}, p "
                           + ("n/a" if p["p_value"] is None else f"{p['p_value']:.3g}")
                           + ("" if p.get("p_sign_flip") is None else f", sign-flip {p['p_sign_flip']:.3g}")
                           + ("" if p.get("p_holm") is None else f", Holm {p['p_holm']:.3g}") + (" (primary)" if p["primary"] else ""))
            lines.append(f"| {m} | " + " | ".join(row) + " |")
    between = summary.get("between_studies")
    if between and between["comparisons"]:
        lines += ["", f"This study ({between['this_finetune_epochs']} fine-tune epochs) against {between['other']} "
                      f"({between['other_finetune_epochs']}): the paired difference here minus there, paired by seed, "
                      "points (mean [95% CI], p, sign-flip p; no correction):", "",
                  "| method | baseline | density | here | there | difference |", "|---|---|---|---|---|---|"]
        for c in between["comparisons"]:
            lines.append(f"| {c['method']} | {c['baseline']} | {c['density']:g} | {pct(c['this_mean_diff'])} | "
                         f"{pct(c['other_mean_diff'])} | {pct(c['mean_diff'])} {ci(c['ci95'])}, p "
                         + ("n/a" if c["p_value"] is None else f"{c['p_value']:.3g}")
                         + ("" if c["p_sign_flip"] is None else f", sign-flip {c['p_sign_flip']:.3g}") + " |")
    lines += ["", "Images/s over the dense model's (both through cctk.optimize, timed interleaved with each other; with --workers after the last cell):", "",
              head, sep]
    for m in methods:
        row = [("" if (m, d) not in by or by[m, d].get("speedup_vs_dense_mean") is None
                else f"{by[m, d]['speedup_vs_dense_mean']:.2f}x") for d in densities]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    if summary.get("timed_on"):
        lines += ["", "Timed on: " + "; ".join(summary["timed_on"])
                  + (" (rows timed on different machines: compare ratios within one machine only)"
                     if len(summary["timed_on"]) > 1 else "") + "."]
    if summary.get("timed_under_load"):
        lines += ["", f"{summary['timed_under_load']} row(s) were timed while other processes held over a quarter "
                      "of the CPUs: their images/s are unreliable; `cctk study ... --time-only` on a quiet machine "
                      "times them again."]
    fr = summary.get("frontier") or []
    lines += ["", "Pareto frontier (accuracy vs images/s): "
              + (", ".join(f"{c['method']} at {c['density']:g}" for c in fr) or "no timings"), ""]
    lines += variants_markdown(summary.get("seeds") or {})
    return "\n".join(lines)


def variants_markdown(seeds_info: Dict[str, Any]) -> List[str]:
    """The SNP variants (readout x theta) per block and group: mean over seeds [min, max] of the
    readout accuracy, mean cluster size, noise per node and SNR (the paper's claims: accuracy
    rises, clusters shrink and SNR grows along the blocks)."""
    per = [v["snp_variants"] for v in seeds_info.values() if isinstance(v, dict) and v.get("snp_variants")]
    if not per:
        return []
    keys = (("readout_accuracy", "readout acc", 3), ("mean_cluster_size", "cluster size", 2),
            ("mean_noise", "noise/node", 2), ("snr", "SNR", 2))

    def agg(vals, nd):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "n/a"
        return f"{sum(vals) / len(vals):.{nd}f} [{min(vals):.{nd}f}, {max(vals):.{nd}f}]"
    lines = [f"SNP on the validation split, both readouts x theta (mean over {len(per)} seeds [min, max]):", "",
             "| readout | theta | block | group | " + " | ".join(k[1] for k in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for name in sorted(per[0], key=lambda n: (per[0][n]["readout"], per[0][n]["threshold"])):
        v0 = per[0][name]
        for b in range(len(v0["blocks"])):
            for g in ("mha", "ff"):
                cols = [agg([p[name]["blocks"][b][g].get(k) for p in per if name in p], nd) for k, _, nd in keys]
                lines.append(f"| {v0['readout']} | {v0['threshold']} | {b} | {g} | " + " | ".join(cols) + " |")
    return lines + [""]


def write_study_report(out: str, summary: Dict[str, Any]) -> str:
    """report.html: the primary question first, then accuracy vs density and accuracy vs images/s
    (per method, mean and 95% CI error bars), then the tables."""
    cells = summary["cells"]
    methods = sorted({c["method"] for c in cells})
    parts = [f"<h1>cctk study: {html.escape(str(summary['config']['dataset']))}</h1>",
             "<h2>The test this study was designed for (stated before the numbers)</h2>",
             f"<p>Primary: {html.escape(PRIMARY['method'])} minus {html.escape(PRIMARY['baseline'])} at density "
             f"{PRIMARY['density']}: {html.escape(PRIMARY['statistic'])}. Every other comparison is secondary "
             "(Holm-corrected). All tuned choices (SNP label sets, classifier threshold) were made on the "
             "validation split carved from the training split; the test split only gives the numbers below.</p>"]
    plt = _plt()
    if plt is not None and cells:
        for xkey, title in (("density", "accuracy vs density"), ("images_per_s_mean", "accuracy vs images/s")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for m in methods:
                cs = sorted((c for c in cells if c["method"] == m and c.get(xkey) is not None), key=lambda c: c[xkey])
                if not cs:
                    continue
                xs = [c[xkey] for c in cs]
                ys = [c["accuracy_mean"] for c in cs]
                err = [[y - (c["ci95"][0] if c["ci95"][0] is not None else y) for y, c in zip(ys, cs)],
                       [(c["ci95"][1] if c["ci95"][1] is not None else y) - y for y, c in zip(ys, cs)]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=m)
            if xkey != "density" and summary.get("frontier"):
                fr = sorted(summary["frontier"], key=lambda c: c["images_per_s_mean"])
                ax.plot([c["images_per_s_mean"] for c in fr], [c["accuracy_mean"] for c in fr], "k--", lw=1,
                        label="Pareto frontier")
            ax.set_xlabel("target density" if xkey == "density" else "images/s (cctk.optimize)")
            ax.set_ylabel("test accuracy after fine-tuning")
            ax.set_title(title + " (mean, 95% CI over seeds)")
            if ax.get_legend_handles_labels()[0]:   # (no timings yet: workers time after the cells)
                ax.legend(fontsize=7)
            parts.append(_img(_png(fig), title))
            plt.close(fig)
    parts.append("<h2>Paired differences (by seed)</h2><table border=1><tr><th>method</th><th>baseline</th>"
                 "<th>density</th><th>n</th><th>mean diff</th><th>95% CI</th><th>p</th><th>p (sign-flip)</th>"
                 "<th>p (Holm)</th><th>primary</th></tr>")
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    _ips = lambda v: "" if v is None else f"{v:.0f}"  # noqa: E731
    ci = lambda c: "n/a (n < 2)" if c[0] is None else f"[{c[0]:.4f}, {c[1]:.4f}]"  # noqa: E731
    for p in summary["paired"]:
        parts.append(f"<tr><td>{p['method']}</td><td>{p.get('baseline', 'magnitude')}</td><td>{p['density']}</td>"
                     f"<td>{p['n']}</td><td>{fmt(p['mean_diff'])}</td>"
                     f"<td>{ci(p['ci95'])}</td><td>{fmt(p['p_value'])}</td><td>{fmt(p.get('p_sign_flip'))}</td>"
                     f"<td>{fmt(p.get('p_holm'))}</td><td>{'yes' if p['primary'] else ''}</td></tr>")
    parts.append("</table><h2>Accuracy vs images/s: the Pareto frontier</h2><p>"
                 + (", ".join(f"{html.escape(c['method'])} at {c['density']} ({c['accuracy_mean']:.4f}, "
                              f"{c['images_per_s_mean']:.0f} images/s)" for c in summary.get("frontier", []))
                    or "no timings") + "</p>"
                 + (f"<p>Timed on: {html.escape('; '.join(summary['timed_on']))}.</p>" if summary.get("timed_on") else ""))
    parts.append("<h2>Cells</h2><table border=1><tr><th>method</th><th>density</th><th>n</th>"
                 "<th>accuracy</th><th>95% CI</th><th>before fine-tune</th><th>images/s</th><th>x dense</th>"
                 "<th>linear density</th></tr>")
    for c in cells:
        parts.append(f"<tr><td>{c['method']}</td><td>{c['density']}</td><td>{c['n']}</td><td>{fmt(c['accuracy_mean'])}</td>"
                     f"<td>{ci(c['ci95'])}</td><td>{fmt(c['accuracy_before_finetune_mean'])}</td>"
                     f"<td>{_ips(c['images_per_s_mean'])}</td><td>{fmt(c.get('speedup_vs_dense_mean'))}</td>"
                     f"<td>{fmt(c['linear_density_mean'])}</td></tr>")
    parts.append("</table>")
    path = os.path.join(out, "report.html")
    atomic_write_text("<!doctype html><html><head><meta charset='utf-8'><title>cctk study</title></head><body>"
                      + "\n".join(parts) + "</body></html>\n", path)
    return path
