"""One self-contained HTML page of an ANDC pipeline run: what was done in plain words, the SNP
figures, the heads maps, the block masks and per-layer densities, accuracy vs density for ANDC
and block magnitude, and the throughput figures. Every image is a PNG embedded as base64, so
the page is a single file that opens anywhere."""
from __future__ import annotations

import base64
import glob
import html
import io
import os
from typing import Any, Dict, List, Optional

from cctk.checkpoint import atomic_write

__all__ = ["write_report", "render_report"]


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _file_png(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode("ascii")


def _img(b64: str, alt: str, width: Optional[int] = None) -> str:
    w = f' style="max-width:{width}px"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"{w}>'


def _short(name: str) -> str:
    return name.replace("classifier.", "").replace("blocks.", "b").replace("self_attn.", "")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_density(summary: Dict[str, Any]) -> Optional[str]:
    rows = summary.get("sweep") or []
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"andc": ("tab:blue", "ANDC"), "magnitude": ("tab:orange", "block magnitude")}
    for method, (color, label) in styles.items():
        r = sorted((x for x in rows if x["method"] == method), key=lambda x: x["linear_density"])
        if not r:
            continue
        dens = [x["linear_density"] for x in r]
        ax.plot(dens, [100 * x["accuracy"] for x in r], "o-", color=color, label=f"{label}, fine-tuned")
        ax.plot(dens, [100 * x["accuracy_before_finetune"] for x in r], "x--", color=color, alpha=0.6,
                label=f"{label}, before fine-tune")
    ax.axhline(100 * summary["dense_accuracy"], color="k", lw=1, ls=":", label="dense")
    ax.set_xlabel("kept fraction of encoder linear weights")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy vs density")
    return _png(fig)


def plot_layer_density(summary: Dict[str, Any]) -> Optional[str]:
    andc = summary.get("andc", {})
    layers = andc.get("layers") or summary.get("layer_density")
    if not layers:
        return None
    plt = _plt()
    names = list(layers)
    stats = andc.get("layer_stats", {})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) + 2), 3.8))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [layers[n] for n in names], width=0.4, label="kept weights (block mask)")
    if stats:
        ax.bar([x + 0.2 for x in xs], [stats.get(n, {}).get("connection_keep_fraction", 0) for n in names],
               width=0.4, label="ANDC-kept connections (s >= min overlap)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([_short(n) for n in names], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction")
    ax.legend(fontsize=8)
    ax.set_title("Density per encoder linear (ANDC)")
    return _png(fig)


def plot_block_masks(summary: Dict[str, Any], method: str = "andc") -> Optional[str]:
    masks = summary.get(method, {}).get("block_masks")
    if not masks:
        return None
    import numpy as np

    plt = _plt()
    names = list(masks)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        m = np.asarray(masks[name])
        ax.imshow(m, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(f"{_short(name)} ({m.mean():.2f})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{method.upper() if method == 'andc' else method} block masks (black = kept block; rows = outputs)", fontsize=9)
    return _png(fig)


def plot_throughput(summary: Dict[str, Any]) -> Optional[str]:
    if "dense_images_per_s" not in summary:
        return None
    plt = _plt()
    labels = ["dense, stock PyTorch", "dense, cctk.optimize", "pruned, masked dense", "pruned, ANDCLinear as loaded",
              "pruned, cctk.optimize"]
    nan = float("nan")
    vals = [summary.get("dense_eager_images_per_s", summary["dense_images_per_s"]),
            summary.get("dense_optimized_images_per_s", nan), summary.get("masked_dense_images_per_s", nan),
            summary.get("pruned_eager_images_per_s", nan), summary["pruned_images_per_s"]]
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    bars = ax.barh(labels, vals, color=["tab:gray", "tab:gray", "tab:olive", "tab:cyan", "tab:blue"])
    for b, v in zip(bars, vals):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:,.0f}", va="center", fontsize=8)
    ax.set_xlabel(f"images / s (batch {summary.get('bench_batch', '?')}, fp32, {summary.get('device', '')})")
    ax.set_title("Inference throughput")
    ax.set_xlim(0, max(v for v in vals if v == v) * 1.25)
    return _png(fig)


