"""Where a training step's time goes: torch.profiler over a few steps of one case (variant x engine), per engine.

For each engine (torch / z2 / z3 ... as in bench_train_step.py, one process, one device) and the one variant:
  - step time without the profiler (median on a GPU, min on a CPU; the profiler's own overhead excluded);
  - top operators by device time (GPU) and by host time (self CPU), per step;
  - device busy fraction: the GPU's summed kernel and copy time / the profiled steps' wall time (GPU; the union
    of their intervals when streams do not overlap);
    on a CPU there is no device to idle, so "n/a", and instead the share of the wall time spent inside aten ops
    (the rest is Python: modules, hooks, autograd functions, the optimizer's bookkeeping);
  - kernel launches per step (GPU; on a CPU: aten op calls per step, all nesting levels);
  - DeepSpeed ZeRO-3 fetches and releases per step: partitioned parameters all-gathered by the parameter
    coordinator (and in how many all-gather calls), and parameters released (partitioned again), counted by
    wrapping the coordinator's gather and release methods while the profiled steps run;
  - host reads of tensor values in one step (``.item() .tolist() int() float() bool()``), by source line: on a
    GPU each read of a CUDA tensor waits for the device (a sync); also, on a GPU, the syncs torch itself reports
    (``torch.cuda.set_sync_debug_mode("warn")``);
  - the attention implementation the backbone runs (``config._attn_implementation``) and the SDPA kernels seen,
    and where the frozen backbone lives under ZeRO-3 (replicated or partitioned);
  - the adapter op that ran (tagi_ds.ops.resolve_impl's answers in the host-read step; none: peft's layers).
  - build s (the case's model + engine build) and summary s (the profiler's post-processing: key_averages()
    parses every profiled event into Python, ~170k per step at t5-xl's layer count): the case's fixed costs,
    from which the profile stage's caps are sized.
Each engine runs in its own process (``--_case``, under ``--case_timeout``): DeepSpeed keeps ZeRO-3 engines alive
after destroy(), and a CUDA fault is sticky; the parent rewrites the result files after each engine.

    python benchmarks/profile_train_step.py --recipe t5-xl llama-7b --variant lora --engines torch z2 z3 z3+partitioned
    python benchmarks/profile_train_step.py --smoke --out_dir /tmp/r     # tiny shapes: checks the harness
Results: <out_dir>/<device-slug>_<YYYY-MM-DD>_profile_train_step[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train_step  # noqa: E402
import common  # noqa: E402
import engine_ratio  # noqa: E402

from tagi_ds import plan  # noqa: E402

TOP = 15  # operators per table
# Ops that wait for the device on CUDA, seen in the trace on any device: a tensor value read into Python or C++
# (item, int(), bool(): _local_scalar_dense) and boolean-mask indexing (its output size: nonzero).
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_recipe_args(
        p,
        "tiny recipe at tiny shapes, 1 profiled step: checks the harness",
        "config overrides (sizes: model.d_model=..., model.num_layers=...)",
    )
    p.add_argument(
        "--variant", default="lora", choices=bench_train_step.VARIANTS, help="the case profiled on every engine"
    )
    p.add_argument("--engines", nargs="+", choices=bench_train_step.ENGINES, default=["torch", "z2", "z3"])
    p.add_argument("--micro_batch", type=int, help="examples per step (default: GPU 4, CPU 8)")
    p.add_argument("--tasks", type=int, default=2, help="tasks per micro-batch")
    p.add_argument("--seq_len", type=int, help="input tokens (default: the recipe's data.max_source_length)")
    p.add_argument("--target_len", type=int, help="target tokens (default: data.max_target_length)")
    p.add_argument("--instr_len", type=int, help="instruction tokens (default: data.max_instruction_length)")
    p.add_argument("--teacher_rows", type=int, default=60, help="teacher bank rows")
    p.add_argument("--steps", type=int, help="timed and profiled steps (default GPU 3, CPU 3; smoke 1)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2; smoke 1)")
    p.add_argument(
        "--code",
        type=Path,
        help="another tagi-ds checkout to profile (its tagi_ds first on PYTHONPATH; "
        "its benchmarks/bench_train_step.py builds the cases): the 'before' of a before/after",
    )
    p.add_argument(
        "--deepspeed",
        type=Path,
        help="the ZeRO-3 JSON of the z3 engines (default: the recipe's, "
        "as a run uses: z3.json, z3_tiny.json for the tiny recipes)",
    )
    common.add_case_args(p)
    common.add_run_args(p)
    a, _ = common.parse_run_args(p, argv)
    for key in ("micro_batch", "tasks", "seq_len", "target_len", "instr_len", "steps", "teacher_rows"):
        v = getattr(a, key)
        if v is not None and v <= 0:
            p.error(f"--{key} must be > 0, got {v}")
    if a.smoke:
        a.micro_batch, a.seq_len, a.target_len, a.instr_len = (
            a.micro_batch or 4,
            a.seq_len or 32,
            a.target_len or 8,
            a.instr_len or 32,
        )
        a.steps, a.warmup = a.steps or 1, a.warmup if a.warmup is not None else 1
    a.micro_batch = a.micro_batch or (4 if torch.cuda.is_available() else 8)
    a.steps = a.steps or 3
    a.warmup = a.warmup if a.warmup is not None else 2
    if a.tasks > a.micro_batch:
        p.error(f"--tasks {a.tasks} > --micro_batch {a.micro_batch}: every task needs an example")
    return a


# -- counters -------------------------------------------------------------------------------------------------
class ZeroCounter:
    """Counts what DeepSpeed's ZeRO-3 parameter coordinator gathers and releases while active, by wrapping its
    (name-mangled, private) gather and release methods of deepspeed 0.19: a parameter counts as fetched when it was
    NOT_AVAILABLE as a gather began, and as released when it was AVAILABLE and in use by no module as a release
    began; and the parameters gathered outside it (``Init._all_gather``). Measurement instrumentation only; restored
    on exit."""

    def __init__(self) -> None:
        self.counts = collections.Counter()
        self._saved: list[tuple[type, str, object]] = []

    def __enter__(self) -> ZeroCounter:
        try:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
            from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as C
        except ImportError:
            return self
        counts = self.counts
        gather_name, release_name = (
            "_PartitionedParameterCoordinator__all_gather_params_",
            "_PartitionedParameterCoordinator__release_param",
        )
        gather, release = getattr(C, gather_name), getattr(C, release_name)

        def counted_gather(coord, params, forward, quantize=False):
            n = sum(1 for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE)
            if n:
                counts["all_gather_calls"] += 1
                counts["params_fetched"] += n
                counts["elements_fetched"] += sum(
                    p.ds_numel for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE
                )
            return gather(coord, params, forward, quantize)

        def counted_release(coord, param, free_data=True):
            if param.ds_status == ZeroParamStatus.AVAILABLE and not param.ds_active_sub_modules:
                counts["params_released"] += 1
            return release(coord, param, free_data)

        for name, fn in ((gather_name, counted_gather), (release_name, counted_release)):
            self._saved.append((C, name, getattr(C, name)))
            setattr(C, name, fn)
        # Gathers outside the coordinator: persistent parameters after each optimizer step (re-gathered from their
        # updated partitions), DeepSpeed's linear in backward.
        from deepspeed.runtime.zero.partition_parameters import Init

        direct = Init._all_gather

        def counted_direct(init, param_list, async_op=False, hierarchy=None):
            counts["params_fetched_outside_coordinator"] += sum(
                1 for p in param_list if p.ds_status == ZeroParamStatus.NOT_AVAILABLE
            )
            return direct(init, param_list, async_op=async_op, hierarchy=hierarchy)

        self._saved.append((Init, "_all_gather", direct))
        Init._all_gather = counted_direct
        for name in ("fetch_sub_module", "release_sub_module"):
            orig = getattr(C, name)
            self._saved.append((C, name, orig))
            setattr(C, name, self._count_calls(orig, name))
        return self

    def _count_calls(self, fn, key: str):
        counts = self.counts

        def wrapped(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        return wrapped

    def __exit__(self, *exc) -> None:
        for cls, name, fn in reversed(self._saved):
            setattr(cls, name, fn)


class HostReads(TorchFunctionMode):
    """Reads of tensor values into Python during a step, by the first source line outside torch and this file.

    On a GPU, a read of a CUDA tensor waits until the device has computed it: the host stops issuing work and
    the device drains. On a CPU nothing waits, but the same lines would sync on a GPU if their tensors lived there
    (``on_device`` counts the reads of tensors that were not on the CPU)."""

    READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__"}

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter = collections.Counter()
        self.total = self.on_device = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS and args and isinstance(args[0], torch.Tensor):
            self.total += 1
            self.on_device += args[0].device.type != "cpu"
            self.sites[_caller()] += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """``package/file.py:line (function)`` of the first frame outside torch and this script."""
    f = sys._getframe(2)
    here = Path(__file__).name
    while f is not None:
        path = f.f_code.co_filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith(here):
            for marker in ("/site-packages/", "/tagi_ds/", "/benchmarks/"):
                if marker in path:
                    short = path.split(marker, 1)[1]
                    path = ("tagi_ds/" if marker == "/tagi_ds/" else "") + short
                    break
            return f"{path}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return "?"


@contextlib.contextmanager
def cuda_sync_warnings(counter: list[int]):
    """GPU: count the syncs torch reports while active (``set_sync_debug_mode("warn")``); no-op on a CPU."""
    if not torch.cuda.is_available():
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counter.append(sum("synchroniz" in str(w.message) for w in caught))


# -- one case -------------------------------------------------------------------------------------------------
def attention_of(model: torch.nn.Module) -> str:
    backbone = getattr(model, "backbone", None)
    if backbone is None and hasattr(model, "peft"):
        backbone = model.peft.base_model.model
    return str(getattr(getattr(backbone, "config", None), "_attn_implementation", "unknown"))


def placement_of(model: torch.nn.Module) -> str:
    try:
        return bench_train_step.backbone_placement(model)
    except ImportError:  # a checkout from before train.frozen_backbone: ZeRO-3 always partitioned the backbone
        backbone = getattr(model, "backbone", model)
        return "partitioned" if any(hasattr(p, "ds_id") for p in backbone.parameters()) else "whole"


COPY_PREFIXES = ("Memcpy", "Memset")  # device copies and fills: counted apart from the kernels


def summarize_profile(prof, steps: int, wall_s: float) -> dict:
    """Per-step numbers from a profile of ``steps`` steps that took ``wall_s`` seconds, all from one
    ``key_averages()`` (the device kernels are its CUDA-typed keys: count = launches, device time = their
    durations); no walk of ``prof.events()``. Device busy is the kernels' and copies' summed time / wall: the union
    of their intervals when streams do not overlap (one stream; ZeRO-3 on one device has nothing to overlap), above
    it when they do."""
    from torch.autograd import DeviceType

    gpu = torch.cuda.is_available()
    avgs = prof.key_averages()
    out: dict = {"profiled_wall_ms_per_step": wall_s * 1e3 / steps}
    host = sorted((e for e in avgs if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    out["top_host"] = [
        {"op": e.key, "calls": e.count / steps, "self_cpu_ms": e.self_cpu_time_total / 1e3 / steps} for e in host[:TOP]
    ]
    aten = [e for e in avgs if e.key.startswith("aten::")]
    out["aten_calls_per_step"] = sum(e.count for e in aten) / steps
    out["aten_self_cpu_share"] = sum(e.self_cpu_time_total for e in aten) / 1e6 / wall_s
    out["sdpa_ops"] = sorted({e.key for e in avgs if "scaled_dot_product" in e.key or "flash_attention" in e.key})
    out["sync_ops"] = {e.key: e.count / steps for e in avgs if e.key in SYNC_OPS}
    if gpu:
        dev = sorted((e for e in avgs if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
        out["top_device"] = [
            {"op": e.key, "calls": e.count / steps, "device_ms": e.self_device_time_total / 1e3 / steps}
            for e in dev[:TOP]
        ]
        kernels = [e for e in avgs if e.device_type == DeviceType.CUDA]
        copies = [e for e in kernels if e.key.startswith(COPY_PREFIXES)]
        n_copies = sum(e.count for e in copies)
        out["kernel_launches_per_step"] = (sum(e.count for e in kernels) - n_copies) / steps
        out["copies_per_step"] = n_copies / steps
        device_us = sum(e.device_time_total for e in kernels)
        out["device_busy"] = device_us / 1e6 / wall_s
        out["device_ms_per_step"] = device_us / 1e3 / steps
    else:
        out["top_device"] = []
        out["kernel_launches_per_step"] = out["copies_per_step"] = out["device_busy"] = None
    return out


def profile_case(bench, args, recipe: str, variant: str, engine: str) -> dict:
    cfg = engine_ratio.case_config(bench, args, recipe, variant, engine)
    s = bench.shapes_for(args, cfg)
    row: dict = {"variant": variant, "engine": engine, "status": "ok"}
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    common.release_memory()
    torch.manual_seed(args.seed)
    cleanup = lambda: None  # noqa: E731
    try:
        t_build = time.perf_counter()
        model, step, cleanup = engine_ratio.build_case(
            bench, cfg, variant, engine, max(args.teacher_rows, args.tasks), args.deepspeed
        )
        batch = plan.synthetic_batch(
            cfg.model.arch, s, cfg.model.vocab_size, mode=cfg.mode, teacher=variant == "tagi", seed=args.seed
        ).to(dev)
        common.sync()
        row["build_s"] = time.perf_counter() - t_build  # the next stage budget's per-case fixed cost
        row.update(
            attention=attention_of(model),
            backbone=placement_of(model),
            zero3_linear_patched=torch.nn.functional.linear.__name__ == "zero3_linear_wrap",
        )
        for _ in range(args.warmup):
            step(batch)
        times = []
        for _ in range(args.steps):
            common.sync()
            t0 = time.perf_counter()
            step(batch)
            common.sync()
            times.append(time.perf_counter() - t0)
        stats = common.summarize(times)
        row.update(
            step_ms=stats[stats["reported"]] * 1e3, step_ms_median=stats["median"] * 1e3, step_ms_min=stats["min"] * 1e3
        )
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with ZeroCounter() as zc, profile(activities=activities) as prof:
            common.sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(batch)
            common.sync()
            wall = time.perf_counter() - t0
        t_sum = time.perf_counter()
        row.update(summarize_profile(prof, args.steps, wall))
        row["summary_s"] = time.perf_counter() - t_sum  # the profiler's post-processing: part of the case's budget
        row["zero3"] = {k: v / args.steps for k, v in sorted(zc.counts.items())}
        reads, synced = HostReads(), []
        with cuda_sync_warnings(synced), reads, common.AdapterOps() as ops:
            step(batch)
            common.sync()
        row["adapter_op"] = ops.summary()
        row["host_reads"] = {
            "total": reads.total,
            "on_device": reads.on_device,
            "sites": dict(reads.sites.most_common()),
        }
        row["cuda_sync_warnings"] = synced[0] if synced else None
    except Exception as err:  # noqa: BLE001  (a case that cannot run here is reported, the others still run)
        row["status"] = f"skipped: {type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err) else ''}"
        print(f"  {recipe} {variant} {engine}: {row['status']}", file=sys.stderr, flush=True)
        return row
    finally:
        try:
            cleanup()
        finally:
            model = step = batch = None  # noqa: F841
            common.release_memory()
    z = row["zero3"]
    print(
        f"  {recipe} {variant} {engine}: {row['step_ms']:.1f} ms/step, {row['aten_calls_per_step']:.0f} aten "
        f"calls, {z.get('params_fetched', 0):.0f} ZeRO-3 fetches, {z.get('params_released', 0):.0f} releases, "
        f"{row['host_reads']['total']} host reads per step; build {row['build_s']:.1f} s, summary "
        f"{row['summary_s']:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return row


# -- output ---------------------------------------------------------------------------------------------------
def _f(v, fmt: str = "{:.1f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def to_markdown(result: dict) -> str:
    cpu = result["device_kind"] == "cpu"
    lines = common.md_head(
        "Train step profile",
        result,
        "**CPU results**: tiny shapes on a CPU; they show host-side work (Python, hooks, op dispatch) and the "
        "ZeRO-3 and host-read counts, which do not depend on the device; device busy fraction and kernel launches "
        f"need a GPU (n/a here). {common.threads_text()}; host load average {result['host_load_start']} at the "
        f"start, {result['host_load_end']} at the end (a shared host: timings are noisy).",
    )
    v = result["versions"]
    lines += [
        f"torch {v['torch']}, deepspeed {v['deepspeed']}, transformers {v['transformers']}; case "
        f"{result['variant']}; {result['steps']} profiled steps after {result['warmup']} warm-up; step ms "
        f'without the profiler ({common.timing_stat()}); "x torch": step time over the torch engine\'s; '
        f"ZeRO-3 JSON: {result['z3_json']}; code: {result.get('code', 'this checkout')}.",
        "",
    ]
    if result.get("partial"):
        lines += ["**Partial**: written after each finished engine; the run stopped before the last one.", ""]
    if cpu:
        lines += [
            'Device busy: n/a on a CPU. "aten share of wall": self CPU time inside aten ops / step wall time '
            "under the profiler; the rest is Python (modules, hooks, autograd functions, optimizer).",
            "",
        ]
    for rec in result["recipes"]:
        lines += _recipe_markdown(rec)
    return "\n".join(lines) + "\n"


def _recipe_markdown(rec: dict) -> list[str]:
    sh = rec["shapes"]
    lines = [
        f"## {rec['recipe']}{' ' + ' '.join(rec['overrides']) if rec['overrides'] else ''}",
        "",
        f"B={sh['micro_batch']} / K={sh['tasks']}, input {sh['seq_len']}, target {sh['target_len']}, "
        f"instruction {sh['instr_len']}",
        "",
    ]
    head = (
        "| engine | backbone | attention | op | step ms | x torch | device busy | kernels/step | aten calls/step | "
        "aten share of wall | ZeRO-3 fetched/step | all-gathers/step | released/step | host reads/step | "
        "sync ops/step | build s | summary s |"
    )
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    ok = [r for r in rec["rows"] if r["status"] == "ok"]
    base = next((r for r in ok if r["engine"] == "torch"), None)
    for r in rec["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['engine']} | {r['status']} |" + " |" * (head.count("|") - 3))
            continue
        z = r["zero3"]
        busy = None if r["device_busy"] is None else 100 * r["device_busy"]
        hr = f"{r['host_reads']['total']}" + (
            f" ({r['cuda_sync_warnings']} sync warnings)" if r["cuda_sync_warnings"] is not None else ""
        )
        lines.append(
            f"| {r['engine']} | {r['backbone']} | {r['attention']} | {r.get('adapter_op', '—')} | "
            f"{r['step_ms']:.1f} | "
            f"{_f(r['step_ms'] / base['step_ms'] if base else None, '{:.2f}')} | {_f(busy, '{:.1f}%')} | "
            f"{_f(r['kernel_launches_per_step'], '{:.0f}')} | {r['aten_calls_per_step']:.0f} | "
            f"{100 * r['aten_self_cpu_share']:.0f}% | "
            f"{z.get('params_fetched', 0) + z.get('params_fetched_outside_coordinator', 0):.0f} | "
            f"{z.get('all_gather_calls', 0):.0f} | {z.get('params_released', 0):.0f} | {hr} | "
            f"{sum(r['sync_ops'].values()):g} | {_f(r.get('build_s'))} | {_f(r.get('summary_s'))} |"
        )
    lines.append("")
    for r in ok:
        syncs = ", ".join(f"{k} {v:g}" for k, v in r["sync_ops"].items()) or "none"
        zero = ", ".join(f"{k} {v:g}" for k, v in r["zero3"].items()) or "none (no ZeRO-3 parameters)"
        lines += [
            f"### {rec['recipe']}, {r['engine']}",
            "",
            f"Ops that sync on CUDA, per step: {syncs}; SDPA ops seen: {', '.join(r['sdpa_ops']) or 'none'}; "
            f"F.linear replaced by DeepSpeed's zero3_linear_wrap: {'yes' if r['zero3_linear_patched'] else 'no'}"
            f"; ZeRO-3 counters per step: {zero}",
            "",
        ]
        if r["top_device"]:
            lines += ["| top by device time | calls/step | device ms/step |", "|---|---|---|"]
            lines += [f"| `{o['op'][:90]}` | {o['calls']:g} | {o['device_ms']:.3f} |" for o in r["top_device"]]
            lines.append("")
        lines += ["| top by host (self CPU) time | calls/step | self CPU ms/step |", "|---|---|---|"]
        lines += [f"| `{o['op'][:90]}` | {o['calls']:g} | {o['self_cpu_ms']:.3f} |" for o in r["top_host"]]
        lines += ["", "| host reads of tensor values (one step), by source line | reads |", "|---|---|"]
        lines += [f"| `{site}` | {n} |" for site, n in r["host_reads"]["sites"].items()] or ["| none | 0 |"]
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench, code = engine_ratio.load_bench(args.code)
    if args.case:  # a child: one engine's profile, its row to the parent's file
        import json

        case = json.loads(args.case)
        return common.write_row(case, profile_case(bench, args, case["recipe"], args.variant, case["engine"]))
    ds_ok, why = bench.deepspeed_usable()
    result = {
        "benchmark": "profile_train_step",
        "device": common.device_name(),
        "device_kind": common.device_kind(),
        "device_label": common.device_label(),
        "date": datetime.date.today().isoformat(),
        "versions": common.versions(),
        "variant": args.variant,
        "steps": args.steps,
        "warmup": args.warmup,
        "smoke": args.smoke,
        "cpu_threads": torch.get_num_threads(),
        "host_load_start": common.host_load(),
        "recipes": [],
        "code": code,
        "z3_json": str(args.deepspeed) if args.deepspeed else "the recipe's (z3.json; tiny: z3_tiny.json)",
    }
    if args.code and "z3_json" not in engine_ratio.inspect.signature(bench.build_case).parameters:
        result["z3_json"] = "ds_configs/z3.json (that checkout's benchmark takes no other)"
    for recipe in args.recipe:
        print(f"{recipe} {args.variant}:", file=sys.stderr, flush=True)
        cfg = engine_ratio.case_config(bench, args, recipe, args.variant, "z3")
        rec = {"recipe": recipe, "overrides": args.overrides, "shapes": vars(bench.shapes_for(args, cfg)), "rows": []}
        result["recipes"].append(rec)
        for engine in args.engines:
            if engine != "torch" and not ds_ok:
                rec["rows"].append(
                    {"variant": args.variant, "engine": engine, "status": f"skipped: DeepSpeed could not start ({why})"}
                )
                continue
            # Each engine in its own process (common.run_child): ZeRO-3 engines outlive destroy(), CUDA faults stick.
            row = common.run_child(
                __file__, args.argv, {"recipe": recipe, "engine": engine}, common.case_timeout(args, args.variant)
            )
            rec["rows"].append({"variant": args.variant, "engine": engine, **row})
            if row["status"].startswith("failed"):
                print(f"  {recipe} {args.variant} {engine}: {row['status']}", file=sys.stderr, flush=True)
            if not args.no_save:  # finished engines on disk as they come (a GPU call can be cut short)
                partial = {**result, "host_load_end": common.host_load(), "partial": True}
                common.save_results(
                    args.out_dir,
                    common.result_name("profile_train_step", args.tag),
                    partial,
                    to_markdown(partial),
                    default=str,
                    quiet=True,
                )
    result["host_load_end"] = common.host_load()
    common.emit(args, "profile_train_step", result, to_markdown(result), default=str)
    return result


if __name__ == "__main__":
    main()
