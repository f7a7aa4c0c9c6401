"""``cctk models``: the CCT models, their layers, heads, width, tokenizer and parameters."""
from __future__ import annotations

import argparse
import json

HELP = "list the CCT models: layers, heads, width, tokenizer, parameters"


def _count_parameters(name: str) -> int:
    """Parameter count of the named model, built on the meta device (no memory, no init cost)."""
    import torch

    from cctk import models

    with torch.device("meta"):
        model = models.create_model(name)
    return sum(p.numel() for p in model.parameters())


def run(args: argparse.Namespace) -> int:
    from cctk import models

    rows = []
    for name in models.list_models():
        cfg = models.model_config(name)
        rows.append({
            "name": name, "layers": cfg["num_layers"], "heads": cfg["num_heads"],
            "dim": cfg["embedding_dim"], "mlp_ratio": cfg["mlp_ratio"],
            "tokenizer": f"{cfg['kernel_size']}x{cfg['n_conv_layers']}",
            "img_size": cfg["img_size"], "in_channels": cfg["in_channels"],
            "classes": cfg["num_classes"], "pos_emb": cfg["positional_embedding"],
            "params": _count_parameters(name),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("name", "layers", "heads", "dim", "mlp_ratio", "tokenizer", "img_size",
              "in_channels", "classes", "pos_emb", "params")
    table = [[str(r[h]) if h != "params" else f"{r[h]:,}" for h in header] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                    for i, (h, w) in enumerate(zip(header, widths))))
    for t in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths))))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the table as JSON")
