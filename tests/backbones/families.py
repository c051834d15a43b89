"""Tiny local checkpoints of each decoder-only family, written the way a real one sits on disk.

Each is the family's own transformers class at its ``tiny-<arch>`` recipe's shape, random init, saved with
``save_pretrained``, next to a real tokenizer: a byte-level BPE trained here on the built-in corpus (as
Llama-3 and Qwen2.5 tokenizers are byte-level BPE), with the family's special tokens and a chat template
written after the family's own (the same turn markers; Qwen's default system prompt left out).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tagi_ds.data.tokenizer import training_sentences
from tagi_ds.model import build_backbone
from tagi_ds.recipes import get_recipe

ARCHS = ("llama", "mistral", "qwen2", "gemma2")

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}[/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
QWEN2_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
    "\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% endif %}"
)

# arch -> (special tokens of the tokenizer, the extra ones its template uses, chat template)
SPECIALS = {
    "llama": (
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        ["<|start_header_id|>", "<|end_header_id|>"],
        LLAMA3_TEMPLATE,
    ),
    "mistral": (
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        ["[INST]", "[/INST]"],
        MISTRAL_TEMPLATE,
    ),
    "qwen2": ({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ["<|im_start|>"], QWEN2_TEMPLATE),
    "gemma2": (
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
        ["<start_of_turn>", "<end_of_turn>"],
        GEMMA2_TEMPLATE,
    ),
}


def write_tokenizer(path: Path, arch: str, vocab_size: int = 600) -> PreTrainedTokenizerFast:
    specials, extra, template = SPECIALS[arch]
    tokens = list(dict.fromkeys([*specials.values(), *extra]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=tokens,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_sentences()[::4], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **specials)
    fast.save_pretrained(str(path))
    return fast


def write_checkpoint(path: Path, arch: str) -> Path:
    """``path``: config.json + weights of the ``tiny-<arch>`` recipe's shape and the family's tokenizer."""
    tok = write_tokenizer(path, arch)
    eos = tok.eos_token_id
    special = {
        "pad_id": tok.pad_token_id if tok.pad_token_id is not None else eos,
        "eos_id": eos,
        "bos_id": tok.bos_token_id,
    }
    build_backbone(get_recipe(f"tiny-{arch}"), special).save_pretrained(str(path))
    return path
