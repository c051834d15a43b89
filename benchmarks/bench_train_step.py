"""Stage-2 training step: TAGI vs a plain single LoRA and the concat baseline; ZeRO-2 / ZeRO-3 / offload;
gradient checkpointing on/off. Reports tokens/s, achieved TFLOP/s per GPU, MFU and peak memory.

Cases (random-init backbones of the recipe's shape; ``--set`` overrides any size, e.g. model.num_layers=4):
  tagi     TagiModel finetune, mode tagi, with a teacher bank (KL + param-MSE run): the step being measured
  tagi_nokl  the same without the teacher terms (loss.kl_weight=0, loss.param_weight=0): instruction encoding,
           generator and the generated adapters only (the teacher forward on instruction + input is most of
           a TAGI step's FLOPs at long instructions)
  lora     the plain single-LoRA step: mode no_instruction (one shared LoRA bank row, input only, CE)
  concat   the concat baseline: one shared LoRA, instruction + input, CE
  peft     peft's LoraModel on the same backbone, input only, CE (a cross-check of ``lora``)
Engines: torch (one process, no DeepSpeed, AdamW), z2 (ds_configs/z2.json), z3 (the recipe's default JSON, as a run
uses: z3.json, z3_tiny.json for the tiny recipes; the frozen backbone where train.frozen_backbone=auto puts it:
replicated on a GPU it fits, partitioned on a CPU), z3+replicated / z3+partitioned (the same JSON, the backbone forced
whole outside ZeRO / partitioned by ZeRO-3), z3+offload_opt (optimizer state on the CPU), z3+offload
(ds_configs/z3_offload.json: parameters too). Every case runs in its
own process (``--_case``; DeepSpeed keeps ZeRO-3 engines alive after destroy(), and a CUDA fault is sticky), as a
single DeepSpeed rank (gloo on CPU), under ``--case_timeout``; the parent rewrites the result files after each case.
A case that cannot run here is listed as skipped with the reason, one whose process died as failed. Column "op":
the adapter op that ran (tagi_ds.ops.resolve_impl's answers during the first warm-up step; none: peft's layers).
Table 1: every case on the default engine (z3 when DeepSpeed can start, else torch); table 2: tagi on
every engine; table 3: tagi and lora with gradient checkpointing (model.gradient_checkpointing) on. Ratios
are against the lora case on the default engine without checkpointing, measured in the same run: "x lora"
(tokens/s, so < 1 is slower), "FLOPs x lora" (model FLOPs per step: the extra work a case does by design) and
"s/FLOP x lora" (step time per model FLOP: > 1 means each FLOP costs more than in the plain LoRA step, the
implementation's overhead rather than the method's extra work).

Tokens per step = B x (input + target tokens) for every case (concat's instruction tokens are cost, not
throughput). FLOPs per step (tagi_ds.plan.step_flops; checked against torch's FlopCounterMode in the tests):
  frozen base 4N per token (forward 2N + input gradients 2N, no weight gradients; N = matmul parameters the
  token passes through), attention 3 x 4*Lk*H*dk per query token per layer, adapters 6*r*(d_in+d_out) per
  token per site, generator 3 x forward once per task, instruction encoding 2*N_enc per instruction token,
  teacher forward 2N per teacher token (instruction + input) for the KL. MFU = model FLOPs / step time / peak
  (``--peak_tflops``; default 989 on H100/H200 bf16 dense, none on CPU); checkpointing's recompute is
  excluded from MFU and included in "hw TFLOP/s".
Peak memory: GPU torch.cuda.max_memory_allocated over build + steps, minus what was allocated before. CPU:
the process RSS high-water mark above the RSS before the case (sampled, psutil), and the tracked tensor peak
(the planner's definition, tagi_ds.plan.measure: live tensor storages + the step's high-water mark) of one more step.
Build s (``build_s``, every row): seconds from the case's start to its first step (model + teacher bank, engine
init, batch on the device); one process per case pays it every case, so the GPU stages' caps come from it.

    python benchmarks/bench_train_step.py                         # GPU: t5-xl t5-xxl llama-7b; CPU: tiny tiny-llama
    python benchmarks/bench_train_step.py --recipe t5-xl --micro_batch 8 --seq_len 512
    python benchmarks/bench_train_step.py --smoke --out_dir /tmp/r  # CPU harness check, tiny shapes
Results: <out_dir>/<device-slug>_<YYYY-MM-DD>_train_step[_<tag>].{json,md}.
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from tagi_ds import loss_terms, plan  # noqa: E402
from tagi_ds.config import TagiConfig, apply_overrides  # noqa: E402
from tagi_ds.recipes import get_recipe  # noqa: E402

VARIANTS = ("tagi", "tagi_nokl", "lora", "concat", "peft")
ENGINES = ("torch", "z2", "z3", "z3+replicated", "z3+partitioned", "z3+offload_opt", "z3+offload")
# train.frozen_backbone of each engine (tagi_ds.plan.for_training); the others: auto
BACKBONE = {"z3+replicated": "replicated", "z3+partitioned": "partitioned"}
MODES = {"tagi": "tagi", "tagi_nokl": "tagi", "lora": "no_instruction", "concat": "concat", "peft": "no_instruction"}
FLOP_VARIANT = {"tagi_nokl": "tagi", "peft": "lora"}  # the tagi_ds.plan.step_flops variant of each case
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}  # bf16 dense tensor-core peaks (datasheets)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_recipe_args(
        p,
        "tiny recipe at tiny shapes, 1 step: checks the harness",
        "config overrides for every recipe (sizes: model.d_model=..., model.num_layers=...)",
    )
    p.add_argument("--micro_batch", type=int, help="examples per step (default: GPU 4, CPU 8)")
    p.add_argument("--tasks", type=int, default=2, help="tasks per micro-batch")
    p.add_argument("--seq_len", type=int, help="input tokens (default: the recipe's data.max_source_length)")
    p.add_argument("--target_len", type=int, help="target tokens (default: data.max_target_length)")
    p.add_argument("--instr_len", type=int, help="instruction tokens (default: data.max_instruction_length)")
    p.add_argument("--teacher_rows", type=int, default=60, help="teacher bank rows")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--no_checkpointing_table", action="store_true", help="skip the gradient checkpointing cases")
    p.add_argument("--steps", type=int, help="timed steps (GPU: median, CPU: min; default GPU 10, CPU 3)")
    p.add_argument(
        "--warmup",
        type=int,
        help="untimed steps first, >= 1: the first records which adapter op runs (default GPU 3, CPU 1)",
    )
    p.add_argument("--peak_tflops", type=float, help="per-device peak for MFU (default: known GPUs; none on CPU)")
    p.add_argument(
        "--deepspeed",
        type=Path,
        help="the ZeRO-3 JSON of the z3 engines (default: the recipe's, as a "
        "run uses: z3.json, z3_tiny.json for the tiny recipes)",
    )
    common.add_case_args(p)
    common.add_run_args(p)
    a, gpu = common.parse_run_args(p, argv)
    for key in ("micro_batch", "tasks", "seq_len", "target_len", "instr_len", "steps", "teacher_rows"):
        v = getattr(a, key)
        if v is not None and v <= 0:
            p.error(f"--{key} must be > 0, got {v}")
    if a.warmup is not None and a.warmup < 1:
        p.error(f"--warmup must be >= 1 (its first step records the adapter op), got {a.warmup}")
    if a.smoke:
        a.micro_batch, a.seq_len, a.target_len, a.instr_len = (
            a.micro_batch or 4,
            a.seq_len or 32,
            a.target_len or 8,
            a.instr_len or 32,
        )
        a.steps, a.warmup = a.steps or 1, a.warmup if a.warmup is not None else 1
    a.micro_batch = a.micro_batch or (4 if gpu else 8)
    a.steps = a.steps or (10 if gpu else 3)
    a.warmup = a.warmup if a.warmup is not None else (3 if gpu else 1)
    if a.tasks > a.micro_batch:
        p.error(f"--tasks {a.tasks} > --micro_batch {a.micro_batch}: every task needs an example")
    if a.peak_tflops is None and gpu:
        name = torch.cuda.get_device_name().lower()
        a.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return a


# -- building one case ------------------------------------------------------------------------------------
class PeftLora(nn.Module):
    """peft's LoRA (same sites, rank and alpha as the lora case) on the frozen backbone; CE on the input alone."""

    def __init__(self, cfg: TagiConfig, backbone: nn.Module) -> None:
        from peft import LoraConfig, get_peft_model

        from tagi_ds import backbones, families
        from tagi_ds.backbones.base import freeze

        super().__init__()
        self.arch = backbones.get(cfg.model.arch)
        self.causal = families.get(cfg.model.arch).causal
        self.chunk = cfg.loss.chunk_tokens
        freeze(backbone, [])
        names = [name for name, *_ in self.arch.site_names(backbone, cfg.model)]
        lora = LoraConfig(r=cfg.hypernet.rank, lora_alpha=cfg.hypernet.alpha, lora_dropout=0.0, target_modules=names)
        self.peft = get_peft_model(backbone, lora)

    def forward(self, batch):
        from tagi_ds.loss_terms import token_losses
        from tagi_ds.losses import target_rows

        # The same chunked LM head + CE as the lora case, so that the two differ in the adapters only.
        x, head = self.arch.head_inputs(self.peft.base_model.model, batch.input_ids, batch.attention_mask, batch.labels)
        loss, _ = token_losses(head, *target_rows(x, batch.labels, self.causal), chunk=self.chunk)
        return loss, {"ce": loss}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def ds_config(engine: str, recipe: str, z3_json: Path | None = None) -> dict:
    """The DeepSpeed JSON of ``engine``: the ZeRO-3 engines use ``recipe``'s default (a run's: ds_configs/z3.json;
    z3_tiny.json for the tiny recipes, which partitions their small tensors too) or ``z3_json``."""
    from tagi_ds.runtime.engine import DEFAULT_DS_CONFIG, default_ds_config, load_ds_json

    folder = DEFAULT_DS_CONFIG.parent
    ds = load_ds_json(
        folder / "z2.json"
        if engine == "z2"
        else folder / "z3_offload.json"
        if engine == "z3+offload"
        else z3_json or default_ds_config(recipe)
    )
    zero = ds["zero_optimization"]
    if engine == "z3+offload_opt":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        ds["zero_force_ds_cpu_optimizer"] = False
    for key in ("offload_optimizer", "offload_param"):
        if key in zero and not torch.cuda.is_available():
            zero[key]["pin_memory"] = False  # pinning needs CUDA
    return ds


