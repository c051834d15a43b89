"""DeepSpeed glue: read the JSON, inject what tagi-ds's config owns, build the engine.

The DeepSpeed JSON holds only DeepSpeed settings (ZeRO stage, buckets, offload). Batch size, accumulation,
clipping, precision, optimizer and schedule come from the TagiConfig and are injected in ``inject``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from tagi_ds.config import ConfigError, TagiConfig
from tagi_ds.recipes import RECIPES

DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[2] / "ds_configs" / "z3.json"
# The tiny recipes' tensors are all below z3.json's stage3_param_persistence_threshold (1e5 elements), so under it
# ZeRO-3 would keep the whole tiny backbone on every rank: they default to a copy with threshold 0, so that the
# embedded default run partitions its frozen backbone as a real one is.
TINY_DS_CONFIG = DEFAULT_DS_CONFIG.with_name("z3_tiny.json")
# Every tiny* recipe (read from the recipe table, so a new tiny recipe cannot be left on z3.json).
TINY_RECIPES = tuple(name for name in RECIPES if name.startswith("tiny"))


def default_ds_config(recipe: str) -> Path:
    """The DeepSpeed JSON a run of ``recipe`` uses when ``--deepspeed`` is not given."""
    return TINY_DS_CONFIG if recipe in TINY_RECIPES else DEFAULT_DS_CONFIG


# Keys the TagiConfig owns: a DeepSpeed JSON that sets them would silently disagree with config.json.
OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "bf16",
    "fp16",
)


def load_ds_json(path: str | Path | None) -> dict[str, Any]:
    """The DeepSpeed JSON at ``path`` (default ``ds_configs/z3.json``): an object of DeepSpeed settings only,
    no ``"auto"``, none of the keys the TagiConfig owns. The full schema check is ``runtime.preflight``'s."""
    p = Path(path) if path else DEFAULT_DS_CONFIG
    where = f"--deepspeed {str(p)!r}"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"{where}: no such file") from err
    except IsADirectoryError as err:
        raise ConfigError(f"{where}: is a directory, not a JSON file") from err
    except OSError as err:
        raise ConfigError(f"{where}: cannot read it ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: invalid JSON at line {err.lineno}: {err.msg}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object ({type(data).__name__})")
    _reject_auto(data, str(p))
    owned = [k for k in OWNED_KEYS if k in data]
    if owned:
        raise ConfigError(f"{where}: key {owned[0]!r} comes from the tagi-ds config (use --set train.* instead)")
    return data


def _reject_auto(node: Any, where: str, path: str = "") -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _reject_auto(v, where, f"{path}.{k}" if path else k)
    elif node == "auto":
        raise ConfigError(f'--deepspeed {where!r}: {path} is "auto"; only HF\'s Trainer resolves that — give a value')


def precision(cfg: TagiConfig) -> str:
    """The precision that runs: ``auto`` is bf16 on CUDA and fp32 on CPU (DeepSpeed's CPU path is fp32)."""
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if p in ("bf16", "fp16") and not torch.cuda.is_available():
        raise ConfigError(f"train.precision={p} needs a CUDA GPU; this machine runs fp32 (train.precision=fp32)")
    return p


def inject(ds: dict[str, Any], cfg: TagiConfig, world_size: int) -> dict[str, Any]:
    """The final DeepSpeed dict: ``ds`` plus batch, accumulation, clipping and precision from ``cfg``."""
    out = copy.deepcopy(ds)
    micro = cfg.data.tasks_per_batch * cfg.data.examples_per_task
    prec = precision(cfg)
    out.update(
        {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": cfg.train.grad_accum,
            "train_batch_size": micro * cfg.train.grad_accum * world_size,
            "gradient_clipping": cfg.train.grad_clip,
            "bf16": {"enabled": prec == "bf16"},
            "fp16": {"enabled": prec == "fp16", "initial_scale_power": 16},
            "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's fused Adam needs compiled ops
        }
    )
    out.setdefault("steps_per_print", 10**9)
    out.setdefault("wall_clock_breakdown", False)
    return out


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def backbone_init(ds: dict[str, Any]):
    """While building the backbone under ZeRO-3, let transformers partition it as it is created
    (HF's DeepSpeed integration wraps model construction and loading in ``deepspeed.zero.Init``)."""
    if zero_stage(ds) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds = HfDeepSpeedConfig(ds)  # noqa: F841  (the integration holds a weak reference while alive)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


