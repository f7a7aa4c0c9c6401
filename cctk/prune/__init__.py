"""ANDC pruning (SCIENCE.md section 5): SNP-guided connection masks, label-sorting
function-preserving permutations, block masks, the block-magnitude baseline, fine-tuning with
fixed masks, conversion to ``cctk.nn.ANDCLinear`` and pruned checkpoints.

Typical use::

    from cctk.prune import RecognizedSets, prune_andc, finetune, convert_to_andc, save_pruned
    sets = RecognizedSets.from_snp("runs/snp")              # cctk.snp.load_recognized
    pruned, plan = prune_andc(model, sets, block_size=16, density=0.5)
    finetune(pruned, train_loader, epochs=2, lr=1e-4)
    convert_to_andc(pruned)
    save_pruned(pruned, plan, "runs/pruned/checkpoint.pt")

One API for every method (:mod:`cctk.prune.scorers`): a scorer scores blocks (or nodes), one
function turns block scores into masks and a PrunePlan, one turns node scores into a smaller
dense CCT::

    from cctk.prune import make_scorer, make_node_scorer, prune_blocks, prune_nodes
    scorer = make_scorer("wanda", calibration=[x for x, _ in train_loader][:4])  # or andc, magnitude,
    pruned, plan = prune_blocks(model, scorer, density=0.25, block_size=16)     # random, andc-shuffled
    small, kept = prune_nodes(model, make_node_scorer("snp", sets=sets, calibration=calib), 0.25)

``cctk study`` (:mod:`cctk.experiments.study`) compares them all over seeds.

Command line::

    cctk snp   --checkpoint runs/digits/checkpoint.pt --out runs/digits_snp
    cctk prune --checkpoint runs/digits/checkpoint.pt --snp runs/digits_snp --density 0.5 \
               --block-size 16 --finetune-epochs 5 --method andc --out runs/digits_andc
    cctk prune ... --method magnitude --out runs/digits_mag     # same per-layer densities
    cctk eval  --checkpoint runs/digits_andc/checkpoint.pt

The whole story in one call: ``cctk.experiments.run_pipeline(out_dir, dataset=...)``.

Paper scale on a GPU (CIFAR-100, CCT-7/3x1; Flowers-102 with ``--preset flowers102``)::

    cctk train --preset cifar100 --data-dir ~/data --out runs/c100          # 300 + 10 epochs
    cctk snp   --checkpoint runs/c100/checkpoint.pt --out runs/c100_snp     # fused Triton stats
    for m in andc magnitude; do
      cctk prune --checkpoint runs/c100/checkpoint.pt --snp runs/c100_snp --method $m \
                 --density 0.25 --block-size 32 --finetune-epochs 10 --lr 1e-4 --out runs/c100_$m
    done
    # or: python -c "from cctk.experiments import run_pipeline; run_pipeline('runs/c100_demo',
    #      dataset='cifar100', data_dir='~/data', device='cuda', block_size=32, density=0.25,
    #      finetune_epochs=10, lr=1e-4)"
"""

from cctk.prune.andc import (PrunePlan, RecognizedSets, apply_masks, encoder_linear_names, prune_andc,
                             prune_magnitude)
from cctk.prune.convert import (convert_to_andc, density_summary, layer_densities, load_pruned,
                                relative_linear_density, save_pruned, to_masked_dense)
from cctk.prune.finetune import finetune, images_per_second
from cctk.prune.scorers import (BLOCK_METHODS, STUDY_METHODS, BlockScorer, NodeScorer, make_node_scorer,
                                make_scorer, prune_blocks, prune_nodes)
from cctk.prune.workflow import prune_and_finetune, prune_model

# The names a user calls; the building blocks (masks, permutations, label sets per layer) stay
# in their modules (cctk.prune.masks, cctk.prune.permute, cctk.prune.andc).
__all__ = [
    "RecognizedSets", "PrunePlan", "prune_andc", "prune_magnitude", "prune_model",
    "prune_and_finetune", "apply_masks", "encoder_linear_names", "finetune", "convert_to_andc",
    "to_masked_dense", "density_summary", "relative_linear_density", "layer_densities", "save_pruned", "load_pruned",
    "images_per_second", "BlockScorer", "NodeScorer", "make_scorer", "make_node_scorer", "prune_blocks",
    "prune_nodes", "BLOCK_METHODS", "STUDY_METHODS",
]
