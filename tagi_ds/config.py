"""One typed config tree for every stage, launcher and benchmark.

Parsed once (recipe -> ``--set`` overrides -> flags) into these dataclasses and handed down; nothing
deeper reads argparse, env vars or globals. Unknown keys and ill-typed values raise ``ConfigError``
naming the key and the value.

Each field is declared once, here: its type (a ``Literal`` lists the choices), its default, its range
(the section's ``RULES``) and the docstring under it. ``validate()``, ``--help`` and the README's config table
(``python -m tagi_ds.config --markdown``) all read them from here.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import json
import math
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

from tagi_ds import families, op_impls
from tagi_ds.errors import ConfigError  # defined with the other input errors; imported from here too


@dataclass(frozen=True)
class Rule:
    """What a valid value of one config field is. Each section declares its ranges next to its fields
    (``RULES``: field name -> Rule); a ``Literal`` field's rule is its choices. ``TagiConfig.validate`` checks
    them all and names key and value."""

    test: Callable[[Any], bool]
    text: str  # "> 0", "one of t5, llama": the error says "<key>: must be <text> (<value>)"
    choices: Callable[[], tuple[str, ...]] | None = None  # a registry's names, read when checked (model.arch)

    def says(self) -> str:
        return f"one of {', '.join(self.choices())}" if self.choices else self.text


def one_of(*allowed: str) -> Rule:
    return Rule(lambda v: v in allowed, f"one of {', '.join(allowed)}")


def registered(names: Callable[[], tuple[str, ...]]) -> Rule:
    """One of the names a registry holds when the config is checked (a test may register a family first)."""
    return Rule(lambda v: v in names(), "", names)


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
FAULT = matches(
    r"|(nan|raise)@\d+(-\d+)?:\d+|(kill|stop)@\d+:\d+|(enospc|rofs)@\d+",
    "empty, nan@STEP[-LAST]:RANK, raise|kill|stop@STEP:RANK, enospc@STEP or rofs@STEP",
)

ModeName = Literal["tagi", "concat", "no_instruction"]  # what tagi_ds/stages.py's MODES describe
Granularity = Literal["task", "category"]


class Section:
    """A section of the config tree (and the root). A frozen one (:func:`frozen`) refuses every assignment: what
    preflight resolved is what the run uses, and a later change is a ``dataclasses.FrozenInstanceError``, not a
    silent difference between config.json and the run. ``dataclasses.replace`` still makes a new, unfrozen one."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(
                f"cannot assign to {type(self).__name__}.{name}: the config is frozen after preflight "
                "(make a new one with dataclasses.replace before it)"
            )
        object.__setattr__(self, name, value)


