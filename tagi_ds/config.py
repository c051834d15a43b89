"""One typed config tree for every stage, launcher and benchmark.

Parsed once (recipe -> ``--set`` overrides -> flags) into these dataclasses and handed down; nothing
deeper reads argparse, env vars or globals. Unknown keys and ill-typed values raise ``ConfigError``
naming the key and the value.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the value."""


@dataclass
class ModelConfig:
    """The frozen backbone and which of its projections get adapters."""

    arch: str = "t5"  # t5 (encoder-decoder) | llama (decoder-only)
    model_name_or_path: str | None = None  # local HF directory; None = built-in shape, random init
    vocab_size: int = 1024
    d_model: int = 64
    d_ff: int = 128
    d_kv: int = 16  # T5 per-head size
    num_layers: int = 2
    num_decoder_layers: int = 2  # T5 only
    num_heads: int = 4
    num_kv_heads: int = 4  # LLaMA grouped-query attention
    feed_forward_proj: str = "gated-gelu"  # T5: relu | gated-gelu (T5-LM-Adapt / v1.1)
    max_position_embeddings: int = 2048  # LLaMA
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs the flash-attn extra)
    dtype: str = "float32"  # backbone weights: float32 | bfloat16 | float16
    # Projection kinds to adapt. T5: q k v o wi wo (wi_0 wi_1 for gated FFN); LLaMA: q k v o gate up down.
    adapted: list[str] = field(default_factory=lambda: ["q", "v"])
    # T5 stacks to adapt: encoder (self-attn, FFN), decoder (self-attn, FFN), cross (enc-dec attention).
    adapted_stacks: list[str] = field(default_factory=lambda: ["encoder", "decoder", "cross"])
    # Regexes of backbone parameter names to train anyway (default: none; the backbone is frozen).
    trainable: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False  # per-layer, non-reentrant, over the adapted backbone
    adapter_impl: str = "auto"  # tagi_ds.ops.lora_delta impl: auto | torch | triton
    init_seed: int = 0  # random-init backbones (no model_name_or_path): the same weights in every stage


@dataclass
class HypernetConfig:
    """Instruction encoder pooling + the generator of LoRA factors."""

    rank: int = 8
    alpha: float = 16.0  # generated delta scale s = alpha / rank
    hidden: int = 128  # generator MLP width
    site_dim: int = 32  # learned site embedding (layer x projection kind)
    generator: str = "shared"  # shared (one trunk + one head per projection kind) | per_layer
    pooling: str = "mean"  # mean (masked, last layer) | first_last (masked mean of first and last)
    fusion: bool = True  # T5: decoder cross-attends to [instruction ; input] encodings
    fusion_marker: bool = False  # fusion: add a learned vector to the instruction states (tells them from input)
    checkpoint_encoder: bool = True  # checkpoint instruction encoding when it needs gradients
    dropout: float = 0.0


@dataclass
class TeacherConfig:
    """Stage-0 teacher LoRA bank: one adapter per task (or per category)."""

    rank: int = 8
    alpha: float = 16.0
    granularity: str = "task"  # task | category


@dataclass
class LossConfig:
    """Stage-2 objective: CE + kl_weight * KL_T(teacher || student) + param_weight * param alignment."""

    kl_weight: float = 1.0  # lambda_1
    param_weight: float = 1.0  # lambda_2
    temperature: float = 2.0
    param_align: str = "delta"  # delta (effective s*B@A) | factors (A<->A, s*B<->s*B)


@dataclass
class DataConfig:
    """Where examples come from and how they are tokenised and batched."""

    spec: str = "builtin"  # builtin | sni:DIR | p3:DIR | text:FILE_OR_DIR
    tokenizer: str | None = None  # local tokenizer dir; None = the backbone's dir, or built-in sentencepiece
    setting: str = "def"  # def | def_pos (Definition + num_pos positive examples)
    num_pos: int = 2
    max_instances_per_task: int = 100
    categories: list[str] = field(default_factory=list)  # restrict to these categories (empty = all)
    tasks: list[str] = field(default_factory=list)  # restrict to these task names (empty = all)
    exclude_tasks: list[str] = field(default_factory=list)  # drop these task names (e.g. a validation split)
    english_only: bool = True
    max_instruction_length: int = 128
    max_source_length: int = 128
    max_target_length: int = 32
    tasks_per_batch: int = 2  # k tasks per micro-batch
    examples_per_task: int = 4  # m examples per task
    builtin_seed: int = 0
    pretrain_length: int = 96  # a|b|c split window (tokens) for stage 1
    num_workers: int = 0
    corpus: str | None = None  # stage-1 text: builtin | text:FILE_OR_DIR; None = data.spec if text:, else builtin
    streaming: bool = False  # stage 1: stream the corpus files in order instead of holding all windows in memory
    sample_variants: bool = True  # train: a Definition paraphrase per task and an accepted output per example


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and guards."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.02
    max_steps: int = 100
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    frozen_backbone: str = "auto"  # ZeRO-3: auto | replicated | partitioned (tagi_ds.train.engine.backbone_placement)
    save_steps: int = 50
    keep_last: int = 2
    log_steps: int = 1
    stop_after: int = 0  # end this session after N steps (checkpointed; schedule still spans max_steps); 0 = off
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    seed: int = 42
    tensorboard: bool = False
    # Fault injection for the guard tests: "nan@STEP:RANK" (loss becomes NaN) or "raise@STEP:RANK".
    inject_fault: str = ""