def plot_classifier_scan(summary: Dict[str, Any]) -> Optional[str]:
    rows = summary.get("classifier_scan") or []
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    th = [r["threshold"] for r in rows]
    ax.plot(th, [100 * r["accuracy"] for r in rows], "o-", color="tab:blue", label="accuracy (only classifier pruned)")
    ax.axhline(100 * summary["dense_accuracy"], color="k", lw=1, ls=":", label="dense")
    ax.set_xlabel("classifier ANDC threshold theta")
    ax.set_ylabel("test accuracy (%)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(th, [r["classifier_density"] for r in rows], "s--", color="tab:red", label="classifier density")
    ax2.set_ylabel("kept fraction of fc weights", color="tab:red")
    ax2.set_ylim(0, 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower left")
    ax.set_title("Classifier ANDC: density and accuracy vs threshold")
    return _png(fig)


def plot_heads_from_npz(snp_dir: str) -> List[str]:
    """Heads x labels coverage maps drawn from nodes.npz (used when the SNP dir has no PNGs)."""
    path = os.path.join(snp_dir, "nodes.npz")
    if not os.path.isfile(path):
        return []
    import numpy as np

    plt = _plt()
    out = []
    with np.load(path) as z:
        b = 0
        while f"b{b}_coverage" in z.files:
            cov = z[f"b{b}_coverage"]
            fig, ax = plt.subplots(figsize=(6, 0.5 * cov.shape[0] + 1.5))
            im = ax.imshow(cov, aspect="auto", cmap="viridis")
            ax.set_xlabel("label")
            ax.set_ylabel("head")
            ax.set_title(f"block {b}: nodes of each head recognising each label")
            fig.colorbar(im, ax=ax)
            out.append(_png(fig))
            b += 1
    return out


def _fmt_pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _table(rows: List[List[str]], header: List[str]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _words(summary: Dict[str, Any]) -> str:
    s = summary
    andc = s.get("andc", {})
    dataset = html.escape(str(s.get("dataset")))
    model = html.escape(str(s.get("model")))
    cfg = s.get("model_config", {})
    dens = s.get("linear_density", float("nan"))
    cls = s.get("classifier_density", float("nan"))
    speed = s.get("speedup_vs_dense")
    won = s["andc_accuracy"] - s["magnitude_accuracy"]
    verdict = ("ANDC beat block magnitude" if won > 0.0025 else
               "block magnitude beat ANDC" if won < -0.0025 else "ANDC and block magnitude tied")
    tokens_note = (" The tokens entering block 0 were assumed to recognise every label (the old "
                   "assumption, asked for explicitly): block 0's q/k/v keep every input of a head whose "
                   "label set is not empty." if andc.get("tokens_assumed_all_labels") else "")
    p = []
    p.append(
        f"<p>A Compact Convolutional Transformer (<b>{model}</b>: {cfg.get('num_layers')} encoder blocks, "
        f"{cfg.get('num_heads')} heads, stream width {cfg.get('embedding_dim')}, "
        f"{s.get('parameters', 0):,} parameters) was trained on <b>{dataset}</b> and reached "
        f"<b>{_fmt_pct(s['dense_accuracy'])}</b> test accuracy.</p>")
    p.append(
        "<p><b>Single-nodal performance.</b> Each node of each sub-block (attention-head outputs, "
        "feed-forward units, and the residual-stream channels) was given a linear readout trained on "
        "the frozen model; keeping only one node's readout weights gives that node's label x label "
        "matrix, which, normalised by its maximum and thresholded at "
        f"{s.get('snp_threshold', 0.3)}, tells which labels the node <i>recognises</i> (the diagonal). "
        f"The label sets were measured on the <b>{html.escape(str(s.get('snp_split')))}</b> split"
        + (", so no pruning decision saw a test image." if s.get("snp_split") == "train" else ".")
        + "</p>")
    cls_th = s.get("classifier_threshold", s.get("snp_threshold"))
    p.append(
        "<p><b>ANDC pruning.</b> In the classifier, weight W[c, n] survives only if stream node n "
        "recognises label c (the paper's rule; the final-stream nodes' matrices use the model's own "
        f"head as the readout and were thresholded at {cls_th}"
        + (f" rather than {s.get('snp_threshold')}: see the threshold scan below" if cls_th != s.get("snp_threshold") else "")
        + "). In every encoder linear (q/k/v, the attention "
        "projection, both feed-forward layers) a connection survives only if the two nodes it joins "
        "share at least one recognised label (for q, k and v the head's own label set stands for the "
        "output node). Nodes that recognise nothing lose every connection. The nodes were then "
        "reordered without changing the model's function (feed-forward units, dims within each head, "
        "and one common order for the stream channels) so that surviving connections gather into "
        f"{s.get('block_size')}x{s.get('block_size')} blocks, and the blocks with the largest summed "
        f"score were kept to meet a target density of {s.get('target_density')} per layer."
        + tokens_note + "</p>")
    p.append(
        "<p><b>Baseline.</b> Block-magnitude pruning kept, in every layer, the same number of blocks "
        "chosen by their L1 norm, and in the classifier the same number of weights chosen by "
        f"magnitude. Both pruned models were fine-tuned for {s.get('finetune_epochs')} epoch(s) with "
        f"the masks fixed (AdamW, lr {s.get('finetune_lr')}).</p>")
    p.append(
        f"<p><b>Result.</b> The encoder's linear layers keep <b>{dens:.1%}</b> of their weights and "
        f"the classifier <b>{cls:.1%}</b>. Test accuracy: dense {_fmt_pct(s['dense_accuracy'])}, "
        f"ANDC {_fmt_pct(s['andc_accuracy'])} (before fine-tuning "
        f"{_fmt_pct(s.get('andc_accuracy_before_finetune'))}), block magnitude "
        f"{_fmt_pct(s['magnitude_accuracy'])} (before fine-tuning "
        f"{_fmt_pct(s.get('magnitude_accuracy_before_finetune'))}): <b>{verdict}</b> at this density. "
        + (f"With every encoder linear as a block-sparse ANDCLinear, inference ran at "
           f"{s['pruned_images_per_s']:,.0f} images/s against {s['dense_images_per_s']:,.0f} for the "
           f"dense model (<b>{speed:.2f}x</b>, batch {s.get('bench_batch')}, fp32, {html.escape(str(s.get('device')))})."
           if speed is not None else "")
        + "</p>")
    if speed is not None and speed < 1.0:
        p.append("<p>On a model this small the linear layers are a minor part of the run time and the "
                 "per-call overhead of the sparse kernels dominates; the speed-up target is measured on "
                 "CCT-7/3x1 in the benchmark suite (<code>pytest bench/bench_models.py --benchmark-only</code>).</p>")
    return "\n".join(p)


CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: .6em 0; }
.kpi { display: flex; flex-wrap: wrap; gap: .8em; }
.kpi div { background: #f5f7fa; border: 1px solid #dde; border-radius: 6px; padding: .5em .9em; }
.kpi b { display: block; font-size: 1.3em; }
.note { color: #555; font-size: .9em; }
"""


def render_report(summary: Dict[str, Any], snp_dir: Optional[str] = None) -> str:
    """The report as an HTML string."""
    s = summary
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cctk ANDC report: "
             f"{html.escape(str(s.get('dataset')))}</title><style>{CSS}</style></head><body>"]
    parts.append(f"<h1>ANDC pruning of a Compact Convolutional Transformer on {html.escape(str(s.get('dataset')))}</h1>")
    kpis = [("dense accuracy", _fmt_pct(s.get("dense_accuracy"))),
            ("ANDC accuracy", _fmt_pct(s.get("andc_accuracy"))),
            ("magnitude accuracy", _fmt_pct(s.get("magnitude_accuracy"))),
            ("encoder linear density", f"{s.get('linear_density', float('nan')):.3f}"),
            ("classifier density", f"{s.get('classifier_density', float('nan')):.3f}")]
    if "speedup_vs_dense" in s:
        kpis.append(("pruned / dense images/s", f"{s['speedup_vs_dense']:.2f}x"))
    parts.append("<div class='kpi'>" + "".join(f"<div>{html.escape(k)}<b>{v}</b></div>" for k, v in kpis) + "</div>")
    parts.append("<h2>What was done</h2>")
    parts.append(_words(s))

    # SNP
    parts.append("<h2>Single-nodal performance (SNP)</h2>")
    snp = s.get("snp", {})
    blocks = snp.get("blocks") or []
    if blocks:
        rows = []
        for b, e in enumerate(blocks):
            for g in ("mha", "ff"):
                x = e.get(g, {})
                rows.append([f"block {b} {g.upper()}", _fmt_pct(x.get("readout_accuracy")),
                             f"{x.get('mean_recognized', float('nan')):.2f}",
                             f"{x.get('mean_cluster_size', float('nan')):.2f}",
                             f"{x.get('mean_noise', float('nan')):.2f}",
                             "n/a" if x.get("snr") is None else f"{x['snr']:.2f}"])
        parts.append(_table(rows, ["sub-block", "readout accuracy", "mean |D_n|", "mean cluster size",
                                   "mean noise", "SNR"]))
        parts.append(f"<p class='note'>Readout accuracies and node matrices are measured on the "
                     f"{html.escape(str(s.get('snp_split')))} split; threshold {s.get('snp_threshold')}.</p>")
    if snp_dir and os.path.isdir(snp_dir):
        for name, caption in (("blocks.png", "Per-block curves"), ("node_matrices.png", "Example node matrices")):
            path = os.path.join(snp_dir, name)
            if os.path.isfile(path):
                parts.append(f"<p class='note'>{caption} (from {html.escape(name)})</p>" + _img(_file_png(path), caption))
    # heads
    parts.append("<h2>Heads: who recognises which label</h2>")
    heads = snp.get("heads") or []
    if heads:
        rows = [[f"block {h.get('block', i)}", f"{h.get('share_mean', float('nan')):.3f}",
                 "n/a" if h.get("null_z") is None else f"{h['null_z']:.2f}",
                 "n/a" if h.get("p_value") is None else f"{h['p_value']:.3g}",
                 f"{h.get('jaccard_mean', float('nan')):.3f}"] for i, h in enumerate(heads)]
        parts.append(_table(rows, ["block", "mean share", "z vs null", "p-value", "mean Jaccard of head sets"]))
    head_pngs = sorted(glob.glob(os.path.join(snp_dir, "heads_block*.png"))) if snp_dir else []
    if head_pngs:
        for path in head_pngs:
            parts.append(_img(_file_png(path), os.path.basename(path), 900))
    elif snp_dir:
        for b64 in plot_heads_from_npz(snp_dir):
            parts.append(_img(b64, "heads map", 900))

    # pruning
    parts.append("<h2>Pruning: densities and block masks</h2>")
    andc, mag = s.get("andc", {}), s.get("magnitude", {})
    if andc.get("layers"):
        rows = []
        for n, d in andc["layers"].items():
            st = andc.get("layer_stats", {}).get(n, {})
            rows.append([_short(n), f"{d:.3f}", f"{st.get('connection_keep_fraction', float('nan')):.3f}",
                         f"{st.get('captured_fraction', st.get('captured_score_fraction', float('nan'))):.3f}",
                         f"{mag.get('layers', {}).get(n, float('nan')):.3f}"])
        parts.append(_table(rows, ["layer", "ANDC kept (blocks)", "ANDC-kept connections",
                                   "rule's kept mass captured by blocks", "magnitude kept"]))
        parts.append(f"<p class='note'>Node order chosen: {html.escape(str(andc.get('order')))}; "
                     f"block size {s.get('block_size')}.</p>")
    for b64, alt in ((plot_layer_density(s), "density per layer"), (plot_block_masks(s, "andc"), "ANDC block masks"),
                     (plot_block_masks(s, "magnitude"), "magnitude block masks")):
        if b64:
            parts.append(_img(b64, alt))

    # classifier scan
    scan = s.get("classifier_scan") or []
    if scan:
        parts.append("<h2>Classifier ANDC vs threshold</h2>")
        parts.append("<p>Only the classifier pruned by the paper's rule, the encoder dense, no fine-tuning: "
                     "how much of the classifier can go before accuracy drops.</p>")
        b64 = plot_classifier_scan(s)
        if b64:
            parts.append(_img(b64, "classifier scan", 650))
        parts.append(_table([[f"{r['threshold']:.2f}", f"{r['classifier_density']:.3f}", _fmt_pct(r["accuracy"])]
                             for r in scan], ["threshold", "classifier density", "accuracy"]))

    # accuracy vs density
    parts.append("<h2>Accuracy vs density: ANDC and block magnitude</h2>")
    parts.append(f"<p class='note'>Each point: prune at that target density, fine-tune "
                 f"{s.get('sweep_finetune_epochs', '?')} epoch(s) with the masks fixed, evaluate on the test split. "
                 "Both methods keep the same number of blocks per layer and the same number of classifier weights.</p>")
    b64 = plot_accuracy_vs_density(s)
    if b64:
        parts.append(_img(b64, "accuracy vs density", 700))
    sweep = s.get("sweep") or []
    if sweep:
        rows = [[r["method"], f"{r['target_density']}", f"{r['linear_density']:.3f}", f"{r['classifier_density']:.3f}",
                 _fmt_pct(r["accuracy_before_finetune"]), _fmt_pct(r["accuracy"])] for r in sweep]
        parts.append(_table(rows, ["method", "target", "linear density", "classifier density",
                                   "accuracy before fine-tune", "accuracy after fine-tune"]))

    # throughput
    parts.append("<h2>Inference throughput</h2>")
    b64 = plot_throughput(s)
    if b64:
        parts.append(_img(b64, "throughput", 700))
    if "dense_images_per_s" in s:
        parts.append(_table([
            ["dense model", f"{s['dense_images_per_s']:,.0f}", "1.00x"],
            ["pruned model, masked weights run dense", f"{s.get('masked_dense_images_per_s', float('nan')):,.0f}",
             f"{s.get('masked_dense_images_per_s', float('nan')) / s['dense_images_per_s']:.2f}x"],
            ["pruned model, ANDCLinear", f"{s['pruned_images_per_s']:,.0f}", f"{s['speedup_vs_dense']:.2f}x"],
        ], ["model", "images / s", "vs dense"]))
        parts.append(f"<p class='note'>Median of repeated timed runs, batch {s.get('bench_batch')}, fp32. "
                     f"Largest output difference between the ANDCLinear model and its masked dense twin: "
                     f"{s.get('pruned_vs_masked_dense_max_abs_diff', float('nan')):.2e}.</p>")
    m = s.get("machine", {})
    parts.append(f"<p class='note'>Run on {html.escape(str(m.get('platform')))}, torch {html.escape(str(m.get('torch')))}, "
                 f"{m.get('threads')} threads; whole pipeline {s.get('wall_time_s', float('nan')):.0f} s "
                 f"(timings: {html.escape(', '.join(f'{k} {v:.0f} s' for k, v in s.get('timings_s', {}).items()))}).</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: str, summary: Dict[str, Any], snp_dir: Optional[str] = None,
                 filename: str = "report.html") -> str:
    """Write ``out_dir/report.html`` (self-contained) and return its path."""
    path = os.path.join(out_dir, filename)
    text = render_report(summary, snp_dir=snp_dir)
    atomic_write(path, "wb", lambda f: f.write(text.encode("utf-8")))
    return path
