"""ANDC pruning (SCIENCE.md section 5): SNP-guided connection masks, label-sorting
function-preserving permutations, block masks, the block-magnitude baseline, fine-tuning with
fixed masks, conversion to ``cctk.nn.ANDCLinear`` and pruned checkpoints.

Typical use::

    from cctk.prune import RecognizedSets, prune_andc, prune_magnitude, finetune, convert_to_andc
    sets = RecognizedSets.from_snp("runs/snp")              # cctk.snp.load_recognized
    pruned, plan = prune_andc(model, sets, block_size=16, density=0.5)
    finetune(pruned, train_loader, epochs=2, lr=1e-4)
    convert_to_andc(pruned)
    save_pruned(pruned, plan, "runs/pruned/checkpoint.pt")

Command line::

    cctk snp   --checkpoint runs/digits/checkpoint.pt --out runs/digits_snp
    cctk prune --checkpoint runs/digits/checkpoint.pt --snp runs/digits_snp --density 0.5 \
               --block-size 16 --finetune-epochs 5 --method andc --out runs/digits_andc
    cctk prune ... --method magnitude --out runs/digits_mag     # same per-layer densities
    cctk eval  --checkpoint runs/digits_andc/checkpoint.pt

The whole story in one call: ``cctk.prune.pipeline.run_pipeline(out_dir, dataset=...)``.

Paper scale on a GPU (CIFAR-100, CCT-7/3x1; Flowers-102 with ``--preset flowers102``)::

    cctk train --preset cifar100 --data-dir ~/data --out runs/c100          # 300 + 10 epochs
    cctk snp   --checkpoint runs/c100/checkpoint.pt --out runs/c100_snp     # fused Triton stats
    for m in andc magnitude; do
      cctk prune --checkpoint runs/c100/checkpoint.pt --snp runs/c100_snp --method $m \
                 --density 0.25 --block-size 32 --finetune-epochs 10 --lr 1e-4 --out runs/c100_$m
    done
    # or: python -c "from cctk.prune.pipeline import run_pipeline; run_pipeline('runs/c100_demo',
    #      dataset='cifar100', data_dir='~/data', device='cuda', block_size=32, density=0.25,
    #      finetune_epochs=10, lr=1e-4)"
"""
from cctk.prune.andc import (
    Permutations,
    PrunePlan,
    RecognizedSets,
    apply_masks,
    apply_permutations,
    choose_permutations,
    encoder_linear_names,
    layer_label_sets,
    prune_andc,
    prune_magnitude,
)
from cctk.prune.convert import (
    PRUNED_FORMAT,
    build_pruned_model,
    convert_to_andc,
    density_summary,
    is_pruned_checkpoint,
    layer_densities,
    load_pruned,
    save_pruned,
    to_masked_dense,
)
from cctk.prune.finetune import finetune, images_per_second
from cctk.prune.masks import (
    andc_block_mask,
    block_reduce,
    classifier_keep,
    connection_keep,
    expand_block_mask,
    magnitude_block_mask,
    magnitude_element_mask,
    overlap_scores,
)
from cctk.prune.modules import MaskedLinear
from cctk.prune.permute import label_order, permute_ff, permute_head_dims, permute_stream

__all__ = [
    "Permutations", "PrunePlan", "RecognizedSets", "apply_masks", "apply_permutations",
    "choose_permutations", "encoder_linear_names", "layer_label_sets", "prune_andc",
    "prune_magnitude", "PRUNED_FORMAT", "build_pruned_model", "convert_to_andc", "density_summary",
    "is_pruned_checkpoint", "layer_densities", "load_pruned", "save_pruned", "to_masked_dense",
    "andc_block_mask", "block_reduce", "classifier_keep", "connection_keep", "expand_block_mask",
    "magnitude_block_mask", "magnitude_element_mask", "overlap_scores", "MaskedLinear",
    "label_order", "finetune", "images_per_second", "permute_ff", "permute_head_dims", "permute_stream",
]