@dataclass
class ModelConfig(Section):
    """The frozen backbone and which of its projections get adapters."""

    RULES: ClassVar[dict[str, Rule]] = {
        "vocab_size": POSITIVE,
        "d_model": POSITIVE,
        "d_ff": POSITIVE,
        "d_kv": POSITIVE,
        "num_layers": POSITIVE,
        "num_decoder_layers": POSITIVE,
        "num_heads": POSITIVE,
        "num_kv_heads": POSITIVE,
        "max_position_embeddings": POSITIVE,
        "head_dim": NON_NEGATIVE,
        "rope_theta": POSITIVE,
        "rope_scaling": NON_NEGATIVE,
        "sliding_window": NON_NEGATIVE,
        "init_seed": SEED,
        "arch": registered(families.names),
        "adapter_impl": registered(op_impls.names),
    }

    arch: str = "t5"
    """t5 is the encoder-decoder; the others are decoder-only families, by HF model_type (Llama-1/2/3 are llama)"""
    model_name_or_path: str | None = None
    """local HF checkpoint dir; none = the recipe's shape, random init"""
    vocab_size: int = 1024
    """embedding rows (a local checkpoint's config.json decides)"""
    d_model: int = 64
    """hidden size"""
    d_ff: int = 128
    """feed-forward width"""
    d_kv: int = 16
    """T5 per-head size"""
    num_layers: int = 2
    """layers (T5: encoder layers)"""
    num_decoder_layers: int = 2
    """T5 only"""
    num_heads: int = 4
    """attention heads"""
    num_kv_heads: int = 4
    """decoder-only grouped-query attention"""
    head_dim: int = 0
    """decoder-only per-head size; 0 = d_model // num_heads (Gemma-2: 256)"""
    rope_theta: float = 10000.0
    """decoder-only RoPE base (Llama-3: 5e5; Qwen2.5, Mistral v0.3: 1e6)"""
    rope_scaling: float = 0.0
    """llama: Llama-3.1-style RoPE scaling factor (3.1: 8, 3.2: 32); 0 = none"""
    sliding_window: int = 0
    """mistral / qwen2 / gemma2: sliding-window attention width in tokens; 0 = none"""
    tie_word_embeddings: bool = False
    """decoder-only: the LM head shares the input embedding (Gemma-2, Llama-3.2 1B)"""
    feed_forward_proj: Literal["relu", "gelu", "gated-relu", "gated-gelu", "gated-silu"] = "gated-gelu"
    """T5 feed-forward (gated-gelu: T5-LM-Adapt / v1.1)"""
    max_position_embeddings: int = 2048
    """decoder-only"""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """flash_attention_2 needs the flash extra"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """backbone weights"""
    adapted: list[str] = field(default_factory=lambda: ["q", "v"])
    """projection kinds to adapt. T5: q k v o wi wo (wi_0 wi_1 for a gated FFN); decoder-only: q k v o gate up down"""
    adapted_stacks: list[str] = field(default_factory=lambda: ["encoder", "decoder", "cross"])
    """T5 stacks to adapt: encoder (self-attn, FFN), decoder (self-attn, FFN), cross (enc-dec attention)"""
    trainable: list[str] = field(default_factory=list)
    """regexes of backbone parameter names to train anyway (default: none; the backbone is frozen)"""
    gradient_checkpointing: bool = False
    """per layer, non-reentrant, over the adapted backbone"""
    adapter_impl: str = "auto"
    """tagi_ds.ops.lora_delta's implementation (tagi_ds/op_impls.py): auto = triton on CUDA, torch elsewhere"""
    init_seed: int = 0
    """random-init backbones (no model_name_or_path): the same weights in every stage"""


@dataclass
class HypernetConfig(Section):
    """Instruction encoder pooling + the generator of LoRA factors."""

    RULES: ClassVar[dict[str, Rule]] = {
        "rank": POSITIVE,
        "alpha": POSITIVE,
        "hidden": POSITIVE,
        "site_dim": POSITIVE,
        "dropout": within(0, 1, hi_open=True),
    }

    rank: int = 8
    """rank r of every generated LoRA"""
    alpha: float = 16.0
    """generated delta scale s = alpha / rank"""
    hidden: int = 128
    """generator MLP width"""
    site_dim: int = 32
    """learned site embedding (layer x projection kind)"""
    generator: Literal["shared", "per_layer"] = "shared"
    """shared: one trunk + one head per projection kind; per_layer: one per site"""
    pooling: Literal["mean", "first_last"] = "mean"
    """mean: masked, last layer; first_last: masked mean of the first and last layers"""
    fusion: bool = True
    """T5: the decoder cross-attends to [instruction ; input] encodings"""
    fusion_marker: bool = False
    """fusion: add a learned vector to the instruction states (tells them from the input's)"""
    checkpoint_encoder: bool = True
    """checkpoint the instruction encoding when it needs gradients"""
    dropout: float = 0.0
    """in the generator's MLP"""


