"""Inference cost of one task: TAGI vs the concat baseline, per instruction length (SNI-like shapes).

One task = ``--examples`` (100) examples with an input of ``--input_len`` (128) tokens and ``--output_len``
(16) output tokens, instruction of 64-512 tokens (``--instr_lens``).
  tagi    encodes the instruction ONCE (the backbone's encoder / body, adapters off), generates the adapters
          once, then runs every example on its input alone; with fusion (T5) the decoder cross-attends to
          [instruction states ; input states], whose cross-attention keys/values tagi_ds.model computes with
          the instruction's projected once per task and the input's per example (TagiModel.prefix_cache)
  concat  one shared LoRA on the same backbone; instruction + input for every example (Tk-Instruct style)
Decoding: teacher-forced, one forward pass scoring the 16 output tokens per example (no sampling loop). Its
FLOPs equal greedy decoding with a KV cache of the same 16 tokens (each token passes every layer once and
attends to the same keys); greedy wall time would add 16 sequential steps to both variants alike.

Counted FLOPs: torch.utils.flop_counter.FlopCounterMode over the whole task (matmuls, bmm, SDPA; the CPU
SDPA kernel registered with torch's own SDPA formulas). Wall time of the whole task under torch.no_grad,
``--reps`` runs after a warm-up, tagi and concat interleaved run by run: the median on a GPU, the minimum on a
CPU. The "analytic" table applies tagi_ds.plan's FLOP formulas to the recipe's real shapes (paper sizes)
without running them: model arithmetic, not measurements.

    python benchmarks/bench_inference_cost.py                     # GPU: t5-xl t5-xxl llama-7b; CPU: tiny tiny-llama
    python benchmarks/bench_inference_cost.py --smoke --out_dir /tmp/r
Results: <out_dir>/<device-slug>_<YYYY-MM-DD>_inference_cost[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from tagi_ds import families, plan  # noqa: E402
from tagi_ds.adapters import AdapterSet  # noqa: E402
from tagi_ds.batch import TaskBatch  # noqa: E402
from tagi_ds.config import TagiConfig, apply_overrides  # noqa: E402
from tagi_ds.recipes import get_recipe  # noqa: E402

ANALYTIC_RECIPES = ("t5-base", "t5-xl", "t5-xxl", "llama-7b")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_recipe_args(p, "tiny recipe, 2 instruction lengths, 10 examples, 1 rep")
    p.add_argument("--instr_lens", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--input_len", type=int, default=128)
    p.add_argument("--output_len", type=int, default=16)
    p.add_argument("--examples", type=int, default=100, help="examples of the task")
    p.add_argument("--batch_size", type=int, default=25, help="examples per forward pass")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of the whole task")
    p.add_argument("--no_analytic", action="store_true", help="skip the analytic table for the paper sizes")
    common.add_run_args(p)
    a, _ = common.parse_run_args(p, argv)
    if a.smoke:
        a.instr_lens, a.examples, a.batch_size, a.reps = a.instr_lens[:2], min(a.examples, 10), min(a.batch_size, 5), 1
    for key in ("input_len", "output_len", "examples", "batch_size", "reps"):
        if getattr(a, key) <= 0:
            p.error(f"--{key} must be > 0, got {getattr(a, key)}")
    if any(n <= 0 for n in a.instr_lens):
        p.error(f"--instr_lens must be > 0, got {a.instr_lens}")
    return a


def build(cfg: TagiConfig, mode: str, seed: int):
    from tagi_ds import assembly, stages
    from tagi_ds.runtime.engine import Placement

    cfg = apply_overrides(cfg, [f"mode={mode}"])
    torch.manual_seed(seed)  # the same backbone weights for both variants
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    # Parameters cast, buffers as built (RoPE's fp32 inv_freq), as every other run on the device.
    return assembly.assemble(
        stages.spec("finetune", cfg),
        cfg,
        {},
        {},
        runner="infer",
        placement=Placement("whole", "one process, no DeepSpeed"),
        teacher=False,
        device=dev,
        dtype=dtype,
    ).model


def task_data(arch: str, vocab: int, args, instr_len: int, seed: int) -> dict[str, torch.Tensor]:
    """One task: instruction ``[1, Li]``, inputs ``[n, L]``, outputs ``[n, Lt]`` (random ids; lengths exact)."""
    g = torch.Generator().manual_seed(seed)
    n, L, Lt = args.examples, args.input_len, args.output_len
    ids = lambda *shape: torch.randint(4, vocab, shape, generator=g)  # noqa: E731
    return {"instr": ids(1, instr_len), "inputs": ids(n, L), "outputs": ids(n, Lt)}


def _view(arch: str, prompt: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels): T5 input / decoder targets; LLaMA prompt + target with -100 on the prompt."""
    if families.get(arch).encoder_decoder:
        return prompt, out
    ids = torch.cat([prompt, out], dim=1)
    labels = ids.clone()
    labels[:, : prompt.shape[1]] = -100
    return ids, labels


