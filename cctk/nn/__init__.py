"""Drop-in modules: ``ANDCLinear`` (block-sparse ``nn.Linear``)."""
from cctk.nn.andc_linear import ANDCLinear

__all__ = ["ANDCLinear"]
