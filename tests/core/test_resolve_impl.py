"""``ops.resolve_impl("auto")`` on CUDA without the kernels: the torch op, with one warning naming the import error,
and the impl that ran counted for benchmarks (a fake CUDA tensor stands in for a GPU)."""

import sys
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tagi_ds import ops


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setitem(sys.modules, "tagi_kernels", None)  # `import tagi_kernels` now raises ImportError
    monkeypatch.setattr(ops, "_warned_fallback", False)
    ops.kernels_import_error.cache_clear()
    yield
    ops.kernels_import_error.cache_clear()


def test_auto_on_cuda_without_kernels_warns_once_and_counts_what_ran(no_kernels):
    with FakeTensorMode():
        x = torch.empty(4, 8, device="cuda")
    ops.RESOLVED.clear()
    with pytest.warns(
        RuntimeWarning,
        match=r"runs the torch reference op: tagi_kernels does not import "
        r"\(ModuleNotFoundError: .*tagi_kernels",
    ):
        assert ops.resolve_impl("auto", x) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the adapted layers call it at every site
        assert ops.resolve_impl("auto", x) == "torch"
        assert ops.resolve_impl("auto", torch.empty(2, 8)) == "torch"  # CPU: the reference, nothing to say
        assert ops.resolve_impl("triton", x) == "triton"
    assert ops.RESOLVED == {"torch": 3, "triton": 1}
    assert ops.kernels_import_error().startswith("ModuleNotFoundError")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.resolve_impl("fast", x)