@dataclass
class TeacherConfig(Section):
    """Stage-0 teacher LoRA bank: one adapter per task (or per category)."""

    RULES: ClassVar[dict[str, Rule]] = {"rank": POSITIVE, "alpha": POSITIVE}

    rank: int = 8
    """rank of every teacher LoRA"""
    alpha: float = 16.0
    """teacher delta scale s = alpha / rank"""
    granularity: Granularity = "task"
    """one teacher per task, or per category"""


@dataclass
class LossConfig(Section):
    """Stage-2 objective: CE + kl_weight * KL_T(teacher || student) + param_weight * param alignment."""

    RULES: ClassVar[dict[str, Rule]] = {
        "kl_weight": NON_NEGATIVE,
        "param_weight": NON_NEGATIVE,
        "temperature": POSITIVE,
        "chunk_tokens": POSITIVE,
    }

    kl_weight: float = 1.0
    """lambda_1"""
    param_weight: float = 1.0
    """lambda_2"""
    temperature: float = 2.0
    """of the KL term (T; the term is scaled by T^2)"""
    chunk_tokens: int = 256
    """target tokens per chunk of LM head + CE/KL (bounds the fp32 [tokens, vocab] temporaries)"""
    param_align: Literal["relative", "delta", "factors"] = "relative"
    """relative: per task sum_sites ||dG - dT||^2 / sum_sites ||dT||^2 of the effective deltas d = s*B@A (1.0 at init,
    scale-free); delta: their per-element MSE; factors: A<->A and s*B<->s*B"""


@dataclass
class DataConfig(Section):
    """Where examples come from and how they are tokenised and batched."""

    RULES: ClassVar[dict[str, Rule]] = {
        "num_pos": NON_NEGATIVE,
        "max_instances_per_task": Rule(lambda v: v > 0 or v == -1, "> 0, or -1 for all"),
        "max_instruction_length": at_least(2),
        "max_source_length": at_least(2),
        "max_target_length": at_least(2),
        "tasks_per_batch": POSITIVE,
        "examples_per_task": POSITIVE,
        "builtin_seed": SEED,
        "pretrain_length": at_least(3),
    }

    spec: str = "builtin"
    """builtin | sni:DIR | p3:DIR | text:FILE_OR_DIR"""
    tokenizer: str | None = None
    """local tokenizer dir; none = the backbone's dir, or the built-in sentencepiece model"""
    setting: Literal["def", "def_pos"] = "def"
    """the instruction: the Definition, or the Definition + num_pos positive examples"""
    num_pos: int = 2
    """positive examples in a def_pos instruction"""
    max_instances_per_task: int = 100
    """instances kept per task; -1 = all"""
    categories: list[str] = field(default_factory=list)
    """keep only these categories (empty = all)"""
    tasks: list[str] = field(default_factory=list)
    """keep only these task names (empty = all)"""
    exclude_tasks: list[str] = field(default_factory=list)
    """drop these task names (e.g. a validation split)"""
    english_only: bool = True
    """keep only tasks whose input and output language is English (SNI)"""
    max_instruction_length: int = 128
    """tokens of an instruction (the hypernetwork's input); longer ones are cut"""
    max_source_length: int = 128
    """tokens of an input (concat: instruction + input); longer ones are cut"""
    max_target_length: int = 32
    """tokens of a target; longer ones are cut"""
    tasks_per_batch: int = 2
    """k tasks per micro-batch"""
    examples_per_task: int = 4
    """m examples per task"""
    builtin_seed: int = 0
    """the built-in suite's generator seed"""
    builtin_suite: Literal["v1", "v2"] = "v1"
    """v1: chains of 70 skills (docs/results.md); v2: single-answer selection, 8 two-vocabulary families x 16 skills,
    Latin-square held-out pairs (docs/suite_v2.md)"""
    pretrain_length: int = 96
    """stage 1: the a|b|c window, in tokens"""
    corpus: str | None = None
    """stage-1 text: builtin | text:FILE_OR_DIR; none = data.spec if text:, else builtin"""
    streaming: bool = False
    """stage 1: stream the corpus files in order instead of holding every window in memory"""
    sample_variants: bool = True
    """training draws a Definition paraphrase per task and an accepted output per example"""
    chat_template: bool = False
    """wrap the instruction, input and concat prompts in the tokenizer's chat template"""


