"""One typed config tree for every stage, launcher and benchmark.

Parsed once (recipe -> ``--set`` overrides -> flags) into these dataclasses and handed down; nothing
deeper reads argparse, env vars or globals. Unknown keys and ill-typed values raise ``ConfigError``
naming the key and the value.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the value."""


@dataclass(frozen=True)
class Rule:
    """What a valid value of one config field is. Each section declares its rules next to its fields
    (``RULES``: field name -> Rule); ``TagiConfig.validate`` checks them all and names key and value."""

    test: Callable[[Any], bool]
    text: str  # "> 0", "one of t5, llama": the error says "<key>: must be <text> (<value>)"


def one_of(*allowed: str) -> Rule:
    return Rule(lambda v: v in allowed, f"one of {', '.join(allowed)}")


def above(lo: float) -> Rule:
    return Rule(lambda v: v > lo, f"> {lo}")


def at_least(lo: float) -> Rule:
    return Rule(lambda v: v >= lo, f">= {lo}")


def within(lo: float, hi: float, hi_open: bool = False) -> Rule:
    if hi_open:
        return Rule(lambda v: lo <= v < hi, f"in [{lo}, {hi})")
    return Rule(lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")


def matches(pattern: str, text: str) -> Rule:
    return Rule(lambda v: re.fullmatch(pattern, v) is not None, text)


POSITIVE = above(0)
NON_NEGATIVE = at_least(0)
SEED = within(0, 2**32 - 1)  # numpy's seed range
FAULT = matches(r"|(nan|raise)@\d+(-\d+)?:\d+", "empty, nan@STEP[-LAST]:RANK or raise@STEP:RANK")

DECODER_ONLY = ("llama", "mistral", "qwen2", "gemma2")  # model.arch of the decoder-only families (HF model_type)


@dataclass
class ModelConfig:
    """The frozen backbone and which of its projections get adapters."""

    RULES: ClassVar[dict[str, Rule]] = {
        "arch": one_of("t5", *DECODER_ONLY), "vocab_size": POSITIVE, "d_model": POSITIVE, "d_ff": POSITIVE,
        "d_kv": POSITIVE, "num_layers": POSITIVE, "num_decoder_layers": POSITIVE, "num_heads": POSITIVE,
        "num_kv_heads": POSITIVE, "max_position_embeddings": POSITIVE, "head_dim": NON_NEGATIVE,
        "rope_theta": POSITIVE, "rope_scaling": NON_NEGATIVE, "sliding_window": NON_NEGATIVE,
        "feed_forward_proj": one_of("relu", "gelu", "gated-relu", "gated-gelu", "gated-silu"),
        "attn_implementation": one_of("sdpa", "eager", "flash_attention_2"),
        "dtype": one_of("float32", "bfloat16", "float16"), "adapter_impl": one_of("auto", "torch", "triton"),
        "init_seed": SEED,
    }

    arch: str = "t5"  # t5 (encoder-decoder) | llama | mistral | qwen2 | gemma2 (decoder-only; Llama-1/2/3 are llama)
    model_name_or_path: str | None = None  # local HF directory; None = built-in shape, random init
    vocab_size: int = 1024
    d_model: int = 64
    d_ff: int = 128
    d_kv: int = 16  # T5 per-head size
    num_layers: int = 2
    num_decoder_layers: int = 2  # T5 only
    num_heads: int = 4
    num_kv_heads: int = 4  # LLaMA grouped-query attention
    head_dim: int = 0  # decoder-only per-head size; 0 = d_model // num_heads (Gemma-2: 256)
    rope_theta: float = 10000.0  # decoder-only RoPE base (Llama-3: 5e5; Qwen2.5, Mistral v0.3: 1e6)
    rope_scaling: float = 0.0  # llama: Llama-3.1-style RoPE scaling factor (3.1: 8, 3.2: 32); 0 = none
    sliding_window: int = 0  # mistral / qwen2 / gemma2: sliding-window attention width in tokens; 0 = none
    tie_word_embeddings: bool = False  # decoder-only: LM head shares the input embedding (Gemma-2, Llama-3.2 1B)
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

    RULES: ClassVar[dict[str, Rule]] = {
        "rank": POSITIVE, "alpha": POSITIVE, "hidden": POSITIVE, "site_dim": POSITIVE,
        "generator": one_of("shared", "per_layer"), "pooling": one_of("mean", "first_last"),
        "dropout": within(0, 1, hi_open=True),
    }

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

    RULES: ClassVar[dict[str, Rule]] = {"rank": POSITIVE, "alpha": POSITIVE, "granularity": one_of("task", "category")}

    rank: int = 8
    alpha: float = 16.0
    granularity: str = "task"  # task | category


@dataclass
class LossConfig:
    """Stage-2 objective: CE + kl_weight * KL_T(teacher || student) + param_weight * param alignment."""

    RULES: ClassVar[dict[str, Rule]] = {
        "kl_weight": NON_NEGATIVE, "param_weight": NON_NEGATIVE, "temperature": POSITIVE, "chunk_tokens": POSITIVE,
        "param_align": one_of("delta", "factors"),
    }

    kl_weight: float = 1.0  # lambda_1
    param_weight: float = 1.0  # lambda_2
    temperature: float = 2.0
    chunk_tokens: int = 256  # target tokens per chunk of LM head + CE/KL (bounds fp32 [tokens, vocab] temporaries)
    param_align: str = "delta"  # delta (effective s*B@A) | factors (A<->A, s*B<->s*B)


@dataclass
class DataConfig:
    """Where examples come from and how they are tokenised and batched."""

    RULES: ClassVar[dict[str, Rule]] = {
        "setting": one_of("def", "def_pos"), "num_pos": NON_NEGATIVE,
        "max_instances_per_task": Rule(lambda v: v > 0 or v == -1, "> 0, or -1 for all"),
        "max_instruction_length": at_least(2), "max_source_length": at_least(2), "max_target_length": at_least(2),
        "tasks_per_batch": POSITIVE, "examples_per_task": POSITIVE, "builtin_seed": SEED,
        "pretrain_length": at_least(3), "num_workers": NON_NEGATIVE,
    }

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
    chat_template: bool = False  # wrap instruction, input and concat prompts in the tokenizer's chat template


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and guards."""

    RULES: ClassVar[dict[str, Rule]] = {
        "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "warmup_ratio": within(0, 1), "max_steps": POSITIVE,
        "grad_clip": NON_NEGATIVE, "grad_accum": POSITIVE, "precision": one_of("auto", "fp32", "bf16", "fp16"),
        "save_steps": POSITIVE, "keep_last": NON_NEGATIVE, "log_steps": POSITIVE, "stop_after": NON_NEGATIVE,
        "max_bad_steps": POSITIVE, "seed": SEED, "inject_fault": FAULT,
        "frozen_backbone": one_of("auto", "replicated", "partitioned"),
    }

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

    RULES: ClassVar[dict[str, Rule]] = {"mode": one_of("tagi", "concat", "no_instruction")}

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
        """Check every section's ``RULES`` and the rules that span fields; ConfigError names key and value."""
        for key, rule, value in _ruled(self):
            if not rule.test(value):
                raise ConfigError(f"{key}: must be {rule.text} ({value!r})")
        m = self.model
        if self.hypernet.fusion and m.arch != "t5" and self.mode == "tagi":
            raise ConfigError(f"hypernet.fusion: true is T5-only (model.arch={m.arch} is decoder-only: no encoder to "
                              "fuse into); set hypernet.fusion=false (True)")
        if m.arch in DECODER_ONLY and not m.head_dim and m.d_model % m.num_heads:
            raise ConfigError(f"model.d_model: must be a multiple of model.num_heads={m.num_heads} ({m.d_model})")
        if m.arch in DECODER_ONLY and m.num_heads % m.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads: must divide model.num_heads={m.num_heads} ({m.num_kv_heads})")
        _check_family(m)
        return self


def _ruled(obj: Any, prefix: str = ""):
    """``(key, rule, value)`` for every rule of ``obj``'s section and its subsections."""
    for name, rule in getattr(type(obj), "RULES", {}).items():
        yield f"{prefix}{name}", rule, getattr(obj, name)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _ruled(value, f"{prefix}{f.name}.")


def _check_family(m: ModelConfig) -> None:
    """Settings a decoder-only family cannot honour (tagi_ds/backbones/decoder.py builds the rest)."""
    if m.arch == "gemma2" and m.attn_implementation == "sdpa":
        raise ConfigError("model.attn_implementation: Gemma-2 soft-caps its attention logits, which sdpa cannot do; "
                          "use eager or flash_attention_2 (sdpa)")
    if m.sliding_window and m.arch in ("t5", "llama"):
        raise ConfigError(f"model.sliding_window: {m.arch} has no sliding-window attention (mistral, qwen2 and gemma2 "
                          f"do); set it to 0 ({m.sliding_window})")
    if m.rope_scaling and m.arch != "llama":
        raise ConfigError(f"model.rope_scaling: Llama-3.1-style RoPE scaling is for model.arch=llama only "
                          f"(model.arch={m.arch}); set it to 0 ({m.rope_scaling:g})")


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
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise TypeError
            return float(value)
        if typ is str:
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError, json.JSONDecodeError):
        pass
    else:
        raise ConfigError(f"{key}: unsupported config type {typ!r}")
    kind = "a finite float" if typ is float else getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key}: expects {kind} ({value!r})")


def _update(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{path}: unknown config key (known{' in ' + prefix[:-1] if prefix else ''}: "
                              f"{', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: is a section, set {path}.KEY=VALUE ({value!r})")
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
            raise ConfigError(f"--set {item}: expected KEY=VALUE ({item!r})")
        path, value = item.split("=", 1)
        *parents, leaf = path.strip().split(".")
        nested: dict[str, Any] = {leaf: value}
        for p in reversed(parents):
            nested = {p: nested}
        _update(cfg, nested)
    return cfg
