"""Print a comparison table from evaluation dirs: ``python -m tagi_ds.eval.table NAME=DIR ...``.

Reads each ``DIR/results.json`` (written by launchers/evaluate.py) and prints ROUGE-L, exact match,
counted inference FLOPs and wall time, with FLOPs relative to the first row that is named ``concat``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from tagi_ds import stages


def load(spec: str) -> tuple[str, dict]:
    name, _, path = spec.partition("=")
    if not path:
        name, path = Path(spec).name, spec
    f = Path(path) / "results.json"
    try:
        return name, json.loads(f.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as err:
        raise SystemExit(f"error: {f}: cannot read evaluation results ({err})") from None


def build(rows: list[tuple[str, dict]]) -> Table:
    concat = next((r for n, r in rows if n == stages.COST_REFERENCE), None)
    base = (concat or {}).get("cost", {}).get("flops")
    table = Table(title="held-out tasks")
    for col in ("run", "ROUGE-L", "exact match", "examples", "GFLOPs", "FLOPs / concat", "wall s"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in rows:
        cost = r.get("cost", {})
        flops = cost.get("flops")
        table.add_row(
            name,
            f"{r['rougeL']:.1f}",
            f"{r['exact_match']:.1f}",
            str(r.get("num_examples", "")),
            f"{flops / 1e9:.2f}" if flops else "-",
            f"{flops / base:.2f}x" if flops and base else "-",
            f"{cost['wall_s']:.1f}" if "wall_s" in cost else "-",
        )
    return table


def show(table: Table, console: Console) -> None:
    """Print ``table`` at its natural width, also where the console is narrower (a pipe or a log file: 80
    columns). Squeezed to fit, rich cuts the run labels and numbers ("no_instru…", "1230…"), which then
    read as other runs or other values; a wide line that wraps in a narrow terminal hides nothing."""
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    console.width = max(console.width, natural)
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    specs = argv if argv is not None else sys.argv[1:]
    if not specs:
        raise SystemExit("usage: python -m tagi_ds.eval.table NAME=EVAL_DIR [NAME=EVAL_DIR ...]")
    show(build([load(s) for s in specs]), Console())


if __name__ == "__main__":
    main()
