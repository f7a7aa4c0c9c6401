"""``cctk demo``: the main job on the embedded default data set, explained in plain words.

On scikit-learn's bundled 8x8 digits (no download) it runs the whole ANDC story through
:func:`cctk.experiments.pipeline.run_pipeline`: train the dataset's default CCT, measure the
single-nodal performance (SNP) of every node, prune with ANDC and with the block-magnitude
baseline at the same per-layer densities, fine-tune both, evaluate, time dense vs pruned
inference, sweep accuracy against density, and write ``summary.json`` and ``report.html``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from cctk.experiments.pipeline import DEFAULT_DENSITY, SWEEP_DENSITIES, run_pipeline

DEFAULT_EPOCHS = 30  # the digits preset's


def run_demo(out: str, dataset: str = "digits", epochs: Optional[int] = None, seed: int = 0,
             data_dir: Optional[str] = None, device: Optional[str] = None,
             verbose: bool = True, **pipeline_options) -> Dict[str, Any]:
    """Run the pipeline, print a plain-words account of it, return its summary dict.
    ``pipeline_options`` go to :func:`run_pipeline` (density, block_size, finetune_epochs,
    sweep, train_subset, test_subset, null_draws, ...)."""
    say = print if verbose else (lambda *a, **k: None)
    say(f"cctk demo: train a Compact Convolutional Transformer on '{dataset}', measure what every "
        f"node of every attention head and feed-forward layer recognises (single-nodal "
        f"performance), prune it with ANDC and with block magnitude, fine-tune, compare, and "
        f"time dense against pruned inference.", flush=True)
    s = run_pipeline(out, dataset=dataset, epochs=epochs, seed=seed, data_dir=data_dir, device=device,
                     verbose=verbose, **pipeline_options)
    snp_blocks = s["snp"]["blocks"] or []
    heads = s["snp"]["heads"] or []
    say("")
    say("What happened:")
    say(f"  - Trained {s['model']} ({s['parameters']:,} parameters) for {s['train']['epochs']} epochs "
        f"in {s['train']['wall_time_s']:.0f} s; on the held-out test images it is right "
        f"{s['dense_accuracy'] * 100:.1f}% of the time.")
    if snp_blocks:
        accs = ", ".join(f"block {b}: MHA {blk['mha']['readout_accuracy'] * 100:.0f}% / "
                         f"FF {blk['ff']['readout_accuracy'] * 100:.0f}%" for b, blk in enumerate(snp_blocks))
        say(f"  - A linear readout on each sub-block's nodes reaches {accs}.")
        sizes = ", ".join(f"{blk['ff']['mean_cluster_size']:.2f}" for blk in snp_blocks
                          if blk['ff'].get('mean_cluster_size') is not None)
        say(f"  - Each node recognises a few labels; the FF nodes' mean cluster size per block: {sizes}.")
    for h in heads:
        if h.get("null_z") is not None:
            say(f"  - Block {h.get('block')}: the heads divide the labels with share "
                f"{h['share_mean']:.2f} vs {h['null_mean']:.2f} for random head assignments "
                f"(z = {h['null_z']:.1f}, p = {h['p_value']:.3g}).")
    say(f"  - ANDC kept {s['linear_density'] * 100:.0f}% of the encoder's linear weights (in "
        f"{s['block_size']}x{s['block_size']} blocks) and {s['classifier_density'] * 100:.0f}% of the "
        f"classifier's; after {s['finetune_epochs']} fine-tune epochs it scores "
        f"{s['andc_accuracy'] * 100:.1f}% (block-magnitude pruning at the same densities: "
        f"{s['magnitude_accuracy'] * 100:.1f}%).")
    say(f"  - Inference of the pruned model (cctk.ANDCLinear layers, run through cctk.optimize): "
        f"{s['pruned_images_per_s']:.0f} images/s vs {s['dense_images_per_s']:.0f} for the faster of the dense "
        f"model in stock PyTorch and through cctk.optimize ({s['speedup_vs_dense']:.2f}x; fp32, batch "
        f"{s['bench_batch']}, {s['device']}, fastest of 15 interleaved rounds).")
    say(f"  - Wrote {os.path.join(out, 'summary.json')} and the report {os.path.join(out, 'report.html')} "
        f"(open it in a browser), the dense and pruned checkpoints, and the SNP files under "
        f"{os.path.join(out, 'snp')}.")
    say(f"  Next: `cctk eval --checkpoint {os.path.join(out, 'andc', 'checkpoint.pt')}` re-measures "
        f"the pruned model.")
    return s


__all__ = ["run_demo", "DEFAULT_EPOCHS", "DEFAULT_DENSITY", "SWEEP_DENSITIES"]
