"""tagi-ds: TAGI hypernetworks that generate LoRA adapters from task instructions, trained with DeepSpeed."""

__version__ = "0.1.0"