@dataclass
class TrainConfig(Section):
    """Optimisation, schedule, checkpoints and guards."""

    RULES: ClassVar[dict[str, Rule]] = {
        "grad_ratio_every": NON_NEGATIVE,
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "warmup_ratio": within(0, 1),
        "max_steps": POSITIVE,
        "grad_clip": NON_NEGATIVE,
        "grad_accum": POSITIVE,
        "save_steps": POSITIVE,
        "keep_last": NON_NEGATIVE,
        "log_steps": POSITIVE,
        "stop_after": NON_NEGATIVE,
        "max_bad_steps": POSITIVE,
        "seed": SEED,
        "inject_fault": FAULT,
    }

    lr: float = 1e-3
    """peak learning rate (torch AdamW)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_ratio: float = 0.02
    """linear warmup over this share of max_steps, then linear decay to 10% of lr"""
    max_steps: int = 100
    """optimizer steps"""
    grad_clip: float = 1.0
    """global gradient-norm clip; 0 = off"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU"""
    frozen_backbone: Literal["auto", "replicated", "partitioned"] = "auto"
    """ZeRO-3: where the frozen backbone lives. partitioned: ZeRO-3 owns it (1/W per rank); replicated: whole on
    every rank, outside DeepSpeed (no gathers, no hooks); auto: replicated on a GPU where tagi_ds.plan says it fits,
    else partitioned (always partitioned on a CPU)"""
    save_steps: int = 50
    """a checkpoint every N steps (and at the last)"""
    keep_last: int = 2
    """checkpoints kept"""
    log_steps: int = 1
    """a metrics.jsonl line every N steps"""
    stop_after: int = 0
    """end this session after N steps (checkpointed; the schedule still spans max_steps); 0 = off"""
    max_bad_steps: int = 5
    """stop after this many non-finite steps in a row"""
    seed: int = 42
    """global seed (data order, dropout, initialisation of what trains)"""
    grad_ratio_every: int = 500
    """every N steps from step 0, log each loss term's gradient-norm ratio and cosine to CE's (grad_ratio/kl,
    grad_ratio/param, grad_cos/*) w.r.t. the hypernetwork; each such step pays extra forwards and backwards; 0 = off"""
    tensorboard: bool = False
    """also write TensorBoard scalars (OUTPUT_DIR/tensorboard)"""
    inject_fault: str = ""
    """fault injection for the guard tests: nan@STEP[-LAST]:RANK (the loss becomes NaN), raise@STEP:RANK,
    kill@STEP:RANK / stop@STEP:RANK (that rank SIGKILLs / SIGSTOPs itself), enospc@STEP or rofs@STEP (the
    checkpoint of step STEP fails with 'No space left on device' / 'Read-only file system'; 0: config.json)"""


