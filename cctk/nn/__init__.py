"""Drop-in modules: ``ANDCLinear`` (block-sparse ``nn.Linear``) and ``MaskedLinear`` (a dense
``nn.Linear`` with a fixed 0/1 weight mask: the pruned classifier, masked fine-tuning)."""
from cctk.nn.andc_linear import ANDCLinear
from cctk.nn.masked_linear import MaskedLinear, expand_block_mask

__all__ = ["ANDCLinear", "MaskedLinear", "expand_block_mask"]
