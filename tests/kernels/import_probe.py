"""``python -m tests.kernels.import_probe`` from the repository root (tests/kernels/test_imports.py): the imports that
the root's ``kernels/`` folder once shadowed."""

import os

import kernels
import transformers.activations  # noqa: F401

import tagi_ds  # noqa: F401
import tagi_kernels

assert not kernels.__file__.startswith(os.getcwd() + os.sep), kernels.__file__
assert callable(tagi_kernels.triton_lora_delta)
print("ok", kernels.__file__)