@dataclass
class TagiConfig(Section):
    """The root of the tree; ``recipe`` names where the defaults came from."""

    RULES: ClassVar[dict[str, Rule]] = {}  # mode: its Literal's choices

    recipe: str = "tiny"
    """the recipe the defaults came from (tagi_ds/recipes.py)"""
    mode: ModeName = "tagi"
    """tagi (generated adapters), or a baseline with one shared LoRA: concat (instruction + input) or
    no_instruction (input only)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    hypernet: HypernetConfig = field(default_factory=HypernetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TagiConfig:
        """Check every field's rule (``RULES``, a ``Literal``'s choices) and the rules that span fields;
        ConfigError names key and value."""
        for key, rule, value in _ruled(self):
            if not rule.test(value):
                raise ConfigError(f"{key}: must be {rule.says()} ({value!r})")
        m, fam = self.model, families.get(self.model.arch)
        if self.hypernet.fusion and not fam.fusion and self.mode == "tagi":
            fusing = "/".join(families.get(n).label for n in families.having("fusion"))
            why = "is decoder-only: no encoder to fuse into" if fam.causal else "has no fusion"
            raise ConfigError(
                f"hypernet.fusion: true is {fusing}-only (model.arch={m.arch} {why}); set hypernet.fusion=false (True)"
            )
        if "head_dim" in fam.shape and not m.head_dim and m.d_model % m.num_heads:  # head_dim 0: d_model / heads
            raise ConfigError(f"model.d_model: must be a multiple of model.num_heads={m.num_heads} ({m.d_model})")
        if "num_kv_heads" in fam.shape and m.num_heads % m.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads: must divide model.num_heads={m.num_heads} ({m.num_kv_heads})")
        _check_family(m)
        return self


def frozen(cfg: TagiConfig) -> TagiConfig:
    """A frozen deep copy of ``cfg`` (every section too, :class:`Section`): preflight hands it to the run."""
    out = copy.deepcopy(cfg)
    for obj in (out, *(getattr(out, f.name) for f in dataclasses.fields(out))):
        if isinstance(obj, Section):
            object.__setattr__(obj, "_frozen", True)
    return out


def rule_of(section: type, name: str) -> Rule | None:
    """The rule of one field: its section's ``RULES`` entry, or its ``Literal``'s choices."""
    hint = get_type_hints(section)[name]
    if get_origin(hint) is Literal:
        return one_of(*get_args(hint))
    return getattr(section, "RULES", {}).get(name)


def _ruled(obj: Any, prefix: str = ""):
    """``(key, rule, value)`` for every rule of ``obj``'s section and its subsections."""
    sections = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, value))
        elif (rule := rule_of(type(obj), f.name)) is not None:
            yield f"{prefix}{f.name}", rule, value
    for name, value in sections:
        yield from _ruled(value, f"{prefix}{name}.")


@functools.cache
def field_docs(section: type) -> dict[str, str]:
    """The docstring under each field of ``section`` (a string literal right after the field: PEP 257's
    attribute docstrings), read from the source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(section)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def choices(section: type, name: str) -> tuple[str, ...]:
    """A ``Literal`` field's choices (``--help`` offers them)."""
    return get_args(get_type_hints(section)[name])


def _check_family(m: ModelConfig) -> None:
    """Settings the family of ``m`` cannot honour (its record: tagi_ds/families.py)."""
    fam = families.get(m.arch)
    if (why := attention_error(m)) is not None:
        raise ConfigError(why)
    if m.sliding_window and not fam.sliding_window:
        raise ConfigError(
            f"model.sliding_window: {m.arch} has no sliding-window attention "
            f"({_and(families.having('sliding_window'))} do); set it to 0 ({m.sliding_window})"
        )
    if m.rope_scaling and not fam.rope_scaling:
        raise ConfigError(
            f"model.rope_scaling: Llama-3.1-style RoPE scaling is for model.arch="
            f"{' or '.join(families.having('rope_scaling'))} only (model.arch={m.arch}); set it to 0 "
            f"({m.rope_scaling:g})"
        )


def attention_error(m: ModelConfig) -> str | None:
    """Why ``m``'s family cannot use ``m.attn_implementation`` (its record's ``attention``), or None."""
    fam = families.get(m.arch)
    if m.attn_implementation not in fam.attention:
        return None
    others = " or ".join(a for a in choices(ModelConfig, "attn_implementation") if a not in fam.attention)
    return f"model.attn_implementation: {fam.attention[m.attn_implementation]}; use {others} ({m.attn_implementation})"


def _and(names: tuple[str, ...]) -> str:
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


