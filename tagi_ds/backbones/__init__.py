"""Backbones by architecture: each module offers build, site_names, body, encode, logits and head_inputs.

``t5`` is the encoder-decoder; ``decoder`` serves every decoder-only family (``config.DECODER_ONLY``).
"""

from types import ModuleType

from tagi_ds.backbones import decoder, t5
from tagi_ds.config import DECODER_ONLY

ARCHS: dict[str, ModuleType] = {"t5": t5, **{arch: decoder for arch in DECODER_ONLY}}


def get(arch: str) -> ModuleType:
    return ARCHS[arch]