def run_tagi(model, arch: str, data: dict, batch_size: int) -> None:
    dev = next(model.parameters()).device
    instr = data["instr"].to(dev)
    imask = torch.ones_like(instr)
    with torch.no_grad():
        first = TaskBatch(instr, imask, instr, torch.tensor([0, 1], device=dev), instr, imask)
        generated, states = model.generate(first)  # once per task: instruction encoding + generator
        for lo in range(0, data["inputs"].shape[0], batch_size):
            x, labels = _view(arch, data["inputs"][lo : lo + batch_size], data["outputs"][lo : lo + batch_size])
            x, labels = x.to(dev), labels.to(dev)
            offsets = torch.tensor([0, x.shape[0]], device=dev)
            batch = TaskBatch(x, torch.ones_like(x), labels, offsets, instr, imask)
            adapters = AdapterSet(generated.factors, offsets, generated.scale, generated.impl)
            model.logits(x, batch.attention_mask, labels, adapters, batch, states)


def run_concat(model, arch: str, data: dict, batch_size: int) -> None:
    dev = next(model.parameters()).device
    with torch.no_grad():
        for lo in range(0, data["inputs"].shape[0], batch_size):
            n = data["inputs"][lo : lo + batch_size].shape[0]
            prompt = torch.cat([data["instr"].expand(n, -1), data["inputs"][lo : lo + batch_size]], dim=1)
            x, labels = _view(arch, prompt, data["outputs"][lo : lo + batch_size])
            x, labels = x.to(dev), labels.to(dev)
            offsets = torch.tensor([0, n], device=dev)
            batch = TaskBatch(x, torch.ones_like(x), labels, offsets)
            model.logits(x, batch.attention_mask, labels, model.bank_adapters(model.bank, batch, shared=True), batch)


def counted_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def timed(fns: dict, reps: int) -> dict[str, dict[str, float]]:
    """Seconds of each ``fns[name]()`` (median, min), the variants interleaved rep by rep (after one warm-up each)
    so a busy host's background load falls on both alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            common.sync()
            t0 = time.perf_counter()
            fn()
            common.sync()
            times[name].append(time.perf_counter() - t0)
    return {name: common.summarize(t) for name, t in times.items()}


def analytic(cfg: TagiConfig, instr_len: int, L: int, Lt: int, n: int, batch_size: int) -> dict[str, float]:
    """Forward FLOPs of one task from tagi_ds.plan's formulas (matmuls + attention; LoRA deltas included)."""
    c = plan.count(cfg, 0)
    t5 = c.encoder_decoder
    enc = (
        plan.backbone_forward_flops(c, 1, instr_len, 0, decoder=False)
        if t5
        else plan.backbone_forward_flops(c, 1, instr_len, 0, lm_head=False)
    )
    per_task = 2 * sum(
        k * ((c.d + c.site_dim) * c.hidden + c.hidden * c.hidden + c.hidden * c.rank * (di + do))
        for k, di, do in c.groups
    )
    fused = t5 and c.fusion
    Lx = instr_len + L if fused else L  # the keys each decoder token attends to
    ex = plan.backbone_forward_flops(c, n, L, Lt, Lx)
    tagi = (
        enc["linear"]
        + enc["attention"]
        + per_task
        + ex["linear"]
        + ex["attention"]
        + plan.adapter_flops(c, n, L, Lt, Lx, c.rank)
    )
    if fused:  # the instruction's cross-attention k/v (+ their adapters) run once per batch, not per example
        batches = math.ceil(n / batch_size)
        tagi -= (n - batches) * plan.cross_kv_flops(c, instr_len, c.rank)
    cc = plan.backbone_forward_flops(c, n, instr_len + L, Lt)
    concat = cc["linear"] + cc["attention"] + plan.adapter_flops(c, n, instr_len + L, Lt, instr_len + L, c.rank)
    return {"tagi_flops": tagi, "concat_flops": concat, "ratio": tagi / concat}


