"""Adapted layers, the adapter context and the LoRA bank."""

from tagi_ds.adapters.bank import LoraBank
from tagi_ds.adapters.layer import AdaptedLinear, AdapterSet, AdapterState, Site

__all__ = ["AdaptedLinear", "AdapterSet", "AdapterState", "LoraBank", "Site"]