@dataclass
class TagiConfig:
    """The root of the tree; ``recipe`` names where the defaults came from."""

    recipe: str = "tiny"
    mode: str = "tagi"  # tagi | concat | no_instruction
    model: ModelConfig = field(default_factory=ModelConfig)
    hypernet: HypernetConfig = field(default_factory=HypernetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TagiConfig:
        _choice("mode", self.mode, ("tagi", "concat", "no_instruction"))
        _choice("model.arch", self.model.arch, ("t5", "llama"))
        _choice("model.dtype", self.model.dtype, ("float32", "bfloat16", "float16"))
        _choice("model.attn_implementation", self.model.attn_implementation,
                ("sdpa", "eager", "flash_attention_2"))
        _choice("model.adapter_impl", self.model.adapter_impl, ("auto", "torch", "triton"))
        _choice("hypernet.generator", self.hypernet.generator, ("shared", "per_layer"))
        _choice("hypernet.pooling", self.hypernet.pooling, ("mean", "first_last"))
        _choice("teacher.granularity", self.teacher.granularity, ("task", "category"))
        _choice("loss.param_align", self.loss.param_align, ("delta", "factors"))
        _choice("data.setting", self.data.setting, ("def", "def_pos"))
        _choice("train.precision", self.train.precision, ("auto", "fp32", "bf16", "fp16"))
        _choice("train.frozen_backbone", self.train.frozen_backbone, ("auto", "replicated", "partitioned"))  # ZeRO-3
        for key, value in (("hypernet.rank", self.hypernet.rank), ("teacher.rank", self.teacher.rank),
                           ("loss.temperature", self.loss.temperature), ("train.max_steps", self.train.max_steps),
                           ("data.tasks_per_batch", self.data.tasks_per_batch),
                           ("data.examples_per_task", self.data.examples_per_task)):
            if value <= 0:
                raise ConfigError(f"{key} must be > 0, got {value!r}")
        if self.hypernet.fusion and self.model.arch == "llama" and self.mode == "tagi":
            raise ConfigError("hypernet.fusion=true is T5-only (LLaMA has no encoder to fuse into); "
                              "set hypernet.fusion=false")
        return self


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _coerce(key: str, typ: Any, value: Any) -> Any:
    """Turn ``value`` (from JSON or a ``--set`` string) into ``typ``, or raise naming ``key``."""
    origin, args = get_origin(typ), get_args(typ)
    if args and type(None) in args:  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        typ = next(a for a in args if a is not type(None))
        origin, args = get_origin(typ), get_args(typ)
    try:
        if origin is list:
            if isinstance(value, str):
                value = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
            if not isinstance(value, list):
                raise TypeError
            return [_coerce(key, args[0], v) for v in value]
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if typ is str:
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError, json.JSONDecodeError):
        pass
    else:
        raise ConfigError(f"config key {key!r} has unsupported type {typ!r}")
    raise ConfigError(f"config key {key!r} expects {getattr(typ, '__name__', typ)}, got {value!r}")


def _update(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; got {value!r}")
            _update(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, _coerce(path, hints[key], value))


def from_dict(data: dict[str, Any], base: TagiConfig | None = None) -> TagiConfig:
    """Overlay a (possibly partial) nested dict onto ``base`` (default: a fresh TagiConfig)."""
    cfg = copy.deepcopy(base) if base is not None else TagiConfig()
    _update(cfg, data)
    return cfg


def apply_overrides(cfg: TagiConfig, overrides: list[str]) -> TagiConfig:
    """Apply ``key.sub=value`` strings (``--set``); unknown keys and bad values raise ConfigError."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        path, value = item.split("=", 1)
        *parents, leaf = path.strip().split(".")
        nested: dict[str, Any] = {leaf: value}
        for p in reversed(parents):
            nested = {p: nested}
        _update(cfg, nested)
    return cfg
