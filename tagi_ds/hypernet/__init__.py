"""The hypernetwork: instruction encoder (borrowed backbone) + generator of LoRA factors."""

from tagi_ds.hypernet.encoder import InstructionEncoder
from tagi_ds.hypernet.generator import Generator

__all__ = ["Generator", "InstructionEncoder"]