# Above this size a random-init backbone is a throughput-benchmark stand-in: not worth a second, plain build.
PLAIN_INIT_LIMIT = 1_000_000_000


class Placement(NamedTuple):
    """Where a run keeps its frozen backbone, and why (``tagi_ds.plan.for_training`` decides for training):
    ``partitioned`` (ZeRO-3 owns it, 1/W per rank), ``replicated`` (ZeRO-3 run, the backbone whole on every rank,
    outside DeepSpeed) or ``whole`` (no ZeRO-3: every rank holds it anyway)."""

    where: Literal["partitioned", "replicated", "whole"]
    why: str


def inference_placement(ds: dict[str, Any]) -> Placement:
    """Evaluation's and export's backbone: built as ZeRO-3 runs built it (partitioned under ZeRO-3), so a built-in
    random-init backbone is the one the artifact was trained with."""
    return Placement(
        "partitioned" if zero_stage(ds) == 3 else "whole", "evaluation and export build it as ZeRO-3 runs did"
    )


def build_backbone(
    cfg: TagiConfig,
    ds: dict[str, Any],
    special_ids: dict[str, int],
    placement: Placement,
    device: torch.device | None = None,
) -> torch.nn.Module:
    """The backbone for a run under ``ds``, kept where ``placement`` says: partitioned as it is built under ZeRO-3,
    else built plainly (``build_engine`` keeps a replicated one out of DeepSpeed). With ``device`` (training,
    serving, the one-process benchmarks) a large random-init stand-in is built directly there (``_init_device``);
    else, and for every other backbone, on the CPU.

    ``deepspeed.zero.Init`` draws random weights differently from plain construction, so a random-init
    backbone (no ``model_name_or_path``) is overwritten with the plain build's values: a hypernet trained
    under z3 then evaluates on the same backbone under z2, in one process, or in the tests.
    """
    from tagi_ds import model as tagi_model
    from tagi_ds.runtime import dist

    if placement.where != "partitioned":
        with torch.device(_init_device(cfg, special_ids, device) if device is not None else "cpu"):
            return tagi_model.build_backbone(cfg, special_ids)
    with backbone_init(ds):
        backbone = tagi_model.build_backbone(cfg, special_ids)
    params = dict(backbone.named_parameters())
    if cfg.model.model_name_or_path or not any(hasattr(p, "ds_id") for p in params.values()):
        return backbone
    if sum(p.ds_numel for p in params.values()) > PLAIN_INIT_LIMIT:
        return backbone
    import deepspeed

    plain = dict(tagi_model.build_backbone(cfg, special_ids).named_parameters())
    for name, p in params.items():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if dist.is_main():
                p.data.copy_(plain[name].data)
    return backbone


def _init_device(cfg: TagiConfig, special_ids: dict[str, int], device: torch.device) -> torch.device:
    """Where a backbone that is not partitioned is built: a random-init one above PLAIN_INIT_LIMIT (a benchmark
    stand-in) directly on ``device``, which takes seconds instead of minutes on the CPU; anything else on
    the CPU, whose random init every other build (partitioned, evaluation) reproduces."""
    from tagi_ds import model as tagi_model

    if cfg.model.model_name_or_path:
        return torch.device("cpu")
    with torch.device("meta"):
        n = sum(p.numel() for p in tagi_model.build_backbone(cfg, special_ids).parameters())
    return device if n > PLAIN_INIT_LIMIT else torch.device("cpu")


