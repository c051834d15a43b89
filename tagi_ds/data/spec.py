"""``--data SPEC`` -> tasks: ``builtin`` | ``sni:DIR`` | ``p3:DIR`` | ``text:FILE_OR_DIR``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from tagi_ds.config import DataConfig, Granularity
from tagi_ds.data.builtin import builtin_suite
from tagi_ds.data.builtin_v2 import builtin_suite_v2
from tagi_ds.data.p3 import load_p3
from tagi_ds.data.sni import load_sni
from tagi_ds.data.task import DataError, Task, select_tasks

SCHEMES = ("builtin", "sni", "p3", "text")
USAGE = "builtin | sni:DIR | p3:DIR | text:FILE_OR_DIR"


@dataclass(frozen=True)
class DataSpec:
    scheme: str  # builtin | sni | p3 | text
    path: Path | None = None  # None for builtin

    def __str__(self) -> str:
        return self.scheme if self.path is None else f"{self.scheme}:{self.path}"


def parse_spec(spec: str | DataSpec) -> DataSpec:
    """Parse and check a data spec; an unknown scheme or a missing path raises DataError."""
    if isinstance(spec, DataSpec):
        return spec
    if spec == "builtin":
        return DataSpec("builtin")
    scheme, sep, rest = spec.partition(":")
    if scheme not in SCHEMES or scheme == "builtin" or not sep:
        raise DataError(f"data spec {spec!r}: unknown scheme {scheme!r}; expected {USAGE}")
    if not rest:
        raise DataError(f"data spec {spec!r}: missing the path after '{scheme}:'")
    path = Path(rest).expanduser()
    if not path.exists():
        raise DataError(f"data spec {spec!r}: {path} does not exist")
    if scheme in ("sni", "p3") and not path.is_dir():
        raise DataError(f"data spec {spec!r}: {path} is not a directory")
    return DataSpec(scheme, path)


def load_tasks(spec: str | DataSpec, cfg: DataConfig, split: str) -> list[Task]:
    """The tasks of ``split`` (train | test, or dev for the built-in suite) of a task source, after ``cfg``'s
    filters (setting-independent: prompts are formatted later)."""
    spec = parse_spec(spec)
    if split not in ("train", "dev", "test"):
        raise DataError(f"data spec {spec}: split must be train, dev or test, got {split!r}")
    if split == "dev" and spec.scheme != "builtin":
        raise DataError(
            f"data spec {spec}: split dev exists only for the built-in suite; for {spec.scheme} hold "
            f"training tasks out with data.exclude_tasks and evaluate them with --split train "
            f"--set data.tasks=..."
        )
    if spec.scheme == "builtin":
        suite = builtin_suite_v2 if cfg.builtin_suite == "v2" else builtin_suite
        return select_tasks(
            suite(cfg.builtin_seed)[split],
            categories=cfg.categories,
            names=cfg.tasks,
            exclude=cfg.exclude_tasks,
            max_instances=cfg.max_instances_per_task,
            where="builtin",
        )
    if spec.scheme == "sni":
        return load_sni(spec.path, cfg, split)
    if spec.scheme == "p3":
        return load_p3(spec.path, cfg, split)
    raise DataError(
        f"data spec {spec}: text: is a pretraining corpus (stage pretrain); tasks need builtin | sni:DIR | p3:DIR"
    )


def corpus_source(cfg: DataConfig) -> Path | None:
    """Stage-1 corpus: ``data.corpus`` if set, else ``data.spec`` when it is ``text:``; None = built-in."""
    spec = parse_spec(cfg.corpus or (cfg.spec if cfg.spec.startswith("text:") else "builtin"))
    if spec.scheme not in ("text", "builtin"):
        raise DataError(f"data.corpus {str(spec)!r}: expected builtin or text:FILE_OR_DIR")
    return spec.path


def teacher_rows(tasks: Sequence[Task], granularity: str = "task") -> dict[str, int]:
    """Teacher-bank rows: one per task name (granularity ``task``) or per category, in sorted order."""
    if granularity not in get_args(Granularity):
        raise DataError(f"teacher.granularity must be {' or '.join(get_args(Granularity))}, got {granularity!r}")
    keys = sorted({t.name if granularity == "task" else t.category for t in tasks})
    return {k: i for i, k in enumerate(keys)}
