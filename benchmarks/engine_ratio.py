"""Step time of each engine over the torch engine's, the engines' steps interleaved round-robin in one process.

bench_train_step.py measures one case after another; on a shared CPU host, load changes between cases move its
ratios by tens of percent. Here every engine's case is built first, then each round runs one step of every engine in
turn, so all engines see the same load; the ratio of a round is its step time over the torch engine's in that round,
and the reported ratio is the median over rounds (min step times beside it). Each (recipe, case) measurement runs in
its own process (``--_case``, under ``--case_timeout``): DeepSpeed keeps ZeRO-3 engines alive after destroy().

``--code DIR`` measures another checkout of tagi-ds (its own ``tagi_ds`` must come first on PYTHONPATH, and its
``benchmarks/bench_train_step.py`` builds the cases), which is how a before/after pair is measured:

    PYTHONPATH=/tmp/base python benchmarks/engine_ratio.py --code /tmp/base --engines torch z3 --tag before
    python benchmarks/engine_ratio.py --engines torch z3+partitioned z3+replicated --deepspeed ds_configs/z3.json

Results: <out_dir>/<device-slug>_<YYYY-MM-DD>_engine_ratio[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_recipe_args(p, "tiny shapes, 2 rounds: checks the harness", "config overrides for every recipe")
    p.add_argument("--variants", nargs="+", default=["tagi", "lora"])
    p.add_argument("--engines", nargs="+", default=["torch", "z3"], help="the first is the baseline (torch)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (one step of every engine each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--deepspeed", type=Path, help="ZeRO-3 JSON of the z3 engines (only where the code takes one)")
    p.add_argument("--code", type=Path, help="another tagi-ds checkout to measure (default: this one)")
    common.add_case_args(p)
    common.add_run_args(p)
    a, _ = common.parse_run_args(p, argv)
    if a.smoke:
        a.rounds, a.warmup = min(a.rounds, 2), min(a.warmup, 1)
    return a


def load_bench(code: Path | None):
    """bench_train_step of ``code`` (default: this checkout) and the tagi_ds it imports."""
    if code is not None:
        sys.path.insert(0, str(code / "benchmarks"))
        sys.modules.pop("bench_train_step", None)
    bench = importlib.import_module("bench_train_step")
    import tagi_ds

    return bench, str(Path(tagi_ds.__file__).resolve().parent.parent)


def case_config(bench, args, recipe: str, variant: str, engine: str):
    """``bench.case_config`` of any checkout (older ones take no engine: their z3 has one backbone placement)."""
    if "engine" in inspect.signature(bench.case_config).parameters:
        return bench.case_config(args, recipe, variant, False, engine)
    return bench.case_config(args, recipe, variant, False)


def build_case(bench, cfg, variant: str, engine: str, rows: int, z3_json: Path | None):
    """``bench.build_case`` of any checkout (older ones take no ZeRO-3 JSON: their own default)."""
    takes_json = "z3_json" in inspect.signature(bench.build_case).parameters
    return bench.build_case(cfg, variant, engine, rows, **({"z3_json": z3_json} if takes_json and z3_json else {}))


def build(bench, args, recipe: str, variant: str, engine: str):
    """``(step, cleanup)`` of one case, whatever the checkout's bench_train_step signatures."""
    bargs = bench.parse_args(
        [
            "--recipe",
            recipe,
            "--no_save",
            *(["--smoke"] if args.smoke else []),
            *(["--set", *args.overrides] if args.overrides else []),
        ]
    )
    cfg = case_config(bench, bargs, recipe, variant, engine)
    from tagi_ds import plan

    model, step, cleanup = build_case(bench, cfg, variant, engine, max(bargs.teacher_rows, bargs.tasks), args.deepspeed)
    s = bench.shapes_for(bargs, cfg)
    batch = plan.synthetic_batch(
        cfg.model.arch, s, cfg.model.vocab_size, mode=cfg.mode, teacher=variant == "tagi", seed=args.seed
    ).to("cuda" if torch.cuda.is_available() else "cpu")
    return (lambda: step(batch)), cleanup, vars(s)


