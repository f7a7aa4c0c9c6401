"""What a block-pruning method kept, read off the masks of a finished study's cells: the checks
the audit of cctk's first ANDC rule made by hand (issue 18), for every method and seed.

Per cell (the structure :func:`cctk.experiments.study.run.study_cell_models` rebuilds, which is
the cell's pruned structure before fine-tuning; the dense model is the seed's trained one):

- ``heads_without``: in each block's attention, the heads that kept **no** block of their q, k
  or v rows (the first rule starved one head of block 0 on every seed);
- ``dead_inputs`` / ``dead_outputs``: the share of each linear's input columns (output rows)
  that feed (receive) no kept block: a layer that keeps its blocks in a few input columns has
  cut the rest of its inputs off;
- ``kept_weight``: the share of the dense layer's sum |W| inside the kept blocks (block
  magnitude maximises it at a given density; random blocks keep about the density).

Reads the study directory, writes ``anatomy.json`` and ``anatomy.md`` beside its summary.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from cctk.checkpoint import atomic_write_text
from cctk.errors import ConfigError
from cctk.experiments.study.ledger import cell_key, read_rows
from cctk.nn import ANDCLinear, MaskedLinear, expand_block_mask
from cctk.prune.convert import encoder_linear_names
from cctk.prune.pruner import METHODS

__all__ = ["layer_anatomy", "model_anatomy", "study_anatomy", "anatomy_markdown"]


def _element_mask(m: nn.Module) -> torch.Tensor | None:
    """The kept-weight mask (out, in) of a pruned linear; None for a dense one."""
    if isinstance(m, ANDCLinear):
        return expand_block_mask(m.block_mask.cpu(), m.block_size, (m.out_features, m.in_features))
    if isinstance(m, MaskedLinear):
        return m.mask.cpu().bool()
    return None


def layer_anatomy(dense_weight: torch.Tensor, mask: torch.Tensor) -> Dict[str, float]:
    """Dead input columns and output rows (shares) and the share of sum |W| the mask keeps."""
    w = dense_weight.detach().float().abs().cpu()
    return {"density": float(mask.float().mean()),
            "dead_inputs": float((~mask.any(0)).float().mean()),
            "dead_outputs": float((~mask.any(1)).float().mean()),
            "kept_weight": float((w * mask).sum() / w.sum().clamp_min(1e-30))}


def _qkv_heads(mask: torch.Tensor, num_heads: int) -> Dict[str, List[int]]:
    """Kept weights per head in the q, k and v rows of a qkv mask (rows: part x head x head dim)."""
    kept = mask.reshape(3, num_heads, mask.shape[0] // (3 * num_heads), -1).sum(dim=(2, 3))
    return {part: [int(v) for v in kept[i]] for i, part in enumerate("qkv")}


def model_anatomy(dense: nn.Module, pruned: nn.Module) -> Dict[str, Any]:
    """Per encoder linear of ``pruned`` (a pruned copy of ``dense``): :func:`layer_anatomy`, and for
    each attention's qkv the kept weights per head in q, k, v and the heads with none in one of them."""
    layers: Dict[str, Any] = {}
    for name in encoder_linear_names(pruned):
        mask = _element_mask(pruned.get_submodule(name))
        if mask is None:
            continue
        d = dense.get_submodule(name)
        if tuple(d.weight.shape) != tuple(mask.shape):
            continue   # node removal changed the shape: not a block method's layer
        rec = layer_anatomy(d.weight, mask)
        if name.endswith("qkv"):
            attn = pruned.get_submodule(name.rsplit(".", 1)[0])
            heads = _qkv_heads(mask, int(attn.num_heads))
            rec["kept_per_head"] = heads
            rec["heads_without"] = {p: [h for h, n in enumerate(v) if n == 0] for p, v in heads.items()}
        layers[name] = rec
    return layers