def lr_lambda(cfg: TagiConfig):
    warmup = max(1, int(math.ceil(cfg.train.warmup_ratio * cfg.train.max_steps)))
    total = max(cfg.train.max_steps, warmup + 1)

    def fn(step: int) -> float:  # linear warmup, then linear decay to 10% of the peak
        if step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1.0 - 0.9 * (step - warmup) / (total - warmup))

    return fn


def place(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Put everything ``module`` holds on ``device``: every buffer, and every parameter DeepSpeed does not own.

    The one place that does it, whatever the engine. ``deepspeed.initialize`` moves the module to its device
    only below ZeRO-3; under ZeRO-3 it partitions parameters (their shards live where the config says: the
    device, or host memory with offload) and leaves buffers where they were built, e.g. the generator's site
    indices on the CPU, which then index a CUDA embedding. Parameters with a ``ds_id`` are DeepSpeed's and
    stay as they are. The teacher bank is not a submodule (by design): ``keep_teacher`` decides where it lives.
    """
    for m in module.modules():
        for name, buf in m._buffers.items():
            if buf is not None and buf.device != device:
                m._buffers[name] = buf.to(device)
        for p in m._parameters.values():
            if p is not None and not hasattr(p, "ds_id") and p.device != device:
                # In place: an optimizer that already holds ``p`` keeps holding the moved parameter.
                torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().to(device), p.requires_grad))
    return module


class WithoutBackbone(torch.nn.Module):
    """What DeepSpeed is given when the frozen backbone is replicated under ZeRO-3: the model's other children
    (generator or bank) under their own names, so checkpoints hold the same keys either way, and the model's
    forward. The backbone is no submodule of it: DeepSpeed never partitions, hooks, casts or gathers it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)
        for name, child in model.named_children():
            if name != "backbone":
                self.add_module(name, child)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def train(self, mode: bool = True) -> WithoutBackbone:
        self.model.train(mode)  # the backbone's dropout follows the engine's mode too
        return super().train(mode)


