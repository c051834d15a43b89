"""Shared by the benchmarks (train step, inference cost, LoRA kernel): device naming, result files, memory
probes, FLOP counting on CPU.

Result files: ``<out_dir>/<device-slug>_<YYYY-MM-DD>_<name>.{json,md}``, each written to a temp file in the
same folder and renamed, so a reader never sees half a file. The CPU's slug is ``cpu`` and every CPU result
says "CPU" in its title: CPU numbers check the harness and compare variants; they are not GPU numbers.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import torch

from tagi_ds.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str | None = None) -> str:
    """``NVIDIA H100 80GB HBM3`` on a GPU; ``cpu`` otherwise (the slug of CPU results). ``device`` ("cuda" or
    "cpu") is the device the benchmark ran on, for benchmarks that take ``--device``; default: the GPU if any."""
    return torch.cuda.get_device_name() if (device or device_kind()) == "cuda" else "cpu"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def device_label() -> str:
    """Human title: the GPU's name, or ``CPU (<model>, <n> threads)``."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({cpu_model()}, {threads_text()})"


def threads_text() -> str:
    n = torch.get_num_threads()
    return f"{n} torch thread{'' if n == 1 else 's'}"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def results_stem(out_dir: Path, name: str, date: str | None = None, device: str | None = None) -> Path:
    date = date or datetime.date.today().isoformat()
    return Path(out_dir) / f"{slug(device_name(device))}_{date}_{name}"


def write_atomic(path: Path, text: str) -> None:
    """Readers never see a half-written result (``tagi_ds.files.atomic_write``; the folder made first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def save_results(
    out_dir: Path, name: str, result: dict, table: str, device: str | None = None, default=None, quiet: bool = False
) -> Path:
    """``<device>_<date>_<name>.json`` (the result dict) and ``.md`` (the printed table), each atomically."""
    import json
    import sys

    stem = results_stem(out_dir, name, result["date"], device)
    write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=2, default=default) + "\n")
    write_atomic(stem.with_suffix(".md"), table)
    if not quiet:
        print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return stem


THREADS_HELP = (
    "CPU intra-op threads (default 1: on a shared host, a descheduled OpenMP thread stalls every "
    "parallel region of the others, which swings timings by 10x)"
)


def add_run_args(p, out_dir: Path | None = None) -> None:
    """Flags every benchmark has: --threads --seed --out_dir --tag --no_save."""
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--seed", type=int, default=0, help="random seed for inputs and weights")
    add_output_args(p, out_dir)


def add_output_args(p, out_dir: Path | None = None) -> None:
    """--out_dir --tag --no_save."""
    p.add_argument("--out_dir", type=Path, default=out_dir or RESULTS, help="where results files go")
    p.add_argument(
        "--tag",
        type=_tag,
        help="appended to the results file name (<device>_<date>_<name>_<tag>), so "
        "that runs of one day split across calls (one recipe each) keep separate files",
    )
    p.add_argument("--no_save", action="store_true", help="print the table only")


def _tag(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9.-]+", text):
        raise ValueError(text)  # argparse: "invalid _tag value"
    return text


_tag.__name__ = "tag"  # argparse's message: "invalid tag value: 'x y'"


def result_name(name: str, tag: str | None) -> str:
    return f"{name}_{tag}" if tag else name


def md_head(title: str, result: dict, cpu_note: str, gpu_note: str | None = None) -> list[str]:
    """A results table's first lines: ``# <title> — <device> — <date>``, then the CPU caveat on a CPU (or
    ``gpu_note`` on a GPU)."""
    note = cpu_note if result["device_kind"] == "cpu" else gpu_note
    return [f"# {title} — {result['device_label']} — {result['date']}", ""] + ([note, ""] if note else [])


def emit(args, name: str, result: dict, table: str, **save_kw) -> None:
    """Print the table; unless ``--no_save``, write ``<device>_<date>_<name>[_<tag>].{json,md}``."""
    print(table)
    if not args.no_save:
        save_results(args.out_dir, result_name(name, args.tag), result, table, **save_kw)


GPU_RECIPES = ["t5-xl", "t5-xxl", "llama-7b"]  # the paper-scale shapes a GPU run measures by default
CPU_RECIPES = ["tiny", "tiny-llama"]


def add_recipe_args(p, smoke_help: str, set_help: str = "config overrides for every recipe") -> None:
    """``--recipe`` (default by device), ``--set`` overrides (the launchers' rule: several keys per flag, the flag
    repeatable) and ``--smoke``: the model benchmarks' shared flags."""
    from tagi_ds.cli import add_set_flag
    from tagi_ds.recipes import RECIPES

    p.add_argument(
        "--recipe",
        nargs="+",
        choices=list(RECIPES),
        help=f"default: GPU {' '.join(GPU_RECIPES)}, CPU {' '.join(CPU_RECIPES)}",
    )
    add_set_flag(p, set_help)
    p.add_argument("--smoke", action="store_true", help=smoke_help)