def study_anatomy(out: str, densities: Sequence[float], methods: Sequence[str] | None = None,
                  data_dir: str | None = None) -> Dict[str, Any]:
    """The anatomy of every finished block-method cell of the study in ``out`` at ``densities``
    (``methods``: by default every method of the registry whose kind is ``block`` with a finished
    cell); writes ``out/anatomy.json`` and ``out/anatomy.md``; returns ``{density: anatomy}``."""
    from cctk.experiments.study.run import study_cell_models   # (run imports this package's report)
    rows = read_rows(os.path.join(out, "results.csv"))
    if not rows:
        raise ConfigError(f"{out} holds no finished cell (no results.csv rows)")
    have = {cell_key(r["seed"], r["method"], r["density"]) for r in rows}
    result: Dict[str, Any] = {}
    for density in densities:
        d = round(float(density), 6)
        ms = [m for m in (methods if methods is not None else METHODS)
              if m in METHODS and METHODS[m].kind == "block" and any(c[1] == m and c[2] == d for c in have)]
        per: Dict[str, Any] = {"density": d, "methods": ms, "seeds": {}}
        for seed in sorted({s for (s, m, dd) in have if dd == d and m in ms}):
            done_here = [m for m in ms if (seed, m, d) in have]
            models = study_cell_models(out, seed, done_here, d, data_dir=data_dir)
            per["seeds"][str(seed)] = {m: model_anatomy(models["dense"], models["pruned"][m]) for m in done_here}
        result[f"{d:g}"] = per
    atomic_write_text(json.dumps(result, indent=1) + "\n", os.path.join(out, "anatomy.json"))
    atomic_write_text("\n".join(anatomy_markdown(v) for v in result.values()), os.path.join(out, "anatomy.md"))
    return result


def anatomy_markdown(result: Dict[str, Any]) -> str:
    """anatomy.md: per method, means over seeds of each layer's dead inputs and kept |W|, and per
    seed the heads left without q, k or v blocks."""
    seeds = result["seeds"]
    lines = [f"# What the block methods kept (density {result['density']:g}; masks before fine-tuning)", ""]
    if not seeds:
        return "\n".join(lines + ["No finished cell.", ""])
    layer_names: List[str] = []
    for per_method in seeds.values():
        for layers in per_method.values():
            layer_names += [n for n in layers if n not in layer_names]
    lines += ["Share of the dense layer's sum |W| in the kept blocks / share of input columns feeding no kept "
              f"block (mean over {len(seeds)} seeds):", "",
              "| method | " + " | ".join(layer_names) + " |", "|---|" + "---|" * len(layer_names)]
    for m in result["methods"]:
        cols = []
        for n in layer_names:
            vals = [seeds[s][m][n] for s in seeds if m in seeds[s] and n in seeds[s][m]]
            cols.append("" if not vals else
                        f"{sum(v['kept_weight'] for v in vals) / len(vals):.2f} / "
                        f"{sum(v['dead_inputs'] for v in vals) / len(vals):.2f}")
        lines.append(f"| {m} | " + " | ".join(cols) + " |")
    qkv = [n for n in layer_names if n.endswith("qkv")]
    if qkv:
        lines += ["", "Kept weights per head in q / k / v (per seed, `head0,head1,...`); **heads with none** in bold:", "",
                  "| method | seed | " + " | ".join(qkv) + " |", "|---|---|" + "---|" * len(qkv)]
        for m in result["methods"]:
            for s in seeds:
                if m not in seeds[s]:
                    continue
                cols = []
                for n in qkv:
                    rec = seeds[s][m].get(n)
                    if rec is None:
                        cols.append("")
                        continue
                    parts = []
                    for p in "qkv":
                        per = ",".join("**0**" if v == 0 else str(v) for v in rec["kept_per_head"][p])
                        parts.append(f"{p} {per}")
                    cols.append("; ".join(parts))
                lines.append(f"| {m} | {s} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"