def train_dtype(ds: dict[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed trains in under the final dict ``ds`` (``inject``): bf16, fp16 or fp32."""
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if ds.get("fp16", {}).get("enabled") else torch.float32


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast ``module``'s floating-point parameters that DeepSpeed does not own (no ``ds_id``) to ``dtype``, in place
    (an optimizer holding them keeps holding them), and no buffer: ``module.to(dtype)`` would also cast the rotary
    embeddings' fp32 ``inv_freq`` (``backbones.decoder.fp32_rotary``), which DeepSpeed itself leaves alone."""
    for p in module.parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return module


# The frozen teacher bank stays on the GPU, in the training dtype, when it is at most this share of the GPU's
# memory and of what is free once the engine is built (llama-7b's 1B-value bank in bf16: 2 GiB, 2.5% of an H100).
# Else it stays in host memory and each step copies its rows through one pinned buffer (``LoraBank.keep``).
TEACHER_ON_GPU_SHARE = 0.05
TEACHER_OF_FREE_SHARE = 0.25


class TeacherHome(NamedTuple):
    """Where the frozen teacher bank is kept for the steps (``keep_teacher``), and why."""

    device: torch.device
    why: str


def teacher_home(nbytes: int, device: torch.device) -> TeacherHome:
    """Where a frozen teacher bank of ``nbytes`` is kept for steps on ``device``, and why."""
    if device.type != "cuda":
        return TeacherHome(device, f"steps run on the {device.type}")
    free, total = torch.cuda.mem_get_info(device)
    if nbytes <= TEACHER_ON_GPU_SHARE * total and nbytes <= TEACHER_OF_FREE_SHARE * free:
        return TeacherHome(
            device,
            f"{nbytes / 2**30:.2f} GiB <= {TEACHER_ON_GPU_SHARE:.0%} of the GPU's memory and "
            f"{TEACHER_OF_FREE_SHARE:.0%} of the {free / 2**30:.1f} GiB free",
        )
    return TeacherHome(
        torch.device("cpu"),
        f"rows copied through a pinned buffer: {nbytes / 2**30:.2f} GiB > "
        f"{TEACHER_ON_GPU_SHARE:.0%} of the GPU's memory or {TEACHER_OF_FREE_SHARE:.0%} "
        f"of the {free / 2**30:.1f} GiB free",
    )


def keep_teacher(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> TeacherHome | None:
    """The model's frozen teacher bank (if any) in the training dtype, on ``device`` when ``teacher_home`` says so,
    else in host memory with a staging buffer for a batch's rows (``LoraBank.keep``); returns that choice (None:
    no bank)."""
    teacher = getattr(model, "teacher", None)
    if teacher is None:
        return None
    nbytes = sum(p.numel() for p in teacher.parameters()) * torch.empty(0, dtype=dtype).element_size()
    home = teacher_home(nbytes, device)
    teacher.keep(dtype, home.device, max_rows=model.cfg.data.tasks_per_batch)
    return home


MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_muon_eager() -> None:
    """Import DeepSpeed's Muon optimizer module with its functions left eager, before ``deepspeed.initialize``.

    ZeRO's optimizer check and the ZeRO-3 optimizer import that module at every engine start (only to ask whether
    the optimizer is Muon), and its three Newton-Schulz functions are decorated with ``torch.compile`` at import,
    which imports torch's inductor: ~1.5 s of CPU per rank at every start (a fifth of a tiny run's rank on CPU;
    the test suite starts ~100 such ranks). The optimizer here is always torch AdamW, so Muon never runs: its
    functions are decorated with DeepSpeed's own ``dummy_decorator`` (what DeepSpeed uses on a torch without
    ``torch.compile``) for the import, and everything else is as DeepSpeed leaves it. A DeepSpeed without these
    names imports the module its own way."""
    if MUON in sys.modules:
        return
    try:
        from deepspeed.runtime import compiler
    except ImportError:
        return
    real, dummy = getattr(compiler, "compile", None), getattr(compiler, "dummy_decorator", None)
    if real is None or dummy is None:
        return
    compiler.compile = lambda: dummy
    try:
        importlib.import_module(MUON)
    except ImportError:
        pass  # DeepSpeed's own check then finds no Muon, as it would
    finally:
        compiler.compile = real


def build_engine(model: torch.nn.Module, cfg: TagiConfig, ds: dict[str, Any], placement: Placement):
    """``deepspeed.initialize`` with torch AdamW over the trainable parameters and the LR schedule.

    Every parameter DeepSpeed does not own yet is cast to the training dtype here, whatever the placement:
    DeepSpeed casts the module it is given only when none of its parameters is ZeRO-3-partitioned already
    (``is_zero_init_model``), so with a partitioned backbone the hypernetwork (or a LoRA bank) would train in fp32,
    and with a replicated one in bf16. Parameters only: buffers stay as built (RoPE's ``inv_freq`` in fp32).

    A replicated frozen backbone (``placement``, as ``build_backbone`` built it) stays out of DeepSpeed: the engine
    wraps ``WithoutBackbone(model)``, the backbone is placed on the engine's device, and ``memory_efficient_linear``
    is off (it replaces ``F.linear`` process-wide with an autograd function that only partitioned weights need).
    The frozen teacher bank, outside DeepSpeed too, is kept by the caller (``keep_teacher``, on the engine's device).
    """
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, betas=(0.9, 0.999), eps=1e-8
    )
    schedule = lr_lambda(cfg)
    import_muon_eager()
    module = model
    cast_parameters(model, train_dtype(ds))
    if zero_stage(ds) == 3 and placement.where == "replicated":
        ds = copy.deepcopy(ds)
        ds["zero_optimization"]["memory_efficient_linear"] = False
        module = WithoutBackbone(model)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    place(model, engine.device)
    if zero_stage(ds) == 3 and kept_whole(model):
        keep_whole(engine, kept_whole(model))
    return engine


def inference_engine(module: torch.nn.Module, ds: dict[str, Any]):
    """ZeRO-3 inference: a DeepSpeed engine without optimizer around ``module`` (it gathers the partitioned
    backbone layer by layer), in eval mode, with everything it holds on the engine's device."""
    import deepspeed

    eng, _, _, _ = deepspeed.initialize(model=module, config=ds)
    place(module, eng.device)
    eng.eval()  # DeepSpeedEngine.eval returns None, unlike nn.Module.eval
    return eng


def kept_whole(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What ZeRO-3 keeps gathered on every rank: the hypernetwork, or the baselines' one-row shared LoRA (both small
    and used whole at every step; a teachers-stage bank, one row per task, stays partitioned)."""
    source = getattr(model, "source", None)  # a TagiModel's stages.AdapterSource says
    return source.kept_whole(model) if source is not None else []


def describe_partitioning(
    model: torch.nn.Module, world_size: int, placement: Placement, teacher: TeacherHome | None = None
) -> str:
    """One line on where parameters live under ZeRO-3 (empty without it): how much of the partitioned ones
    this rank holds (``ds_tensor``: its padded shard), and what stays whole on every rank; ``placement`` and
    ``teacher`` are where the backbone and the teacher bank were put (``build_backbone``, ``keep_teacher``)."""
    params = list(model.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return ""
    if placement.where == "replicated":
        n = sum(p.numel() for p in model.backbone.parameters())
        return (
            f"ZeRO-3: frozen backbone {n:,} parameters replicated, whole on each of {world_size} rank(s), outside "
            f"ZeRO ({placement.why}); hypernetwork/LoRA gradients and optimizer state "
            "partitioned"
        )
    hyper = {id(p) for p in kept_whole(model)}
    parted = [p for p in params if not p.ds_persist]
    split = sum(p.ds_numel for p in parted)
    held = sum(p.ds_tensor.numel() for p in parted)
    small = sum(p.ds_numel for p in params if p.ds_persist and id(p) not in hyper)
    whole = sum(p.ds_numel for p in params if id(p) in hyper)
    line = (
        f"ZeRO-3: {split:,} parameters partitioned across {world_size} rank(s), {held:,} held by each rank; "
        f"{small:,} small ones kept whole (stage3_param_persistence_threshold); "
        f"{model.source.whole or 'nothing else'} {whole:,} whole on "
        "every rank"
    )
    if (bank := getattr(model, "teacher", None)) is not None:
        home = teacher or TeacherHome(torch.device("cpu"), "not kept by keep_teacher")
        where = "on the GPU" if home.device.type == "cuda" else "in host memory"
        line += f"; teacher bank {sum(p.numel() for p in bank.parameters()):,} {where}, outside ZeRO ({home.why})"
    return line + f"; backbone partitioned: {placement.why}"


def keep_whole(engine, params: list[torch.nn.Parameter]) -> None:
    """ZeRO-3: keep ``params`` gathered on every rank (the hypernetwork is small and runs once per step).

    DeepSpeed keeps "persistent" parameters whole and re-gathers them after each optimizer step; it picks
    them by size at init. We add the generator's to that list; its fp32 master weights and Adam state stay
    partitioned. (``set_z3_leaf_modules`` would gather it in one collective per use instead, but breaks on
    the CPU accelerator in deepspeed 0.19.8: zero_grad calls record_stream on CPU gradients.)
    """
    offload = engine.optimizer.parameter_offload
    new = [p for p in params if not getattr(p, "ds_persist", False)]
    for p in new:
        p.ds_persist = True
    offload.persistent_parameters.extend(new)
    if params:
        params[0].all_gather(params)  # only those not yet available are fetched
