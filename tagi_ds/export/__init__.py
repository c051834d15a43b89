"""Exports of generated adapters to other libraries' formats (PEFT LoRA)."""

from tagi_ds.export.peft import CONDITIONS, condition_text, export_peft, generate_factors, instruction_tensors

__all__ = ["CONDITIONS", "condition_text", "export_peft", "generate_factors", "instruction_tensors"]
