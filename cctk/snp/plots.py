"""Figures of an SNP result (matplotlib, Agg backend, PNG):

* ``node_matrices.png``: example node matrices, normalised (Mhat = M / max) and binarised
  (Mhat > threshold), a few nodes of the first and the last block's MHA and FF sub-blocks;
* ``blocks.png``: per-block curves for mha and ff: readout accuracy, mean cluster size, mean
  noise, SNR (blocks whose value is undefined are left out of a curve);
* ``heads_block{b}.png``: the heads x labels coverage map c_h[k] of block b, the labels of each
  head's SHP set D_h marked.
"""
from __future__ import annotations

import os

import numpy as np

from cctk.checkpoint import atomic_write
from cctk.snp.clusters import analyze_matrix

__all__ = ["make_plots", "figure_paths"]

#: the names make_plots writes (glob patterns)
FIGURES = ("node_matrices.png", "blocks.png", "heads_block*.png")


def figure_paths(out_dir: str) -> list:
    """The SNP figures present in ``out_dir``."""
    import glob

    return sorted(p for pattern in FIGURES for p in glob.glob(os.path.join(glob.escape(out_dir), pattern)))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    """A PNG written atomically (mkstemp + rename, like every result file)."""
    atomic_write(path, "wb", lambda f: fig.savefig(f, format="png", dpi=100))


def make_plots(result, out_dir: str) -> dict:
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    threshold = result.summary["config"]["threshold"]
    written = {}

    examples = sorted(k for k in result.arrays if k.startswith("example_"))
    if examples:
        per_row = 3                                      # examples per row, 2 panels each
        rows = -(-len(examples) // per_row)
        fig, axes = plt.subplots(rows, 2 * per_row, figsize=(4.2 * per_row, 2.3 * rows),
                                 squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i, key in enumerate(examples):
            a = analyze_matrix(result.arrays[key], threshold)
            title = key[len("example_"):]
            left, right = axes[i // per_row, 2 * (i % per_row)], axes[i // per_row, 2 * (i % per_row) + 1]
            left.imshow(a.normalized, cmap="RdBu_r", vmin=-1, vmax=1)
            left.set_title(f"{title}: M / max", fontsize=7)
            right.imshow(a.binary, cmap="Greys", vmin=0, vmax=1)
            right.set_title(f"> {threshold}: |D| {len(a.recognized)}, {len(a.clusters)} cl., "
                            f"noise {a.noise}", fontsize=7)
            for ax in (left, right):
                ax.axis("on")
                ax.set_xlabel("readout label c", fontsize=6)
                ax.set_ylabel("true label k", fontsize=6)
                ax.tick_params(labelsize=5)
        fig.tight_layout()
        written["node_matrices.png"] = os.path.join(out_dir, "node_matrices.png")
        _save(fig, written["node_matrices.png"])
        plt.close(fig)

    blocks = result.summary["blocks"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, (field, label) in zip(axes, [("readout_accuracy", "readout accuracy"),
                                         ("mean_cluster_size", "mean cluster size"),
                                         ("mean_noise", "mean noise"), ("snr", "SNR")]):
        for group, marker in (("mha", "o"), ("ff", "s")):
            xs = [b for b, e in enumerate(blocks) if e[group].get(field) is not None]
            ys = [blocks[b][group][field] for b in xs]
            ax.plot(xs, ys, marker=marker, label=group)
        ax.set_xlabel("block")
        ax.set_xticks(range(len(blocks)))
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written["blocks.png"] = os.path.join(out_dir, "blocks.png")
    _save(fig, written["blocks.png"])
    plt.close(fig)

    for b in range(len(blocks)):
        cov = result.arrays.get(f"b{b}_coverage")
        if cov is None:
            continue
        shp = result.arrays.get(f"b{b}_heads_recognized")
        H, K = cov.shape
        fig, ax = plt.subplots(figsize=(max(4, 0.12 * K + 2), 0.5 * H + 1.5))
        im = ax.imshow(cov, aspect="auto", cmap="viridis", interpolation="nearest")
        if shp is not None:
            hs, ks = np.nonzero(shp)
            ax.scatter(ks, hs, marker="x", color="red", s=12, label="k in D_h (SHP)")
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), frameon=False)
        head = result.summary["heads"][b]
        z, p = head.get("null_z"), head.get("p_value")
        ax.set_title(f"block {b}: coverage c_h[k]; share {_fmt(head.get('share_mean'))}, "
                     f"z {_fmt(z)}, p {_fmt(p)}", fontsize=9)
        ax.set_xlabel("label k")
        ax.set_ylabel("head h")
        ax.set_yticks(range(H))
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        name = f"heads_block{b}.png"
        written[name] = os.path.join(out_dir, name)
        _save(fig, written[name])
        plt.close(fig)
    return written


def _fmt(v):
    return "n/a" if v is None else f"{v:.3g}"
