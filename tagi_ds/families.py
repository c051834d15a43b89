"""Backbone families as records: everything the layers above ``backbones/`` know about one, as plain data.

``model.arch`` names a family; its :class:`Family` record says which backbone module builds and runs it (a
:class:`tagi_ds.backbones.Backbone`), how it is laid out (encoder-decoder or decoder-only, its transformers classes,
the config.json keys of its shape fields, its adapted projections and stacks), what it can do (instruction fusion,
the cross-attention cache, sliding-window attention, Llama-3.1 RoPE scaling, the attention implementations it cannot
use) and what the PEFT export calls it. The config's validation, the collator's token layout, the planner's formulas,
the PEFT export and the preflight read these fields; none of them compares a family's name. No torch or transformers
import here, so that every layer can read a record.

``FAMILIES`` is the registry, keyed by ``model.arch``, in the order ``--help`` and the README list them. A Llama-like
family (a transformers decoder-only class with Llama's module names) is one :func:`decoder_family` record plus its
recipes; another architecture is a backbone module, a record and recipes (docs/architecture.md, "Where to add").
(The idea follows torchtitan's registered ``TrainSpec``s: a model is looked up by name, never switched on.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    """One backbone family; ``name`` is its ``model.arch``."""

    name: str
    module: str  # the tagi_ds.backbones.Backbone module that builds and runs it (imported when first asked for)
    label: str  # how messages name it: "T5", "Gemma-2"
    model_type: str  # the model_type of its checkpoints' config.json
    encoder_decoder: bool  # inputs in an encoder, targets in a decoder that cross-attends to it; else one causal LM
    config_class: str  # transformers classes, by name: transformers imports a family's modeling code on first use
    model_class: str
    shape: Mapping[str, str]  # ModelConfig shape field -> the config.json (HF config) key that holds it
    projections: Mapping[str, str]  # adaptable kind (model.adapted) -> where it sits in a layer, for ``module``
    stacks: tuple[str, ...]  # the model.adapted_stacks it has
    peft_task_type: str  # the PEFT export's task_type
    constants: Mapping[str, Any] = field(default_factory=dict)  # HF config values its public checkpoints share
    head_dim_keys: tuple[str, ...] = ()  # HF config keys that take the per-head size too (random init)
    fusion: bool = False  # hypernet.fusion: the decoder cross-attends to the instruction states (module: fuse)
    cross_cache: bool = False  # inference projects each task's instruction keys/values once (module: cross_cache)
    sliding_window: bool = False  # honours model.sliding_window
    window_switch: str = ""  # the HF config key that turns the sliding window on, where the family has one
    rope_scaling: bool = False  # honours model.rope_scaling (Llama-3.1-style RoPE scaling)
    attention: Mapping[str, str] = field(default_factory=dict)  # attn_implementation it cannot use -> why not

    @property
    def causal(self) -> bool:
        """Decoder-only: prompt and target in one causal sequence, labels shifted by the loss."""
        return not self.encoder_decoder

    def hf_key(self, *fields: str) -> str:
        """The HF config key of the first of ``fields`` this family has (``"num_kv_heads", "num_heads"``: T5 has
        no grouped-query attention, so its key-value heads are its heads)."""
        for f in fields:
            if f in self.shape:
                return self.shape[f]
        raise KeyError(f"model.arch={self.name} has none of the shape fields {', '.join(fields)}")


T5_SHAPE = {
    "vocab_size": "vocab_size",
    "d_model": "d_model",
    "d_ff": "d_ff",
    "d_kv": "d_kv",
    "num_layers": "num_layers",
    "num_decoder_layers": "num_decoder_layers",
    "num_heads": "num_heads",
    "feed_forward_proj": "feed_forward_proj",
}
DECODER_SHAPE = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "d_ff": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "sliding_window": "sliding_window",
}
# Llama's layout, shared by every family built by tagi_ds/backbones/decoder.py: model.layers.{i}.<path>.
LLAMA_PROJECTIONS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def decoder_family(name: str, label: str, config_class: str, model_class: str, **fields: Any) -> Family:
    """A transformers decoder-only family with Llama's module names, built by tagi_ds/backbones/decoder.py."""
    return Family(
        **{
            "module": "tagi_ds.backbones.decoder",
            "model_type": name,
            "encoder_decoder": False,
            "shape": DECODER_SHAPE,
            "projections": LLAMA_PROJECTIONS,
            "stacks": ("decoder",),
            "peft_task_type": "CAUSAL_LM",
            "name": name,
            "label": label,
            "config_class": config_class,
            "model_class": model_class,
            **fields,
        }
    )


# Constants of the public checkpoints that ModelConfig's shape fields do not carry. Gemma-2: query scale
# head_dim^-0.5 (query_pre_attn_scalar = head_dim, as in 2B and 9B), attention logits soft-capped at 50, final
# logits at 30.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="t5",
            module="tagi_ds.backbones.t5",
            label="T5",
            model_type="t5",
            encoder_decoder=True,
            config_class="T5Config",
            model_class="T5ForConditionalGeneration",
            shape=T5_SHAPE,
            projections={
                "q": "attention",
                "k": "attention",
                "v": "attention",
                "o": "attention",
                "wi": "ffn",
                "wo": "ffn",
                "wi_0": "ffn",
                "wi_1": "ffn",
            },
            stacks=("encoder", "decoder", "cross"),
            peft_task_type="SEQ_2_SEQ_LM",
            fusion=True,
            cross_cache=True,
            attention={
                "flash_attention_2": "T5 adds a relative position bias to its attention logits, which "
                "flash_attention_2 cannot do"
            },
        ),
        decoder_family(
            "llama", "Llama", "LlamaConfig", "LlamaForCausalLM", constants={"rms_norm_eps": 1e-5}, rope_scaling=True
        ),
        decoder_family(
            "mistral",
            "Mistral",
            "MistralConfig",
            "MistralForCausalLM",
            constants={"rms_norm_eps": 1e-5},
            sliding_window=True,
        ),
        decoder_family(
            "qwen2",
            "Qwen2",
            "Qwen2Config",
            "Qwen2ForCausalLM",
            constants={"rms_norm_eps": 1e-6},
            sliding_window=True,
            window_switch="use_sliding_window",
        ),
        decoder_family(
            "gemma2",
            "Gemma-2",
            "Gemma2Config",
            "Gemma2ForCausalLM",
            constants={"rms_norm_eps": 1e-6, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
            head_dim_keys=("query_pre_attn_scalar",),
            sliding_window=True,
            attention={"sdpa": "Gemma-2 soft-caps its attention logits, which sdpa cannot do"},
        ),
    )
}


def get(arch: str) -> Family:
    """The record of ``model.arch`` (validated configs only name registered families)."""
    try:
        return FAMILIES[arch]
    except KeyError:
        raise KeyError(f"model.arch={arch!r} is no registered family ({', '.join(FAMILIES)})") from None


def names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def having(capability: str) -> tuple[str, ...]:
    """The families whose record has ``capability`` set (``"sliding_window"``): the messages list them."""
    return tuple(n for n, f in FAMILIES.items() if getattr(f, capability))


def register(family: Family) -> Family:
    """Add ``family`` under its name (a name taken raises: a record replaces nothing)."""
    if family.name in FAMILIES:
        raise ValueError(f"model.arch={family.name} is already registered ({FAMILIES[family.name].module})")
    FAMILIES[family.name] = family
    return family


@contextmanager
def registered(family: Family) -> Iterator[Family]:
    """``family`` registered for the duration of the block (a test's family leaves the registry as it was)."""
    register(family)
    try:
        yield family
    finally:
        del FAMILIES[family.name]