def _coerce(key: str, typ: Any, value: Any) -> Any:
    """Turn ``value`` (from JSON or a ``--set`` string) into ``typ``, or raise naming ``key``."""
    origin, args = get_origin(typ), get_args(typ)
    if args and type(None) in args:  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        typ = next(a for a in args if a is not type(None))
        origin, args = get_origin(typ), get_args(typ)
    if origin is Literal:  # its type here; the choice is validate()'s, with every other rule
        typ, origin, args = type(args[0]), None, ()
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


# Keys an older version had and this one dropped: a saved config.json (an artifact, a checkpoint's run) that still
# holds one reads as before, the key ignored; setting one (--set) is refused with the reason.
RETIRED = {"data.num_workers": "removed: it was never used (collation tokenises in the training process)"}


def _update(obj: Any, data: dict[str, Any], prefix: str = "", saved: bool = False) -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in RETIRED and key not in names:
            if saved:
                continue
            raise ConfigError(f"{path}: {RETIRED[path]}; drop it ({value!r})")
        if key not in names:
            raise ConfigError(
                f"{path}: unknown config key (known{' in ' + prefix[:-1] if prefix else ''}: "
                f"{', '.join(sorted(names))})"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: is a section, set {path}.KEY=VALUE ({value!r})")
            _update(current, value, prefix=f"{path}.", saved=saved)
        else:
            setattr(obj, key, _coerce(path, hints[key], value))


def from_dict(data: dict[str, Any], base: TagiConfig | None = None) -> TagiConfig:
    """Overlay a (possibly partial) nested dict onto ``base`` (default: a fresh TagiConfig); a saved config's
    :data:`RETIRED` keys are ignored."""
    cfg = copy.deepcopy(base) if base is not None else TagiConfig()
    _update(cfg, data, saved=True)
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


# -- the reference: every key, its values, default and meaning (README table, python -m tagi_ds.config) ------------
def reference(obj: Any | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, values, default, meaning)`` for every field of the tree, in declaration order."""
    obj = TagiConfig() if obj is None else obj
    section, hints, docs = type(obj), get_type_hints(type(obj)), field_docs(type(obj))
    rows = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += reference(value, f"{prefix}{f.name}.")
            continue
        rule = rule_of(section, f.name)
        values = (
            " | ".join(choices(section, f.name))
            if get_origin(hints[f.name]) is Literal
            else " | ".join(rule.choices())
            if rule and rule.choices
            else f"{_kind(hints[f.name])}, {rule.text}"
            if rule
            else _kind(hints[f.name])
        )
        rows.append((prefix + f.name, values, _shown(value), docs.get(f.name, "")))
    return rows


def _kind(typ: Any) -> str:
    args = get_args(typ)
    if type(None) in args:
        return f"{_kind(next(a for a in args if a is not type(None)))} or none"
    if get_origin(typ) is list:
        return "list"
    return {bool: "true/false", str: "text"}.get(typ, getattr(typ, "__name__", str(typ)))


def _shown(value: Any) -> str:
    """A default as ``--set`` takes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(value) if value else "(empty)"
    return str(value) if value != "" else "(empty)"


def markdown() -> str:
    """The README's config table (a test holds the README to exactly this text)."""
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| key | values | default | meaning |", "|---|---|---|---|"]
    lines += [
        f"| `{key}` | {cell(values)} | `{cell(default)}` | {cell(doc)} |" for key, values, default, doc in reference()
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m tagi_ds.config",
        description="Every config key with its values, "
        "default (TagiConfig's; a recipe overrides some) and meaning. Set any of them with "
        "--set KEY=VALUE.",
    )
    p.add_argument("--markdown", action="store_true", help="print the README's config table")
    if p.parse_args(argv).markdown:
        print(markdown())
        return
    for key, values, default, doc in reference():
        print(f"{key} = {default}    ({values})" + (f"\n    {doc}" if doc else ""))


if __name__ == "__main__":
    main()
