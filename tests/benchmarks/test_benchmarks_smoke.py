"""The train-step, inference-cost and plan-memory benchmarks run end to end at tiny shapes and write their result
files."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# Several times the idle run (tens of seconds) for a loaded 2-core host, and below pytest's own 600 s timeout, so a
# slow run still ends with this file's message and output, not a bare kill (issue 29: load is not a failure).
TIMEOUT = 540


def run_bench(script: str, out_dir: Path, *args: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the adapter op's torch reference on CPU, as in training
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out_dir", str(out_dir), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def written(out_dir: Path, name: str) -> tuple[dict, str]:
    """The two result files ``<device-slug>_<today>_<name>.{json,md}`` and nothing else (no temp files)."""
    names = sorted(p.name for p in out_dir.iterdir())
    (js,) = [n for n in names if n.endswith(f"_{datetime.date.today().isoformat()}_{name}.json")]
    stem = js.removesuffix(".json")
    assert names == [f"{stem}.json", f"{stem}.md"], names
    return json.loads((out_dir / js).read_text()), (out_dir / f"{stem}.md").read_text()


def check_train_step(result: dict, md: str, stdout: str, recipe: str = "tiny") -> None:
    """What bench_train_step.py's result files must hold after ``--smoke --variants lora tagi --engines z3 torch``.
    The run itself is the profile stage's SMOKE (tests/scripts/test_gpu_session.py runs the same script with
    those flags: one run of its three cases serves both checks, issue 29)."""
    assert result["benchmark"] == "train_step" and result["smoke"] is True and "partial" not in result
    (rec,) = result["recipes"]
    assert rec["recipe"] == recipe
    rows = {(r["variant"], r["engine"], r["checkpointing"]): r for r in rec["rows"]}
    engine = rec["default_engine"]
    assert engine == "z3" and list(rows) == [("lora", "z3", False), ("tagi", "z3", False), ("tagi", "torch", False)]
    for r in rec["rows"]:
        assert r["status"] == "ok" and r["adapter_op"] == "torch", r  # CPU: the torch reference op, and said
        assert r["build_s"] > 0, r  # every row: the per-case build cost the GPU stages' caps come from
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["peak_bytes"] >= 0 and r["tracked_bytes"] > 0
        assert r["tflops"] == pytest.approx(r["model_flops"] / (r["step_ms"] / 1e3) / 1e12)
    lora, tagi = rows[("lora", engine, False)], rows[("tagi", engine, False)]
    assert lora["speed_vs_lora"] == 1.0 and lora["flops_vs_lora"] == 1.0 and lora["time_per_flop_vs_lora"] == 1.0
    assert tagi["model_flops"] > lora["model_flops"]  # instruction encoding, generator, teacher forward
    assert tagi["flops_vs_lora"] == pytest.approx(tagi["model_flops"] / lora["model_flops"])
    assert tagi["time_per_flop_vs_lora"] == pytest.approx((tagi["step_ms"] / lora["step_ms"]) / tagi["flops_vs_lora"])
    assert "FLOPs x lora" in md and "s/FLOP x lora" in md and "| build s |" in md
    if result["device_kind"] == "cpu":
        assert "CPU" in md.splitlines()[0] and "CPU results" in md and "RSS" in md
        assert result["peak_tflops"] is None and tagi["mfu"] is None
    assert "4N" in md and md.splitlines()[-1] in stdout and "| op |" in md


def test_the_teacher_terms_are_counted_in_the_tagi_case_and_not_in_tagi_nokl():
    """The FLOPs each benchmark case reports (the arithmetic it runs, without running it: the planner's counts
    are held to torch's FLOP counter in tests/plan/test_plan.py): tagi > tagi_nokl (no teacher forward) > lora."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_train_step as bench
    finally:
        sys.path.pop(0)
    args = bench.parse_args(["--smoke"])
    flops = {
        v: bench.case_flops(args, bench.case_config(args, "tiny", v, False, "z3"), v, False)["model"]
        for v in ("tagi", "tagi_nokl", "lora")
    }
    assert flops["tagi"] > flops["tagi_nokl"] > flops["lora"]


def test_a_case_whose_process_dies_is_a_row_and_the_next_case_still_runs(tmp_path):
    """One process per case: the lora case's process is killed by its --case_timeout (as a sticky CUDA error or an
    OOM kills one on a GPU); the row says so and the tagi case after it is measured."""
    run_bench(
        "bench_train_step.py",
        tmp_path,
        "--variants",
        "lora",
        "tagi",
        "--engines",
        "torch",
        "--no_checkpointing_table",
        "--case_timeout",
        "lora=0.5",
        "300",
    )
    result, md = written(tmp_path, "train_step")
    lora, tagi = result["recipes"][0]["rows"]
    assert (lora["variant"], tagi["variant"]) == ("lora", "tagi")
    assert lora["status"] == "failed: the case's process ran past --case_timeout 0.5s", lora
    assert tagi["status"] == "ok" and tagi["step_ms"] > 0 and tagi["speed_vs_lora"] is None  # no baseline
    assert "failed: the case's process ran past" in md


def test_the_torch_engine_casts_parameters_not_buffers():
    """bf16 parameters, but RoPE's inv_freq stays fp32 (``model.to(dtype)`` cast it: positions broke)."""
    import torch

    from tagi_ds.runtime.engine import cast_parameters

    assert 'runner="torch"' in (ROOT / "benchmarks" / "bench_train_step.py").read_text()  # the assembly's torch run:
    assert "E.cast_parameters(" in (ROOT / "tagi_ds" / "assembly.py").read_text()
    m = torch.nn.Linear(4, 4)
    m.register_buffer("inv_freq", torch.ones(2), persistent=False)
    m.register_buffer("ids", torch.arange(3))
    cast_parameters(m, torch.bfloat16)  # what the benchmark's torch engine calls
    assert m.weight.dtype == m.bias.dtype == torch.bfloat16
    assert m.inv_freq.dtype == torch.float32 and m.ids.dtype == torch.int64


def test_bench_inference_cost_smoke(tmp_path):
    run_bench("bench_inference_cost.py", tmp_path)
    result, md = written(tmp_path, "inference_cost")
    assert result["benchmark"] == "inference_cost" and "teacher-forced" in result["decoding"]
    (rec,) = result["measured"]
    assert [r["instr_len"] for r in rec["rows"]] == [64, 128]
    for r in rec["rows"]:
        assert r["tagi_flops"] > 0 and r["concat_flops"] > 0 and r["tagi_ms"] > 0 and r["concat_ms"] > 0
        # The counted FLOPs (FlopCounterMode) agree with the planner's formulas at these shapes.
        assert r["flops_ratio"] == pytest.approx(r["formula_ratio"], rel=0.01)
    a, b = rec["rows"]
    assert b["flops_ratio"] < a["flops_ratio"] < 1.0  # a longer instruction: TAGI saves more
    assert set(result["analytic"]) == {"t5-base", "t5-xl", "t5-xxl", "llama-7b"}
    if result["device_kind"] == "cpu":
        assert "CPU" in md.splitlines()[0] and "analytic" in md


def test_bench_plan_memory_smoke(tmp_path):
    proc = run_bench("bench_plan_memory.py", tmp_path)
    result, md = written(tmp_path, "plan_memory")
    assert result["benchmark"] == "plan_memory" and result["smoke"] is True
    (row,) = result["rows"]
    assert row["status"] == "ok" and row["recipe"] == "tiny" and not row["checkpointing"]
    assert row["ratio"] == pytest.approx(row["predicted"]["total"] / row["measured"]["peak"])
    assert 0.9 <= row["ratio"] <= 1.1  # the planner's target, here at smoke shapes
    lines = md.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| recipe |"))
    assert lines[at].count("|") == lines[at + 1].count("|") == lines[at + 2].count("|")
    assert md.splitlines()[-1] in proc.stdout


@pytest.mark.parametrize(
    "script, flag",
    [
        ("bench_train_step", "--micro_batch"),
        ("bench_train_step", "--steps"),
        ("bench_train_step", "--case_timeout"),
        ("bench_plan_memory", "--micro_batch"),
        ("bench_plan_memory", "--seq_len"),
    ],
)
def test_zero_sizes_are_refused_even_with_smoke_defaults(script, flag, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    mod = __import__(script)
    with pytest.raises(SystemExit):
        mod.parse_args(["--smoke", flag, "0"])
    assert f"{flag} must be > 0, got 0" in capsys.readouterr().err


# -- profile_train_step's summary ------------------------------------------------------------------------------
def _summary_from_events(prof, steps: int, wall_s: float) -> dict:
    """The summary as profile_train_step computed it before issue 27 (key_averages for the host side, then walks of
    ``prof.events()`` for the kernels and the union of their intervals): the reference the key_averages-only
    summary must agree with."""
    import torch
    from torch.autograd import DeviceType

    top, sync_ops = 15, ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")

    def union_us(intervals):
        total, end = 0.0, float("-inf")
        for a, b in sorted(intervals):
            if b <= end:
                continue
            total += b - max(a, end)
            end = b
        return total

    avgs = prof.key_averages()
    out = {"profiled_wall_ms_per_step": wall_s * 1e3 / steps}
    host = sorted((e for e in avgs if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    out["top_host"] = [
        {"op": e.key, "calls": e.count / steps, "self_cpu_ms": e.self_cpu_time_total / 1e3 / steps} for e in host[:top]
    ]
    aten = [e for e in avgs if e.key.startswith("aten::")]
    out["aten_calls_per_step"] = sum(e.count for e in aten) / steps
    out["aten_self_cpu_share"] = sum(e.self_cpu_time_total for e in aten) / 1e6 / wall_s
    out["sdpa_ops"] = sorted({e.key for e in avgs if "scaled_dot_product" in e.key or "flash_attention" in e.key})
    out["sync_ops"] = {e.key: e.count / steps for e in avgs if e.key in sync_ops}
    if torch.cuda.is_available():
        dev = sorted((e for e in avgs if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
        out["top_device"] = [
            {"op": e.key, "calls": e.count / steps, "device_ms": e.self_device_time_total / 1e3 / steps}
            for e in dev[:top]
        ]
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        copies = [e for e in kernels if e.name.startswith(("Memcpy", "Memset"))]
        out["kernel_launches_per_step"] = (len(kernels) - len(copies)) / steps
        out["copies_per_step"] = len(copies) / steps
        out["device_busy"] = union_us([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e6 / wall_s
        out["device_ms_per_step"] = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / steps
    else:
        out["top_device"] = []
        out["kernel_launches_per_step"] = out["copies_per_step"] = out["device_busy"] = None
    return out


def _profile_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import profile_train_step

    return profile_train_step


def test_profile_summary_from_key_averages_matches_the_event_walk_on_a_tiny_profile(monkeypatch):
    """A real CPU profile of a tiny step with attention (SDPA), a host read and a boolean mask: every field of the
    summary equals what the two walks of events() gave (issue 27: one key_averages(), same fields and table)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    prof_mod = _profile_module(monkeypatch)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 4, 8)

    def step():
        q = lin(x).view(2, 1, 4, 8)
        y = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        y.sum().backward()
        return float(y.detach().mean()), y.detach()[y.detach() > 0].numel()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    new, old = prof_mod.summarize_profile(prof, 2, 0.05), _summary_from_events(prof, 2, 0.05)
    assert new == old
    assert new["sdpa_ops"] and new["sync_ops"]["aten::_local_scalar_dense"] == 1.0 and new["sync_ops"]["aten::nonzero"]


def test_profile_summary_counts_kernels_copies_and_device_time_from_key_averages(monkeypatch):
    """The GPU fields, on hand-made CUDA kernel events (real torch FunctionEvents; no GPU here): launches, copies and
    device time per step as the event walk counted them, and device busy equal to the interval union when the
    kernels do not overlap (one stream)."""
    import torch
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    prof_mod = _profile_module(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    events, t = [], 0
    for i, (name, us) in enumerate(
        [
            ("aten::mm", 40),
            ("sm90_gemm_bf16", 30),
            ("Memcpy HtoD (Pageable -> Device)", 5),
            ("sm90_gemm_bf16", 25),
            ("Memset (Device)", 2),
            ("triton_lora_fwd", 12),
        ]
        * 2
    ):
        device = DeviceType.CPU if name.startswith("aten::") else DeviceType.CUDA
        events.append(
            FunctionEvent(
                i,
                name,
                thread=0,
                start_us=t,
                end_us=t + us,
                use_device="cuda",
                device_type=device,
                stack=[],
                input_shapes=[],
            )
        )
        t += us + 3

    class Prof:  # what summarize_profile reads of torch.profiler.profile
        def __init__(self):
            self._events = EventList(events, use_device="cuda")
            self._events._build_tree()

        def events(self):
            return self._events

        def key_averages(self):
            return self._events.key_averages()

    new, old = prof_mod.summarize_profile(Prof(), 2, 0.001), _summary_from_events(Prof(), 2, 0.001)
    assert new == old
    assert new["kernel_launches_per_step"] == 3 and new["copies_per_step"] == 2
    assert new["device_ms_per_step"] == pytest.approx((30 + 5 + 25 + 2 + 12) / 1e3)
    assert [o["op"] for o in new["top_device"]][:1] == ["sm90_gemm_bf16"]


def test_bench_serve_smoke(tmp_path):
    """Both servers start, every point of the smoke grid is measured and written (tagi generates one adapter per
    distinct instruction, concat none)."""
    run_bench("bench_serve.py", tmp_path)
    result, table = written(tmp_path, "serve")
    points = {(p["mode"], p["distinct"]): p for p in result["points"]}
    assert sorted(points) == [("concat", 1), ("concat", 2), ("tagi", 1), ("tagi", 2)]
    assert [points[("tagi", d)]["adapters_generated"] for d in (1, 2)] == [1, 2]
    assert all(p["adapters_generated"] == 0 for (mode, _), p in points.items() if mode == "concat")
    assert all(p["requests_per_s"] > 0 and p["completion_tokens"] == 8 * 4 for p in points.values())
    assert "| tiny | 2 | tagi |" in table and "x |" in table
    first = result["first_token"]["tiny"]
    assert set(first) == {"tagi_unseen_ms", "tagi_cached_ms", "concat_ms"} and min(first.values()) > 0
