"""Pruning of a trained CCT (SCIENCE.md sections 5 and 7), in Torch-Pruning's shape:

* :mod:`cctk.prune.plan`: the shared vocabulary (:class:`PrunePlan`, :class:`Target`,
  :class:`Permutations`, :func:`apply_masks`);
* :mod:`cctk.prune.andc`: the science (label sets :class:`RecognizedSets`, the rule
  :class:`AndcRule` carried to blocks, label-sorting permutations);
* :mod:`cctk.prune.importance`: importances as objects (block: andc, andc-magnitude,
  magnitude, wanda, random, andc-shuffled; node: snp, activation);
* :mod:`cctk.prune.pruner`: ONE registry of methods (:data:`METHODS`), :func:`prune_blocks`,
  :func:`prune_nodes`, :func:`prune_model` (any method from a :class:`PruneSpec`);
* :mod:`cctk.prune.workflow`: :func:`prune_and_finetune` (prune, fine-tune with masks fixed,
  evaluate, convert), what ``cctk prune`` and the demo run.

Typical use::

    from cctk.prune import RecognizedSets, PruneSpec, prune_model, finetune, convert_to_andc, save_pruned
    sets = RecognizedSets.from_snp("runs/snp")              # cctk.snp.load_recognized
    pruned, plan = prune_model(model, PruneSpec("andc", density=0.5, block_size=16), sets)
    finetune(pruned, train_loader, epochs=2, lr=1e-4)
    convert_to_andc(pruned)
    save_pruned(pruned, plan, "runs/pruned/checkpoint.pt")

One importance through the pruner directly::

    from cctk.prune import Target, prune_blocks, prune_nodes
    from cctk.prune.importance import WandaImportance, SNPNodeImportance
    calib = [x for x, _ in train_loader][:4]
    pruned, plan = prune_blocks(model, WandaImportance(calib), Target(block_size=16, density=0.25))
    small, kept = prune_nodes(model, SNPNodeImportance(sets, calib), 0.25)

``cctk study`` (:mod:`cctk.experiments.study`) compares them all over seeds.

Command line::

    cctk snp   --checkpoint runs/digits/checkpoint.pt --out runs/digits_snp
    cctk prune --checkpoint runs/digits/checkpoint.pt --snp runs/digits_snp --density 0.5 \\
               --block-size 16 --finetune-epochs 5 --method andc --out runs/digits_andc
    cctk prune ... --method magnitude --out runs/digits_mag     # same per-layer densities
    cctk eval  --checkpoint runs/digits_andc/checkpoint.pt

The whole story in one call: ``cctk.experiments.run_pipeline(out_dir, dataset=...)``.
"""

from cctk.prune.andc import OLD_RULE, AndcRule, MissingTokenSets, RecognizedSets
from cctk.prune.convert import (convert_to_andc, density_summary, layer_densities, load_pruned,
                                relative_linear_density, save_pruned, to_masked_dense)
from cctk.prune.finetune import finetune, images_per_second
from cctk.prune.importance import BlockImportance, NodeImportance
from cctk.prune.plan import PrunePlan, Target, apply_masks, encoder_linear_names
from cctk.prune.pruner import (ALL_METHODS, METHODS, STRUCTURED_METHODS, Method, PruneSpec, prune_andc,
                               prune_blocks, prune_magnitude, prune_model, prune_nodes)
from cctk.prune.workflow import prune_and_finetune

# The names a user calls; the building blocks (masks, permutations, label sets per layer) stay
# in their modules (cctk.prune.masks, cctk.prune.permute, cctk.prune.andc).
__all__ = [
    "RecognizedSets", "AndcRule", "OLD_RULE", "MissingTokenSets", "PrunePlan", "Target", "PruneSpec",
    "Method", "METHODS", "ALL_METHODS", "STRUCTURED_METHODS", "prune_model", "prune_blocks", "prune_nodes",
    "prune_andc", "prune_magnitude", "prune_and_finetune", "apply_masks", "encoder_linear_names", "finetune",
    "convert_to_andc", "to_masked_dense", "density_summary", "relative_linear_density", "layer_densities",
    "save_pruned", "load_pruned", "images_per_second", "BlockImportance", "NodeImportance",
]