def backbone_placement(model: nn.Module) -> str:
    """Where the frozen backbone's weights live: ``partitioned`` (ZeRO-3 parameters), ``replicated`` (ZeRO-3 engine,
    backbone whole outside ZeRO: only the rest of the model is ZeRO-3's) or ``whole`` (no ZeRO-3)."""
    backbone = model.backbone if hasattr(model, "backbone") else getattr(model, "peft", model)
    if any(hasattr(p, "ds_id") for p in backbone.parameters()):
        return "partitioned"
    return "replicated" if any(hasattr(p, "ds_id") for p in model.parameters()) else "whole"


# deepspeed.zero.Init replaces torch.nn.functional.linear for the whole process (memory_efficient_linear) and never
# puts it back: without this, every case measured after a ZeRO-3 one (the torch engine too) runs DeepSpeed's linear.
_F_LINEAR = torch.nn.functional.linear


def build_case(cfg: TagiConfig, variant: str, engine: str, rows: int, z3_json: Path | None = None):
    """(module, step function, cleanup) for one case, assembled as a run is (``tagi_ds.assembly``: runner
    ``torch`` for the one-process engine, ``train`` for the DeepSpeed ones). Raises if the case cannot run here."""
    from tagi_ds import assembly, stages
    from tagi_ds.runtime import dist
    from tagi_ds.runtime import engine as ds_engine

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = dict(
        rows=rows,
        teacher=variant == "tagi",
        teacher_init="empty",  # its values do not change the step's time
        adapt=(lambda backbone: PeftLora(cfg, backbone)) if variant == "peft" else None,
    )
    spec = stages.spec("finetune", cfg)
    if engine == "torch":
        dtype = torch.bfloat16 if ds_engine.precision(cfg) == "bf16" else torch.float32
        model = assembly.assemble(spec, cfg, {}, {}, runner="torch", device=dev, dtype=dtype, **parts).model
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)

        def step(batch):
            loss, _ = model(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return model, step, lambda: None
    dist.init()
    ds = ds_engine.inject(ds_config(engine, cfg.recipe, z3_json), cfg, dist.world_size())
    if variant == "peft" and cfg.train.frozen_backbone == "replicated":
        raise RuntimeError("peft's LoRA layers live inside the backbone: only a partitioned one runs under ZeRO-3")
    placement = plan.for_training(cfg, ds, dist.world_size())
    run = assembly.assemble(spec, cfg, ds, {}, world_size=dist.world_size(), placement=placement, **parts)
    model, eng = run.model, run.runner

    def step(batch):
        loss, _ = eng(batch)
        eng.backward(loss)
        eng.step()

    def cleanup():
        from tagi_ds.runtime import zero_release

        eng.destroy()
        zero_release.release(model)  # DeepSpeed's globals would keep the model alive (several engines, one process)
        torch.nn.functional.linear = _F_LINEAR

    return model, step, cleanup


def case_config(args, recipe: str, variant: str, checkpointing: bool, engine: str = "z3") -> TagiConfig:
    cfg = apply_overrides(get_recipe(recipe), args.overrides)
    cfg.mode = MODES[variant]
    cfg.model.gradient_checkpointing = checkpointing
    cfg.model.adapter_impl = "auto"
    cfg.data.tasks_per_batch = args.tasks
    cfg.data.examples_per_task = max(1, args.micro_batch // args.tasks)
    cfg.train.lr, cfg.train.max_steps = 1e-5, 10**6
    cfg.train.frozen_backbone = "partitioned" if variant == "peft" else BACKBONE.get(engine, "auto")
    if variant != "tagi":
        cfg.loss.kl_weight = cfg.loss.param_weight = 0.0
    return cfg.validate()


def shapes_for(args, cfg: TagiConfig) -> plan.Shapes:
    return plan.Shapes(
        args.micro_batch,
        args.tasks,
        args.seq_len or cfg.data.max_source_length,
        args.target_len or cfg.data.max_target_length,
        args.instr_len or cfg.data.max_instruction_length,
    )


def case_flops(args, cfg: TagiConfig, variant: str, checkpointing: bool) -> dict[str, float]:
    """The planner's FLOPs of one step of ``variant``: the teacher terms only in ``tagi``."""
    teacher = variant == "tagi"
    return plan.step_flops(
        plan.count(cfg, args.teacher_rows),
        shapes_for(args, cfg),
        FLOP_VARIANT.get(variant, variant),
        checkpointing,
        loss_terms.active(cfg.loss, teacher),
    )


# -- measuring one case -----------------------------------------------------------------------------------
def run_case(args, recipe: str, variant: str, engine: str, checkpointing: bool) -> dict:
    cfg = case_config(args, recipe, variant, checkpointing, engine)
    s = shapes_for(args, cfg)
    row = {"variant": variant, "engine": engine, "checkpointing": checkpointing, "status": "ok"}
    flops = case_flops(args, cfg, variant, checkpointing)
    row.update(model_flops=flops["model"], hardware_flops=flops["hardware"])
    gpu = torch.cuda.is_available()
    common.release_memory()
    torch.manual_seed(args.seed)
    idle_tensors = 0 if gpu else plan.storage_bytes(common.live_tensors())
    rss = None if gpu else common.RssPeak().start()
    if gpu:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    cleanup = lambda: None  # noqa: E731
    try:
        t_build = time.perf_counter()
        model, step, cleanup = build_case(cfg, variant, engine, max(args.teacher_rows, args.tasks), args.deepspeed)
        batch = plan.synthetic_batch(
            cfg.model.arch, s, cfg.model.vocab_size, mode=cfg.mode, teacher=variant == "tagi", seed=args.seed
        )
        batch = batch.to("cuda" if gpu else "cpu")
        common.sync()
        # Model (+ teacher bank) build and engine init: each case's process pays it, so the GPU stages' per-case
        # caps come from this number (scripts/gpu_session.sh's time plans).
        row["build_s"] = time.perf_counter() - t_build
        with common.AdapterOps() as ops:  # untimed: which adapter op the case runs
            step(batch)
        row["adapter_op"] = ops.summary()
        for _ in range(args.warmup - 1):
            step(batch)
        times = []
        for _ in range(args.steps):
            common.sync()
            t0 = time.perf_counter()
            step(batch)
            common.sync()
            times.append(time.perf_counter() - t0)
        if gpu:
            row["peak_bytes"], row["peak_kind"] = torch.cuda.max_memory_allocated() - base, "max_memory_allocated"
        else:
            row["peak_bytes"], row["peak_kind"] = rss.stop(), "RSS high-water delta (sampled)"
            known = common.live_tensors()
            with plan.TensorBytesTracker(known) as tracker:
                step(batch)
            row["tracked_bytes"] = plan.storage_bytes(known) - idle_tensors + tracker.peak
    except Exception as err:  # noqa: BLE001  (a case that cannot run here is reported, the others still run)
        if rss is not None:
            rss.stop()
        row["status"] = f"skipped: {type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err) else ''}"
        print(f"  {recipe} {variant} {engine} ckpt={checkpointing}: {row['status']}", file=sys.stderr, flush=True)
        return row
    finally:
        try:
            cleanup()
        finally:
            model = step = batch = None  # noqa: F841
            common.release_memory()
    stats = common.summarize(times)
    step_s = stats[stats["reported"]]
    row.update(step_ms_median=stats["median"] * 1e3, step_ms_min=stats["min"] * 1e3)
    tokens = s.micro_batch * (s.seq_len + s.target_len)
    row.update(
        step_ms=step_s * 1e3,
        tokens_per_s=tokens / step_s,
        tflops=flops["model"] / step_s / 1e12,
        hw_tflops=flops["hardware"] / step_s / 1e12,
        mfu=(flops["model"] / step_s / 1e12 / args.peak_tflops) if args.peak_tflops else None,
    )
    print(
        f"  {recipe} {variant:6s} {engine:14s} ckpt={'on' if checkpointing else 'off'}: {row['step_ms']:.1f} ms, "
        f"{row['tokens_per_s']:.0f} tok/s, peak {common.fmt_bytes(row['peak_bytes'])}, build {row['build_s']:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return row


def bench_recipe(args, recipe: str, default_engine: str, on_row=None) -> dict:
    """Every case of ``recipe``; ``on_row(recipe_result)`` after each (the rows so far), so that a run cut short
    still leaves its finished cases in the result files."""
    cfg = case_config(args, recipe, "tagi", False)
    s = shapes_for(args, cfg)
    counts = plan.count(cfg, args.teacher_rows)
    cases = [(v, default_engine, False) for v in args.variants]
    cases += [("tagi", e, False) for e in args.engines if e != default_engine]
    if not args.no_checkpointing_table:
        cases += [(v, default_engine, True) for v in ("tagi", "lora") if v in args.variants]
    out = {
        "recipe": recipe,
        "overrides": args.overrides,
        "shapes": vars(s),
        "default_engine": default_engine,
        "params": {
            "backbone": counts.backbone,
            "generator": counts.generator,
            "teacher_bank": counts.teacher,
            "sites": len(counts.sites),
        },
        "rows": [],
    }
    for variant, engine, ckpt in cases:  # each in its own process (common.run_child)
        case = {"recipe": recipe, "variant": variant, "engine": engine, "checkpointing": ckpt}
        row = common.run_child(__file__, args.argv, case, common.case_timeout(args, variant))
        out["rows"].append({"variant": variant, "engine": engine, "checkpointing": ckpt, **row})
        if row["status"].startswith("failed"):
            print(f"  {recipe} {variant} {engine} ckpt={ckpt}: {row['status']}", file=sys.stderr, flush=True)
        add_ratios(out["rows"], default_engine)
        if on_row is not None:
            on_row(out)
    return out


def add_ratios(rows: list[dict], default_engine: str) -> None:
    """The ratios of every row against the lora case on the default engine without checkpointing (None until it
    is measured)."""
    base = next(
        (
            r
            for r in rows
            if r["variant"] == "lora"
            and r["engine"] == default_engine
            and not r["checkpointing"]
            and r["status"] == "ok"
        ),
        None,
    )
    for r in rows:
        for key, ratio in (
            ("tokens_per_s", "speed_vs_lora"),
            ("peak_bytes", "memory_vs_lora"),
            ("model_flops", "flops_vs_lora"),
        ):
            ok = base is not None and r["status"] == "ok" and base[key]
            r[ratio] = r[key] / base[key] if ok else None
        ok = r["flops_vs_lora"] is not None and r["speed_vs_lora"]
        r["time_per_flop_vs_lora"] = 1.0 / r["speed_vs_lora"] / r["flops_vs_lora"] if ok else None


def deepspeed_usable() -> tuple[bool, str]:
    try:
        from tagi_ds.runtime import dist

        dist.init()
    except Exception as err:  # noqa: BLE001
        return False, f"{type(err).__name__}: {err}"
    return True, ""


# -- output -----------------------------------------------------------------------------------------------
FLOP_NOTE = (
    "FLOPs per step: frozen base 4N/token (fwd 2N + input-grads 2N, no weight grads) + attention "
    "3x(4*Lk*H*dk)/token/layer + adapters 6*r*(d_in+d_out)/token/site + generator 3x fwd per task + "
    "instruction encoding 2N_enc/instruction token + teacher forward 2N/teacher token (KL); "
    "checkpointing recompute only in hw TFLOP/s"
)


def _ratio(row: dict, key: str) -> str:
    return "—" if row.get(key) is None else f"{row[key]:.2f}"


def to_markdown(result: dict) -> str:
    cpu = result["device_kind"] == "cpu"
    lines = common.md_head(
        "Train step (stage 2)",
        result,
        "**CPU results**: tiny shapes on a CPU check the harness and compare variants relative to each "
        "other; they are not GPU numbers. Memory: RSS high-water delta (sampled) and the tracked tensor "
        "peak (planner definition). DeepSpeed engines allocate their reduce bucket (z2: and all-gather "
        "bucket) up front, 5e7 elements each (ds_configs): in the tracked peak, mostly never resident in "
        f"RSS. {common.threads_text()}; host load average {result['host_load_start']} at "
        f"the start, {result['host_load_end']} at the end (a shared host: timings are noisy).",
    )
    v = result["versions"]
    lines += [
        f"torch {v['torch']}, deepspeed {v['deepspeed']}, transformers {v['transformers']}, peft {v['peft']}; "
        f"{result['steps']} timed steps ({common.timing_stat()}) after {result['warmup']} warm-up; peak for MFU: "
        f"{result['peak_tflops'] or 'n/a'} TFLOP/s; ZeRO-3 JSON: {result.get('z3_json', 'ds_configs/z3.json')}",
        "",
        FLOP_NOTE,
        "",
    ]
    if result.get("partial"):
        lines += ["**Partial**: written after each finished case; the run stopped before the last one.", ""]
    for rec in result["recipes"]:
        sh = rec["shapes"]
        lines += [
            f"## {rec['recipe']}{' ' + ' '.join(rec['overrides']) if rec['overrides'] else ''}",
            "",
            f"B={sh['micro_batch']} examples / K={sh['tasks']} tasks, input {sh['seq_len']}, target "
            f"{sh['target_len']}, instruction {sh['instr_len']}; backbone {rec['params']['backbone']:,} "
            f"params, generator {rec['params']['generator']:,}, teacher bank {rec['params']['teacher_bank']:,}"
            f"; default engine {rec['default_engine']}; ratios vs lora on {rec['default_engine']}",
            "",
        ]
        mem = "peak RSS Δ" if cpu else "peak alloc"
        head = (
            f"| case | engine | ckpt | op | step ms | tokens/s | x lora | FLOPs x lora | s/FLOP x lora | TFLOP/s "
            f"| hw TFLOP/s | MFU | {mem} | x lora |"
        )
        if cpu:
            head += " tracked peak |"
        head += " build s |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rec["rows"]:
            ck = "on" if r["checkpointing"] else "off"
            if r["status"] != "ok":
                lines.append(
                    f"| {r['variant']} | {r['engine']} | {ck} | {r['status']} |" + " |" * (head.count("|") - 5)
                )
                continue
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            cells = [
                r["variant"],
                r["engine"],
                ck,
                r.get("adapter_op", "—"),
                f"{r['step_ms']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                _ratio(r, "speed_vs_lora"),
                _ratio(r, "flops_vs_lora"),
                _ratio(r, "time_per_flop_vs_lora"),
                f"{r['tflops']:.3g}",
                f"{r['hw_tflops']:.3g}",
                mfu,
                common.fmt_bytes(r["peak_bytes"]),
                _ratio(r, "memory_vs_lora"),
            ]
            if cpu:
                cells.append(common.fmt_bytes(r.get("tracked_bytes")))
            cells.append("—" if r.get("build_s") is None else f"{r['build_s']:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def run_one(args) -> None:
    """A child's work (``--_case``): one case, its row to the parent's file."""
    import json

    case = json.loads(args.case)
    c = (case["recipe"], case["variant"], case["engine"], case["checkpointing"])
    if not torch.cuda.is_available() and not args.smoke:
        # One unrecorded pass first: lazy imports, DeepSpeed's first init and allocator growth otherwise land
        # in the case's RSS delta and timing (--smoke checks the harness, not the numbers).
        run_case(argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1}), *c)
    common.write_row(case, run_case(args, *c))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        return run_one(args)
    ds_ok, why = deepspeed_usable()
    engines = [e for e in args.engines if e == "torch" or ds_ok]
    skipped_engines = [] if ds_ok else [f"{e}: DeepSpeed could not start ({why})" for e in args.engines if e != "torch"]
    default_engine = "z3" if ds_ok and "z3" in args.engines else engines[0] if engines else "torch"
    args.engines = engines or ["torch"]
    result = {
        "benchmark": "train_step",
        "device": common.device_name(),
        "device_kind": common.device_kind(),
        "device_label": common.device_label(),
        "date": datetime.date.today().isoformat(),
        "versions": common.versions(),
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": args.peak_tflops,
        "smoke": args.smoke,
        "flop_formula": FLOP_NOTE,
        "skipped_engines": skipped_engines,
        "cpu_threads": torch.get_num_threads(),
        "host_load_start": common.host_load(),
        "recipes": [],
        "z3_json": str(args.deepspeed) if args.deepspeed else "the recipe's (z3.json; tiny: z3_tiny.json)",
    }

    def table() -> str:
        md = to_markdown(result)
        return md + ("\n" + "\n".join(f"- skipped {s}" for s in skipped_engines) + "\n" if skipped_engines else "")

    def save_partial(rec: dict) -> None:  # finished cases on disk as they come (a GPU call can be cut short)
        if not args.no_save:
            partial = {
                **result,
                "recipes": [*result["recipes"], rec],
                "host_load_end": common.host_load(),
                "partial": True,
            }
            common.save_results(
                args.out_dir,
                common.result_name("train_step", args.tag),
                partial,
                to_markdown(partial),
                default=_json,
                quiet=True,
            )

    for recipe in args.recipe:
        print(f"{recipe}:", file=sys.stderr, flush=True)
        result["recipes"].append(bench_recipe(args, recipe, default_engine, save_partial))
    result["host_load_end"] = common.host_load()
    common.emit(args, "train_step", result, table(), default=_json)
    return result


def _json(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


if __name__ == "__main__":
    main()
