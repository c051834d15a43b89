"""Backbones by architecture: each module offers build, site_names, encode and logits."""

from types import ModuleType

from tagi_ds.backbones import llama, t5

ARCHS: dict[str, ModuleType] = {"t5": t5, "llama": llama}


def get(arch: str) -> ModuleType:
    return ARCHS[arch]
