"""The 2026-12-04 GPU crash, reproduced without a GPU: fake CUDA tensors under torch's ``FakeTensorMode``.

On the H200 every TAGI case died with "Expected all tensors to be on the same device, but got index is on cpu"
(``index_select``): under ZeRO-3 ``deepspeed.initialize`` leaves buffers where they were built, so the generator's
site indices (a CPU buffer) indexed its CUDA site embedding. ``runtime.engine.place`` moves them. Here the model is
left as ``deepspeed.initialize`` leaves it (parameters on the device, buffers on the host), as fake tensors (shapes,
dtypes and devices, no data), and the forward of the TAGI step's device-sensitive part runs: the instruction
encoding through the frozen backbone, the generator, and the teacher bank's rows copied to the device (through the
staging buffer). FakeTensorMode checks devices as the CUDA kernels do.

Not covered: the adapted forward and the loss. Their shapes depend on data (the reference adapter op's
``int(lengths.max())``, the loss's boolean selection of target rows), which fake tensors do not carry, and
FakeTensorMode's real-value propagation runs the real kernels on the fake device (CUDA), absent from a CPU-only torch.

A CPU-only torch refuses a few Python-level entry points that initialise CUDA or set a CUDA device guard before any
kernel runs (``Tensor.to``/``.cuda``, indexing, ``copy_`` across devices); ``FakeCudaOps`` re-implements those with
aten ops that fake tensors handle, keeping CUDA's device rules (an index tensor may live on the host for Python
indexing, which moves it; kernels such as ``index_select`` and ``embedding`` take none).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from tagi_ds.runtime import engine as E
from tests.core.helpers import make_batch, tiny_model

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")
aten = torch.ops.aten


def _device(d) -> torch.device:
    d = torch.device(d)
    return CUDA if d.type == "cuda" and d.index is None else d


def _move(t: torch.Tensor, device=None, dtype=None) -> torch.Tensor:
    device, dtype = t.device if device is None else _device(device), dtype or t.dtype
    return t if (device, dtype) == (t.device, t.dtype) else aten._to_copy.default(t, dtype=dtype, device=device)


def _to(t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (str, torch.device)):
            device = a
        elif isinstance(a, torch.Tensor):
            device, dtype = a.device, a.dtype
    return _move(t, device, dtype)


class FakeCudaOps(TorchFunctionMode):
    """Python versions of the entry points a CPU-only torch refuses for fake CUDA tensors (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            return _to(*args, **kwargs)
        if func is torch.Tensor.cuda:
            return _move(args[0], CUDA)
        if func is torch.Tensor.__getitem__ and args[0].is_cuda:
            # Index a host twin (fake: no data, so no aliasing to keep), then move the result back.
            x, index = args
            host = tree_map(lambda t: _move(t, CPU) if isinstance(t, torch.Tensor) else t, index)
            return _move(_move(x, CPU)[host], x.device)
        if func is torch.Tensor.contiguous and args[0].is_cuda:
            x = args[0]
            fmt = kwargs.get("memory_format", args[1] if len(args) > 1 else torch.contiguous_format)
            return x if x.is_contiguous(memory_format=fmt) else aten.clone.default(x, memory_format=fmt)
        if func is torch.Tensor.copy_ and args[0].is_cuda:
            return aten.copy_.default(args[0], _move(args[1], args[0].device, args[0].dtype))
        return func(*args, **kwargs)


def fake_as_deepspeed_leaves_it(model, mode: FakeTensorMode):
    """The model's tensors as fakes where ZeRO-3 leaves them: parameters on the device, buffers (and the teacher bank,
    outside DeepSpeed) on the host."""
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(_move(mode.from_tensor(p), CUDA), requires_grad=False)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = mode.from_tensor(b)
    for part in (model.teacher.A, model.teacher.B):
        for k, p in part.items():
            part[k] = torch.nn.Parameter(mode.from_tensor(p), requires_grad=False)
    model.teacher.keep(torch.float32, CPU, max_rows=2, staged=True)


def device_part_of_the_step(model, batch):
    """Instruction encoding, generator and teacher rows: ``TagiModel.forward`` up to the adapted forward."""
    adapters, states = model.generate(batch)
    teacher = model.teacher_adapters(batch, adapters)
    return adapters, states, teacher


@pytest.mark.parametrize("recipe", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("placed", [False, True])
def test_fake_cuda_step_crashes_without_place_and_runs_with_it(recipe, placed):
    model = tiny_model(recipe, rows=3, model={"adapter_impl": "torch"}).requires_grad_(False).eval()
    # Through TaskBatch.to, as the training loop moves it: the host copies of offsets and rows come with it.
    batch = make_batch(model.cfg.model.arch, counts=(2, 3), teacher_rows=[2, 0]).to(CPU)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode, FakeCudaOps(), torch.no_grad():
        fake_as_deepspeed_leaves_it(model, mode)
        for k, v in list(vars(batch).items()):
            if isinstance(v, torch.Tensor):
                setattr(batch, k, _move(mode.from_tensor(v), CUDA))
        if not placed:  # the 2026-12-04 code path: nothing moves the buffers
            with pytest.raises(FakeTensorDeviceMismatchError, match="cuda:0 and cpu") as crash:
                device_part_of_the_step(model, batch)
            # Where the H200 crashed: the generator's site indices (a host buffer) index its device embedding.
            frames = [(e.path.name, e.statement.lines) for e in crash.traceback]
            assert any(
                name == "generator.py" and any("site_embed(idx)" in ln for ln in lines) for name, lines in frames
            )
            return
        E.place(model, CUDA)
        adapters, states, teacher = device_part_of_the_step(model, batch)
    assert states.device == CUDA and states.shape[0] == 2
    assert adapters.factors.keys() == teacher.factors.keys() == {s.index for s in model.sites}
    for (a, b), (ta, tb), s in zip(adapters.factors.values(), teacher.factors.values(), model.sites):
        assert {a.device, b.device, ta.device, tb.device} == {CUDA}
        assert a.shape == (2, model.cfg.hypernet.rank, s.d_in) and ta.shape == (2, model.teacher.rank, s.d_in)
        assert tb.shape == (2, s.d_out, model.teacher.rank)