def parse_run_args(p, argv: list[str] | None):
    """Parse; apply the CPU thread default; fill ``--recipe`` (``--smoke``: tiny; else by device).
    Returns ``(args, gpu)``."""
    a = p.parse_args(argv)
    gpu = default_threads(a)
    a.recipe = a.recipe or (["tiny"] if a.smoke else GPU_RECIPES if gpu else CPU_RECIPES)
    return a, gpu


def default_threads(args) -> bool:
    """Apply the CPU default of 1 thread; returns whether a GPU is present."""
    gpu = torch.cuda.is_available()
    if args.threads is None and not gpu:
        args.threads = 1
    return gpu


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for mod in ("transformers", "deepspeed", "peft", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001  (an optional package that fails to import: report why)
            out[mod] = f"n/a ({type(err).__name__})"
    return out


def host_load() -> list[float] | None:
    """1, 5, 15-minute load averages: on a shared CPU host, the context of every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def timing_stat() -> str:
    """The statistic reported for repeated timings: the median on a GPU; on a CPU, the minimum, the run least
    disturbed by other processes of a shared host (timeit's advice). Both go into the JSON."""
    return "median" if torch.cuda.is_available() else "min"


def summarize(seconds: list[float]) -> dict[str, float]:
    import statistics

    return {"median": statistics.median(seconds), "min": min(seconds), "reported": timing_stat()}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_memory() -> None:
    """Give freed memory back (between benchmark cases), so the next case's RSS baseline is honest."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:  # glibc keeps freed heap pages; without this, RSS deltas of later cases read low
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """Process resident-set-size high-water mark above the RSS at ``start()``, sampled every ``interval`` s
    by a thread (psutil): the CPU stand-in for ``torch.cuda.max_memory_allocated``. It includes the
    allocator's slack and everything else the process maps, and can miss spikes shorter than the interval."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def start(self) -> RssPeak:
        self.base = self.peak = self.proc.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        """Bytes above the starting RSS at the peak."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return self.peak - self.base


def live_tensors() -> list[torch.Tensor]:
    """Every tensor the garbage collector can see (parameters, optimizer state, DeepSpeed's flat buffers...)."""
    import gc

    return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta]


_CPU_SDPA_REGISTERED = False


def register_cpu_sdpa_flops() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels but not the CPU flash one (torch 2.13): give it the same
    formulas (forward 2 matmuls; backward 5 with the score recompute), so CPU counts include attention."""
    global _CPU_SDPA_REGISTERED
    if _CPU_SDPA_REGISTERED:
        return
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:
        fc.register_flop_formula(fwd)(lambda q, k, v, *args, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v))
    if bwd is not None and bwd not in fc.flop_registry:
        fc.register_flop_formula(bwd)(
            lambda g, q, k, v, *args, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v)
        )
    _CPU_SDPA_REGISTERED = True


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


# -- one process per case ---------------------------------------------------------------------------------------
# DeepSpeed keeps every ZeRO-3 engine alive after destroy() (tagi_ds.runtime.zero_release), and a fault inside a
# CUDA kernel is sticky: every later case of the same process would fail or run out of memory. So a benchmark's
# parent process runs each case as a fresh child (``script <argv> --_case JSON``), which writes its row to a file;
# a child that dies (OOM, a sticky CUDA error, its timeout) becomes a row saying so, and the next case still runs.
CASE_TIMEOUT = 1800  # seconds: a 7B build + teacher bank + steps on a GPU takes minutes, not half an hour


def add_case_args(p) -> None:
    """``--case_timeout`` and the hidden ``--_case`` (what a parent passes to its child)."""
    import argparse

    p.add_argument(
        "--case_timeout",
        nargs="+",
        type=_case_timeout,
        default=[("*", CASE_TIMEOUT)],
        metavar="[VARIANT=]SECONDS",
        help=f"seconds each case's own process may run (default {CASE_TIMEOUT}); VARIANT=SECONDS for one "
        "variant (e.g. lora=60 tagi=80: the check stage's plan); one past it becomes a row saying so",
    )
    p.add_argument("--_case", dest="case", help=argparse.SUPPRESS)


def _case_timeout(text: str) -> tuple[str, float]:
    import argparse

    key, _, secs = text.rpartition("=")
    value = float(secs)  # argparse: "invalid case_timeout value"
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--case_timeout must be > 0, got {secs}")
    return key or "*", value


_case_timeout.__name__ = "case_timeout"


def case_timeout(args, variant: str) -> float:
    """``--case_timeout``'s seconds for ``variant`` (its own entry, else the plain number, else the default)."""
    given = dict(args.case_timeout)
    return given.get(variant, given.get("*", CASE_TIMEOUT))


def run_child(script: str | Path, argv: list[str], case: dict, timeout: float) -> dict:
    """Run one case in a fresh Python: the child's row, or ``{"status": "failed: ..."}`` if it died. The child's
    output streams through (the parent's log shows each case as it runs)."""
    import json
    import subprocess
    import sys

    fd, row_file = tempfile.mkstemp(prefix="case_row.", suffix=".json")
    os.close(fd)
    try:
        cmd = [sys.executable, str(script), *argv, "--_case", json.dumps({**case, "row_file": row_file})]
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, stdout=sys.stderr, timeout=timeout, env=_world_of_one_env()).returncode
        except subprocess.TimeoutExpired:
            return {"status": f"failed: the case's process ran past --case_timeout {timeout:g}s"}
        text = Path(row_file).read_text()
        if rc == 0 and text:
            return json.loads(text)
        how = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
        return {
            "status": f"failed: the case's process died ({how}) after {time.perf_counter() - t0:.0f}s"
            + (" (its row was written)" if text else "")
        }
    finally:
        os.unlink(row_file)


def _world_of_one_env() -> dict[str, str]:
    """The parent's environment without the rendezvous variables its own ``dist.init`` set: every case is a world
    of one on a free port of its own (the parent's port is still held: EADDRINUSE)."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }


def write_row(case: dict, row: dict) -> None:
    """The child's side of :func:`run_child`."""
    import json

    write_atomic(Path(case["row_file"]), json.dumps(row, default=str))


class AdapterOps:
    """Which adapter op ran: counts what ``tagi_ds.ops.resolve_impl`` returned (``torch`` / ``triton``) while
    active, so a row never reports the torch reference's time as the kernel's. Measurement instrumentation only."""

    def __init__(self) -> None:
        import collections

        self.counts: collections.Counter = collections.Counter()

    def __enter__(self) -> AdapterOps:
        from tagi_ds import ops

        self._ops, self._orig = ops, getattr(ops, "resolve_impl", None)
        if self._orig is None:  # another checkout's tagi_ds (--code) without it: "unknown"
            self.counts["unknown"] += 1
            return self

        def counted(*args, **kwargs):
            impl = self._orig(*args, **kwargs)
            self.counts[impl] += 1
            return impl

        ops.resolve_impl = counted
        return self

    def __exit__(self, *exc) -> None:
        if self._orig is not None:
            self._ops.resolve_impl = self._orig

    def summary(self) -> str:
        """``triton``, ``torch``, ``none`` (no tagi_ds adapter: peft) or ``mixed (torch 3, triton 5)``."""
        if not self.counts:
            return "none"
        if len(self.counts) == 1:
            return next(iter(self.counts))
        return "mixed (" + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) + ")"
