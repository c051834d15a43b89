"""Drop DeepSpeed's process-global references to finished ZeRO-3 engines, so that several engines built one after
another in one process (benchmarks, tests) do not pile up their models.

DeepSpeed 0.19.8 keeps every ZeRO-3 model alive after ``engine.destroy()`` through two globals:

- ``deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK``: ``DeepSpeedZeRoOffload.__init__`` appends the top
  module and never pops it (sub-modules are pushed and popped around each forward);
- ``PartitionedParameterCoordinator.__params_to_release`` (name-mangled) carries a ``functools.lru_cache`` on the
  class, keyed by the coordinator and a sub-module: from the second step on it holds the coordinator (and through it
  the optimizer) and every sub-module (upstream DeepSpeed #7204).

Both are private names: each is looked up with ``getattr`` and skipped when absent (another DeepSpeed version), and
``release()`` says what it cleared. The cache is a pure function of the trace: clearing it for all coordinators only
makes live engines recompute their sets once.
"""

from __future__ import annotations

import sys

from torch import nn

_CACHED = "_PartitionedParameterCoordinator__params_to_release"


def _lru_cache_of(fn):
    """The ``functools.lru_cache`` wrapper under ``fn`` (DeepSpeed wraps it in ``instrument_w_nvtx``, a closure), or
    None."""
    seen = set()
    todo = [fn]
    while todo:
        f = todo.pop()
        if f is None or id(f) in seen:
            continue
        seen.add(id(f))
        if callable(getattr(f, "cache_clear", None)):
            return f
        todo.append(getattr(f, "__wrapped__", None))
        todo += [c.cell_contents for c in (getattr(f, "__closure__", None) or ()) if _filled(c)]
    return None


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018  (an empty cell raises)
    except ValueError:
        return False
    return True


def release(module: nn.Module | None = None) -> dict[str, int]:
    """Forget finished ZeRO-3 engines: remove ``module`` and its sub-modules from ``FWD_MODULE_STACK`` (every entry
    when ``module`` is None: no ZeRO-3 forward may be running then), and clear the coordinator's release cache.
    Call it after ``engine.destroy()``. Returns what was cleared (``{"fwd_module_stack": n, "params_to_release":
    cached entries}``); a name this DeepSpeed lacks counts -1. A no-op when DeepSpeed was never imported."""
    out = {"fwd_module_stack": -1, "params_to_release": -1}
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    stack = getattr(offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        mine = {id(m) for m in module.modules()} if module is not None else None
        keep = [m for m in stack if mine is not None and id(m) not in mine]
        out["fwd_module_stack"] = len(stack) - len(keep)
        stack[:] = keep  # in place: DeepSpeed's hooks read the module's global by name
    coord = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    cls = getattr(coord, "PartitionedParameterCoordinator", None)
    cache = _lru_cache_of(getattr(cls, _CACHED, None))
    if cache is not None:
        out["params_to_release"] = cache.cache_info().currsize
        cache.cache_clear()
    return out