def to_markdown(result: dict) -> str:
    a = result["args"]
    lines = common.md_head(
        "Inference cost of one task",
        result,
        "**CPU results** at tiny shapes: counted FLOPs are exact for these shapes; wall times are CPU "
        f"times ({common.threads_text()}, host load average {result['host_load_start']} at "
        f"the start, {result['host_load_end']} at the end: a shared host) and only compare the two "
        f"variants on this machine (interleaved repetitions, best of {a['reps']}).",
    )
    lines += [
        f"{a['examples']} examples, input {a['input_len']} tokens, output {a['output_len']} tokens "
        f"(teacher-forced), batch {a['batch_size']}; tagi = instruction encoded once + generated adapters, "
        "inputs without the instruction (T5: decoder cross-attends to the instruction states); concat = "
        "instruction + input for every example. Ratio = tagi / concat.",
        "",
    ]
    for rec in result["measured"]:
        lines += [
            f"## {rec['recipe']} (measured)",
            "",
            "| instruction | tagi GFLOP | concat GFLOP | FLOPs ratio | formula ratio | tagi ms | concat ms "
            "| time ratio |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rec["rows"]:
            lines.append(
                f"| {r['instr_len']} | {r['tagi_flops'] / 1e9:,.2f} | {r['concat_flops'] / 1e9:,.2f} | "
                f"{r['flops_ratio']:.3f} | {r['formula_ratio']:.3f} | {r['tagi_ms']:,.1f} | "
                f"{r['concat_ms']:,.1f} | {r['time_ratio']:.3f} |"
            )
        lines.append("")
    if result.get("analytic"):
        lines += [
            "## Paper-size shapes (analytic: tagi_ds.plan FLOP formulas, not measured)",
            "",
            "| recipe | " + " | ".join(f"instr {n}" for n in a["instr_lens"]) + " |",
            "|---|" + "---:|" * len(a["instr_lens"]),
        ]
        for name, rows in result["analytic"].items():
            lines.append(f"| {name} | " + " | ".join(f"{r['ratio']:.3f}" for r in rows) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.register_cpu_sdpa_flops()
    result = {
        "benchmark": "inference_cost",
        "device": common.device_name(),
        "device_kind": common.device_kind(),
        "device_label": common.device_label(),
        "date": datetime.date.today().isoformat(),
        "versions": common.versions(),
        "decoding": "teacher-forced, one forward pass per batch",
        "smoke": args.smoke,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu_threads": torch.get_num_threads(),
        "host_load_start": common.host_load(),
        "measured": [],
        "analytic": {},
    }
    for recipe in args.recipe:
        cfg = apply_overrides(get_recipe(recipe), args.overrides)
        tagi, concat = build(cfg, "tagi", args.seed), build(cfg, "concat", args.seed)
        arch, rows = cfg.model.arch, []
        for n in args.instr_lens:
            data = task_data(arch, cfg.model.vocab_size, args, n, args.seed + n)
            fns = {
                "tagi": lambda: run_tagi(tagi, arch, data, args.batch_size),  # noqa: B023
                "concat": lambda: run_concat(concat, arch, data, args.batch_size),  # noqa: B023
            }
            tf, cf = counted_flops(fns["tagi"]), counted_flops(fns["concat"])
            t = timed(fns, args.reps)
            tt, ct = t["tagi"][t["tagi"]["reported"]], t["concat"][t["concat"]["reported"]]
            formula = analytic(cfg, n, args.input_len, args.output_len, args.examples, args.batch_size)
            rows.append(
                {
                    "instr_len": n,
                    "tagi_flops": tf,
                    "concat_flops": cf,
                    "flops_ratio": tf / cf,
                    "formula_ratio": formula["ratio"],
                    "tagi_ms": tt * 1e3,
                    "concat_ms": ct * 1e3,
                    "time_ratio": tt / ct,
                    "timing": t,
                }
            )
            print(
                f"{recipe} instr {n}: FLOPs x{tf / cf:.3f} (formula x{formula['ratio']:.3f}), time x{tt / ct:.3f}",
                file=sys.stderr,
                flush=True,
            )
        result["measured"].append({"recipe": recipe, "overrides": args.overrides, "rows": rows})
        tagi = concat = None
        common.release_memory()
    result["host_load_end"] = common.host_load()
    if not args.no_analytic:
        for name in ANALYTIC_RECIPES:
            cfg = get_recipe(name)
            result["analytic"][name] = [
                {"instr_len": n, **analytic(cfg, n, args.input_len, args.output_len, args.examples, args.batch_size)}
                for n in args.instr_lens
            ]
    table = to_markdown(result)
    common.emit(args, "inference_cost", result, table)
    return result


if __name__ == "__main__":
    main()
