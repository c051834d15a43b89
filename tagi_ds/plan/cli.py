"""Memory and step-time planner for stage-2 TAGI training (finetune, mode tagi, teacher KL + param-MSE).

The command line (``python -m tagi_ds.plan``): flags -> ``PlanInput`` -> ``plan``, printed as rich tables or
``--json``; ``--measure`` adds one measured step on this machine (``measure_step``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any

import torch

from tagi_ds.config import ConfigError
from tagi_ds.plan.fit import plan
from tagi_ds.plan.inputs import ASSUMED_MFU, BACKBONES, H100_BF16_DENSE_TFLOPS, ZERO3_HOOK_US, GiB, PlanInput
from tagi_ds.plan.measure import measure_step
from tagi_ds.recipes import RECIPES
from tagi_ds.runtime.flags import Parser


def _on_off(v: str) -> bool:
    if v not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {v!r}")
    return v == "on"


def _number(v: str) -> float:
    """A finite float (``nan`` and ``inf`` parse as floats, and would pass every ``> 0`` check)."""
    try:
        x = float(v)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {v!r}")
    return x


def parser() -> argparse.ArgumentParser:
    a = Parser(prog="python -m tagi_ds.plan", description=__doc__.split("\n")[0])
    a.add_argument("--model", default="t5-xl", choices=list(RECIPES), help="recipe whose shapes are planned")
    a.add_argument("--nodes", type=int, default=1)
    a.add_argument("--gpus_per_node", type=int, default=None, help="default 8 (1 with --stage none)")
    a.add_argument("--gpu_mem_gb", type=_number, default=80.0, help="memory per GPU, GiB")
    a.add_argument("--stage", default="z3", choices=["z3", "z2", "none"], help="ZeRO stage; none = one process")
    a.add_argument("--offload", default="none", choices=["none", "optimizer", "param"])
    a.add_argument(
        "--backbone",
        default="auto",
        choices=list(BACKBONES),
        help="ZeRO-3: where the frozen backbone "
        "lives; auto = replicated (whole on every GPU, outside ZeRO) where it fits, else partitioned",
    )
    a.add_argument(
        "--deepspeed",
        default=None,
        metavar="PATH",
        help="DeepSpeed JSON for bucket sizes (default ds_configs/z3.json or z2.json)",
    )
    a.add_argument(
        "--micro_batch",
        type=int,
        default=None,
        help="examples per GPU per micro-step (default: recipe's tasks_per_batch x examples_per_task)",
    )
    a.add_argument("--examples_per_task", type=int, default=None, help="tasks per micro-batch = ceil(B / this)")
    a.add_argument("--seq_len", type=int, default=None, help="input tokens (default: data.max_source_length)")
    a.add_argument("--target_len", type=int, default=None, help="target tokens (default: data.max_target_length)")
    a.add_argument("--instr_len", type=int, default=None, help="instruction tokens (data.max_instruction_length)")
    a.add_argument("--rank", type=int, default=None, help="generated LoRA rank (hypernet.rank)")
    a.add_argument(
        "--chunk_tokens",
        type=int,
        default=None,
        help="target tokens per chunk of the LM head + CE/KL (loss.chunk_tokens)",
    )
    a.add_argument(
        "--teacher_rows",
        type=int,
        default=60,
        help="teacher bank rows (SNI: 60 categories); 0 = no teacher (no KL, no param-MSE)",
    )
    a.add_argument(
        "--teacher_model",
        default=None,
        choices=list(RECIPES),
        help="a separate frozen teacher model of this recipe's shapes gives the KL target (finetune's "
        "--teacher_model): its weights (partitioned under z3) and its forward on instruction + input",
    )
    a.add_argument("--gradient_checkpointing", type=_on_off, default=None, metavar="on|off")
    a.add_argument(
        "--precision",
        default=None,
        choices=["bf16", "fp32"],
        help="default: bf16 for GPU recipes, fp32 for the tiny ones",
    )
    a.add_argument(
        "--tflops_per_gpu",
        type=_number,
        default=None,
        help=f"achieved TFLOP/s per GPU (default {H100_BF16_DENSE_TFLOPS:g} x {ASSUMED_MFU:g})",
    )
    a.add_argument(
        "--zero3_hook_us",
        type=_number,
        default=None,
        help=f"host time per ZeRO-3 module hook call "
        f"(a partitioned backbone; default {ZERO3_HOOK_US:g}, measured on a CPU host)",
    )
    a.add_argument("--interconnect_gbps", type=_number, default=400.0, help="between nodes, Gbit/s per GPU")
    a.add_argument("--intra_node_gbps", type=_number, default=2400.0, help="within a node (NVLink), Gbit/s per GPU")
    a.add_argument("--pcie_gbps", type=_number, default=256.0, help="host <-> GPU (offload), Gbit/s per GPU")
    a.add_argument("--json", action="store_true", help="print the plan as JSON")
    a.add_argument(
        "--measure",
        action="store_true",
        help="also run one real step here (--stage none shapes) and print its measured peak next to the prediction",
    )
    return a


def _fmt(n: float) -> str:
    return f"{n / GiB:,.2f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:,.1f} MiB"


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    p, m, t = result["input"], result["memory"], result["time"]
    con = Console(width=max(100, Console().width))
    head = (
        f"{p['model']} on {p['nodes']} node(s) x {p['gpus_per_node']} GPU(s), {p['gpu_mem_gb']:g} GiB each; "
        f"stage {p['stage']}, offload {p['offload']}, {p['precision']}, checkpointing "
        f"{'on' if p['gradient_checkpointing'] else 'off'}"
    )
    pr = result["params"]
    con.print(head)
    con.print(
        f"parameters: backbone {pr['backbone']:,}, generator {pr['generator']:,} (trainable), teacher bank "
        f"{pr['teacher_bank']:,} ({p['teacher_rows']} rows), {pr['sites']} adapted sites"
        + (f", teacher model {p['teacher_model']} {pr['teacher_model']:,} (frozen)" if p["teacher_model"] else "")
    )
    lt = result["loss_terms"]
    con.print(
        "loss terms: "
        + ", ".join(
            f"{n} x {t['weight']:g} ({t['flops']:.3g} FLOPs, saves {_fmt(t['saved_bytes'])}, chunk "
            f"{_fmt(max(t['chunk_forward_bytes'], t['chunk_backward_bytes']))})"
            for n, t in lt.items()
        )
    )
    sh = result["shapes"]
    con.print(
        f"micro-batch {sh['micro_batch']} examples of {sh['tasks']} task(s); lengths: input {sh['seq_len']}, "
        f"target {sh['target_len']}, instruction {sh['instr_len']}; rank {p['rank']}"
    )
    table = Table(title="memory per GPU")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    for k, v in m.items():
        if k != "total":
            table.add_row(k, _fmt(v), f"{100 * v / max(1, m['total']):.1f}%")
    table.add_row("[bold]total (peak allocated)[/bold]", f"[bold]{_fmt(m['total'])}[/bold]", "")
    table.add_row("usable (0.92 x mem - 1 GiB)", _fmt(result["usable"]), "")
    con.print(table)
    v = result["vocab"]
    con.print(
        f"vocabulary (V={v['vocab_size']:,}): embeddings + LM head {_fmt(v['params'])} on this GPU"
        + (f", {_fmt(v['gathered'])} while gathered" if v["gathered"] else "")
        + f"; LM head + CE/KL working set {_fmt(v['loss'])} (chunks of {p['chunk_tokens']} target tokens; one "
        f"fp32 [B, L, V] would be {_fmt(v['full_logits_fp32'])}): {100 * v['share']:.1f}% of the peak"
    )
    if result["host_memory"]["teacher_bank"]:
        con.print(
            f"host memory per rank: teacher bank {_fmt(result['host_memory']['teacher_bank'])} (fp32, whole, "
            "outside DeepSpeed; each step copies only its tasks' rows to the GPU)"
        )
    if result["fits"]:
        con.print(f"[green]fits[/green]: largest micro-batch that fits {result['max_micro_batch']}")
    else:
        con.print(
            f"[red]does not fit[/red]: needs {_fmt(m['total'])} of {_fmt(result['usable'])} usable "
            f"(largest micro-batch that fits: {result['max_micro_batch']})"
        )
    for i, opt in enumerate(result.get("suggestions", [])):
        if opt["micro_batch"]:
            label = "smallest working configuration" if i == 0 else "or"
            con.print(f"{label}: [bold]{' '.join(opt['flags'])}[/bold] ({opt['why']})")
        else:
            con.print(f"[red]{opt['why']}[/red]")
    bb = result["backbone"]
    con.print(f"frozen backbone: [bold]{bb['placement']}[/bold] ({bb['why']})")
    if bb["options"]:
        bt = Table(title="ZeRO-3 backbone placements")
        for col in ("backbone", "memory (peak)", "fits", "ZeRO-3 hooks (host)", "step", "MFU vs 989 TFLOP/s"):
            bt.add_column(col, justify="right")
        for name, o in bb["options"].items():
            mark = " (chosen)" if name == bb["placement"] else ""
            bt.add_row(
                name + mark,
                _fmt(o["total"]),
                "yes" if o["fits"] else "no",
                f"{o['zero3_host_s'] * 1e3:,.1f} ms",
                f"{o['step_s'] * 1e3:,.1f} ms",
                f"{100 * o['mfu']:.1f}%",
            )
        con.print(bt)
    tt = Table(title="step time estimate (one micro-batch per GPU)")
    for col in ("compute", "comm", "ZeRO-3 hooks", "step", "no overlap", "tokens/s (all GPUs)", "MFU vs 989 TFLOP/s"):
        tt.add_column(col, justify="right")
    tt.add_row(
        f"{t['compute_s'] * 1e3:,.1f} ms",
        f"{t['comm_s'] * 1e3:,.1f} ms",
        f"{t['zero3_host_s'] * 1e3:,.1f} ms",
        f"{t['step_s'] * 1e3:,.1f} ms",
        f"{t['step_no_overlap_s'] * 1e3:,.1f} ms",
        f"{t['tokens_per_s']:,.0f}",
        f"{100 * t['mfu']:.1f}%",
    )
    con.print(tt)
    con.print(
        f"at {p['tflops_per_gpu']:g} TFLOP/s per GPU, {p['interconnect_gbps']:g} Gbit/s between nodes, "
        f"{p['intra_node_gbps']:g} Gbit/s within a node, {p['pcie_gbps']:g} Gbit/s host <-> GPU, "
        f"{p['zero3_hook_us']:g} us per ZeRO-3 module hook call ({t['zero3_hooks']:,} calls); "
        f"{t['model_flops'] / 1e12:,.2f} TFLOP model, "
        f"{t['hardware_flops'] / 1e12:,.2f} TFLOP hardware per step"
    )
    if "measured" in result:
        me = result["measured"]
        con.print(
            f"measured peak (one step, this machine, {me['device']}): {_fmt(me['peak'])}; predicted "
            f"{_fmt(m['total'])} ({100 * (m['total'] / me['peak'] - 1):+.1f}%)"
        )


def _check_host_memory(result: dict[str, Any]) -> None:
    """``--measure`` builds the whole model in this process: refuse it in one line, before building anything, when
    the estimate does not fit in the host memory available now (it used to end in a DefaultCPUAllocator traceback).
    On CPU the step's predicted peak lives in host memory; on a GPU the model is built on the host first, so its
    weights do."""
    import psutil

    m = result["memory"]
    need = m["total"] if not torch.cuda.is_available() else m["backbone"] + m["hypernet"]
    free = psutil.virtual_memory().available
    if need > free:
        raise ConfigError(
            f"--measure: the step needs about {need / 2**30:.1f} GiB of host memory, "
            f"{free / 2**30:.1f} GiB are available here; measure a smaller --model or on a larger "
            "machine (the prediction above needs no memory: drop --measure)"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tagi_ds.runtime.preflight import report

    try:
        a = parser().parse_args(argv)
        keys = {f.name for f in dataclasses.fields(PlanInput)}
        if a.gpus_per_node is None:
            a.gpus_per_node = 1 if a.stage == "none" else 8
        p = PlanInput(**{k: v for k, v in vars(a).items() if k in keys})
        result = plan(p)
        if result["usable"] <= 0:  # 0.92 x mem - 1 GiB: a GPU this small holds nothing
            raise ConfigError(
                f"--gpu_mem_gb: leaves no usable memory (0.92 x {a.gpu_mem_gb:g} GiB - 1 GiB reserved "
                f"= {result['usable'] / 2**30:.2f} GiB); give at least 1.1"
            )
        if a.measure:
            if result["input"]["stage"] != "none":
                raise ConfigError(
                    "--measure runs one plain-torch step in this process: use --stage none --nodes 1 --gpus_per_node 1"
                )
            _check_host_memory(result)
            result["measured"] = {**measure_step(p), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    except ConfigError as err:
        report(str(err))
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        render(result)
    return result
