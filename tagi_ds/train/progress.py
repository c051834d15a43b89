"""Progress and logs: a rich bar on a TTY, plain rank-0 lines otherwise, metrics.jsonl always.

Only rank 0 prints or writes. ``metrics.jsonl`` gets one strict JSON object per logged step (a non-finite
number is ``null``: a skipped step's loss, a skipped update's gradient norm); on resume the lines past the
restored step are dropped so the file reads as one uninterrupted run, and a line cut short by a kill is
dropped too.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tagi_ds.files import atomic_write
from tagi_ds.runtime import dist


class Progress:
    def __init__(self, output_dir: Path, stage: str, total: int, start: int, tensorboard: bool = False) -> None:
        self.main = dist.is_main()
        self.total, self.start_step = total, start
        self.metrics_path = output_dir / "metrics.jsonl"
        self.t0 = time.perf_counter()
        self.bar = self.task = self.tb = None
        if not self.main:
            return
        self._truncate_after(start)
        self.file = self.metrics_path.open("a", encoding="utf-8")
        if sys.stdout.isatty():
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn(f"[bold]{stage}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task(stage, total=total, completed=start, info="")
            self.bar.start()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Keep the lines up to ``step`` (a resume rewrites the rest); drop a damaged line (a kill mid-write
        cuts the last one short); rewrite what is kept as strict JSON (older runs wrote bare NaN)."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = [
            json.dumps(strict(rec), allow_nan=False)
            for ln in lines
            if (rec := _parse(ln)) is not None and rec.get("step", 0) <= step
        ]
        atomic_write(self.metrics_path, "".join(ln + "\n" for ln in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        record = strict(record)
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        step = record["step"]
        done = step - self.start_step
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
        loss = "skipped" if record.get("loss") is None else f"{record['loss']:.4f}"
        info = f"loss {loss} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s"
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":  # None (non-finite) is left out
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            print(
                f"[step {step}/{self.total}] {info} eta {eta:.0f}s"
                + (f" skipped {record['skipped_steps']}" if record.get("skipped_steps") else ""),
                flush=True,
            )

    def message(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.stop()
        if self.tb is not None:
            self.tb.close()
        self.file.close()


def strict(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with every non-finite float as None (``null``): metrics.jsonl is strict JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _parse(line: str) -> dict[str, Any] | None:
    """A metrics line as a dict; None for a blank or damaged line (a kill mid-write cuts the last one)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None
