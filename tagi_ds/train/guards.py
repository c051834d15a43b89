"""Guards: non-finite steps, consecutive-failure stop, and stop-and-save on a signal.

Every decision is taken by all ranks together (``dist.any_rank``), so no rank skips a collective
that another rank enters.
"""

from __future__ import annotations

import math
import signal

import torch

from tagi_ds.train import dist


class TooManyBadSteps(RuntimeError):
    pass


class Guards:
    def __init__(self, max_bad_steps: int, inject_fault: str = "") -> None:
        self.max_bad = max_bad_steps
        self.skipped = 0
        self.in_a_row = 0
        self._signalled: int | None = None
        self.fault = _parse_fault(inject_fault)
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._signalled = signum

    def inject(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self.fault and self.fault[1] == step and self.fault[2] == dist.rank():
            if self.fault[0] == "raise":
                raise RuntimeError(f"injected fault at step {step} on rank {dist.rank()} (train.inject_fault)")
            return loss * float("nan")
        return loss

    def loss_is_bad(self, loss: torch.Tensor, step: int) -> bool:
        mine = not bool(torch.isfinite(loss.detach()).all())
        bad = dist.any_rank(mine)
        if bad:  # every rank says so: the log shows that all ranks skipped the same step
            print(f"[rank {dist.rank()}] non-finite loss at step {step + 1} (here: {mine}): step skipped on all ranks",
                  flush=True)
        return bad

    def record(self, bad: bool, step: int) -> None:
        if not bad:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_bad:
            raise TooManyBadSteps(f"{self.in_a_row} non-finite steps in a row (last: step {step}); "
                                  f"stopping (train.max_bad_steps={self.max_bad})")

    @staticmethod
    def grad_norm_is_bad(norm) -> bool:
        return norm is not None and not math.isfinite(float(norm))

    def stop_requested(self) -> bool:
        return dist.any_rank(self._signalled is not None)


def _parse_fault(spec: str):
    if not spec:
        return None
    try:
        kind, rest = spec.split("@")
        step, rank = rest.split(":")
        if kind not in ("nan", "raise"):
            raise ValueError
        return kind, int(step), int(rank)
    except ValueError as err:
        raise ValueError(f"train.inject_fault must look like nan@STEP:RANK or raise@STEP:RANK, got {spec!r}") from err