def measure(bench, args, recipe: str, variant: str) -> dict:
    cases = {}
    shapes = None
    for engine in args.engines:
        torch.manual_seed(args.seed)
        run, cleanup, shapes = build(bench, args, recipe, variant, engine)
        cases[engine] = (run, cleanup)
    times = {e: [] for e in cases}
    for r in range(args.warmup + args.rounds):
        for engine, (run, _) in cases.items():
            common.sync()
            t0 = time.perf_counter()
            run()
            common.sync()
            if r >= args.warmup:
                times[engine].append(time.perf_counter() - t0)
    for _, cleanup in cases.values():
        cleanup()
    try:  # this process built several ZeRO-3 engines; DeepSpeed's globals would keep them (another --code's may not)
        from tagi_ds.runtime import zero_release
    except ImportError:
        pass
    else:
        zero_release.release()
    base = args.engines[0]
    rows = []
    for engine, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[base])]
        rows.append(
            {
                "engine": engine,
                "median_ms": statistics.median(ts) * 1e3,
                "min_ms": min(ts) * 1e3,
                "ratio_median": statistics.median(ratios),
                "ratio_of_mins": min(ts) / min(times[base]),
            }
        )
        print(
            f"  {recipe} {variant} {engine:15s} median {rows[-1]['median_ms']:7.1f} ms, x {base} "
            f"{rows[-1]['ratio_median']:.2f} (of mins {rows[-1]['ratio_of_mins']:.2f})",
            file=sys.stderr,
            flush=True,
        )
    return {"recipe": recipe, "variant": variant, "shapes": shapes, "rows": rows}


def to_markdown(result: dict) -> str:
    base = result["engines"][0]
    lines = common.md_head(
        "Engine step-time ratio (interleaved)",
        result,
        f"**CPU results**: tiny shapes; every round runs one step of each engine in turn, so all engines share the "
        f"host's load. {common.threads_text()}; host load average {result['host_load_start']} at the start, "
        f"{result['host_load_end']} at the end.",
    )
    lines += [
        f"code: {result['code']}; {result['rounds']} rounds after {result['warmup']} warm-up; ZeRO-3 JSON: "
        f"{result['z3_json']}; ratio = step time / {base}'s in the same round (median over rounds), and the "
        "ratio of the minima",
        "",
        f"| recipe | case | engine | median ms | min ms | x {base} (median) | x {base} (of mins) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in result["measurements"]:
        if m.get("status", "ok") != "ok":
            lines.append(f"| {m['recipe']} | {m['variant']} | {m['status']} | | | | |")
        for r in m["rows"]:
            lines.append(
                f"| {m['recipe']} | {m['variant']} | {r['engine']} | {r['median_ms']:.1f} | "
                f"{r['min_ms']:.1f} | {r['ratio_median']:.2f} | {r['ratio_of_mins']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench, code = load_bench(args.code)
    result = {
        "benchmark": "engine_ratio",
        "device": common.device_name(),
        "device_kind": common.device_kind(),
        "device_label": common.device_label(),
        "date": datetime.date.today().isoformat(),
        "versions": common.versions(),
        "code": code,
        "engines": args.engines,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "z3_json": str(args.deepspeed) if args.deepspeed else "the code's default",
        "host_load_start": common.host_load(),
        "measurements": [],
    }
    if args.case:  # a child: one measurement (all engines of one case, interleaved), to the parent's file
        import json

        case = json.loads(args.case)
        return common.write_row(case, {"status": "ok", **measure(bench, args, case["recipe"], case["variant"])})
    for recipe in args.recipe:
        for variant in args.variants:
            # Each measurement in its own process (common.run_child): its engines must coexist, but the next
            # measurement's must not find them (ZeRO-3 engines outlive destroy(); CUDA faults stick).
            m = common.run_child(
                __file__, args.argv, {"recipe": recipe, "variant": variant}, common.case_timeout(args, variant)
            )
            if m["status"] != "ok":
                print(f"  {recipe} {variant}: {m['status']}", file=sys.stderr, flush=True)
            result["measurements"].append({"recipe": recipe, "variant": variant, "rows": [], **m})
            if not args.no_save:  # finished measurements on disk as they come
                partial = {**result, "host_load_end": common.host_load(), "partial": True}
                common.save_results(
                    args.out_dir,
                    common.result_name("engine_ratio", args.tag),
                    partial,
                    to_markdown(partial),
                    default=str,
                    quiet=True,
                )
    result["host_load_end"] = common.host_load()
    common.emit(args, "engine_ratio", result, to_markdown(result), default=str)
    return result


if __name__ == "__main__":
    main()
