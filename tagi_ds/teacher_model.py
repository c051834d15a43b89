"""A separate frozen teacher model (``--teacher_model DIR``): its logits on the teacher view are the KL target.

The default KL target is the teacher LoRA bank (``--teachers``) on the student's own frozen backbone: a LoRA on
that backbone is rarely much stronger than the student (issue 25). The paper's teacher is a separately finetuned
model (Tk-Instruct / FiD-ICL): a backbone directory of the student's family and vocabulary, any size, e.g. a
concat-finetuned copy of the miniature's backbone (``scripts/merge_lora.py``) or Tk-Instruct at scale.

- **What it targets.** KL only: its logits on the teacher view (instruction + input, the same targets) replace
  those of the teacher LoRA. The parameter-alignment term needs teacher LoRA deltas, which a full model does
  not have: with ``loss.param_weight > 0`` the run must also be given ``--teachers`` (the bank then gives the
  alignment target only); without it, preflight refuses with one line (``check_flags``).
- **How it is held.** Built like the backbone (``assembly.build_teacher_model``): under ZeRO-3 partitioned
  as it is created (``deepspeed.zero.Init`` through HF's integration), else whole; every parameter frozen, so
  never in the optimizer and never in a checkpoint (``exclude_frozen_parameters``); always in eval mode (no
  dropout in the target). It is a submodule of the TagiModel (``teacher_model``) so that ZeRO-3's hooks gather
  its weights for its forward, as for the backbone.
- **What must match.** The family (config.json's ``model_type``), the vocabulary size and, where the dir has
  a tokenizer, the tokenizer (same special ids, same ids on a probe text): the KL compares two distributions
  over one vocabulary position by position. The hidden size and depth may differ (a larger teacher).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tagi_ds import families
from tagi_ds.config import ConfigError, TagiConfig, from_dict
from tagi_ds.files import read_json
from tagi_ds.runtime.preflight import fail, safetensors_header

FLAG = "--teacher_model"
# A probe the two tokenizers must encode alike: instruction words, digits, punctuation, an answer marker.
PROBE = "Definition: answer with the first animal word. Positive Example 1 - Input: cat, 12 red apples. Output: cat"


def check_flags(cfg: TagiConfig, teacher_model: str | None, teachers: str | None, distils: bool) -> None:
    """The flag combinations a teacher model allows (one line each): it gives the KL target only."""
    if teacher_model is None:
        return
    if not distils:
        raise ConfigError(
            f"{FLAG} {teacher_model}: unused by this run (it needs finetune, mode tagi and loss.kl_weight > 0; "
            f"mode {cfg.mode}); drop {FLAG}"
        )
    if cfg.loss.kl_weight <= 0:
        raise ConfigError(f"{FLAG} {teacher_model}: it gives the KL target, but loss.kl_weight=0; drop {FLAG}")
    if cfg.loss.param_weight > 0 and teachers is None:
        raise ConfigError(
            f"{FLAG} {teacher_model}: loss.param_weight={cfg.loss.param_weight} needs teacher LoRA deltas, which a "
            "full teacher model has none of: add --teachers DIR (the alignment target) or --set loss.param_weight=0"
        )
    if cfg.loss.param_weight <= 0 and teachers is not None:
        raise ConfigError(
            f"--teachers {teachers}: unused with {FLAG} and loss.param_weight=0 (the teacher model gives the KL "
            "target; the bank only the alignment target); drop --teachers"
        )


def needs_bank(cfg: TagiConfig, teacher_model: str | None, distils: bool) -> bool:
    """Whether the run holds the teacher LoRA bank: it distils, and something reads the bank (the KL without a
    teacher model, or the alignment term)."""
    return distils and (teacher_model is None or cfg.loss.param_weight > 0)


def teacher_config(cfg: TagiConfig, path: str | Path) -> TagiConfig:
    """The run's config with the teacher dir as its backbone: its shape from the dir's config.json (a teacher may
    be larger than the student), everything else (arch, dtype, attention) the student's."""
    from tagi_ds.backbones.base import checkpoint_shape

    return from_dict({"model": {"model_name_or_path": str(path), **checkpoint_shape(str(path), cfg.model.arch)}}, cfg)


def check(cfg: TagiConfig, path: str, tokenizer) -> TagiConfig:
    """Preflight of ``--teacher_model DIR`` against the student (nothing built, no weights read): a backbone dir of
    the student's family, vocabulary and tokenizer whose weight files' headers match its config.json. Returns its
    config (:func:`teacher_config`). One line on the first mismatch, naming the dir."""
    import transformers

    from tagi_ds.backbones.base import DTYPES, check_attention
    from tagi_ds.data.tokenizer import HFTokenizer

    p = Path(path)
    where = f"{FLAG} {path}"
    if not p.is_dir() or not (p / "config.json").is_file():
        fail(where, "expected a local backbone directory with config.json (HF save_pretrained: weights + config)")
    hf = read_json(p / "config.json", f"{where}/config.json", ("model_type",))
    family = families.get(cfg.model.arch)
    if hf["model_type"] != family.model_type:
        fail(where, f"a {hf['model_type']} model, but the student backbone is {family.model_type}", cfg.model.arch)
    tcfg = teacher_config(cfg, p)
    if tcfg.model.vocab_size != cfg.model.vocab_size:
        fail(
            where,
            f"vocab_size {tcfg.model.vocab_size}, the student backbone's is {cfg.model.vocab_size}: the KL "
            "compares distributions over one vocabulary",
        )
    if (p / "tokenizer_config.json").is_file():
        theirs = HFTokenizer(p)
        # bos only where the family starts sequences with it (decoder-only); T5 never reads one.
        keys = ("pad_id", "eos_id", "bos_id") if family.causal else ("pad_id", "eos_id")
        a, b = ({k: t.special_ids[k] for k in keys} for t in (theirs, tokenizer))
        if a != b or theirs.encode(PROBE) != tokenizer.encode(PROBE):
            fail(
                where,
                f"its tokenizer differs from the student's ({tokenizer.name}): special ids {a} vs {b}, or other "
                "ids for the same text; the KL needs one tokenization",
            )
    try:
        hf_cfg = transformers.AutoConfig.from_pretrained(p, local_files_only=True)
        with torch.device("meta"):
            meta = getattr(transformers, family.model_class)._from_config(
                hf_cfg, attn_implementation=check_attention(tcfg.model), dtype=DTYPES[tcfg.model.dtype]
            )
    except (OSError, ValueError, TypeError, KeyError) as err:
        fail(where, f"config.json is not a buildable {family.model_type} config ({str(err).splitlines()[0]})")
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    files = sorted(p.glob("*.safetensors"))
    if not files:
        fail(where, "no weights (*.safetensors)")
    for f in files:
        for name, (_, shape) in safetensors_header(f, f"{FLAG} {f}").items():
            if name in expected and expected[name] != shape:
                fail(f"{FLAG} {f}", f"tensor {name} has shape {shape}, its config.json says {expected[name]}")
    return tcfg


def describe(teacher: torch.nn.Module) -> str:
    """One line for the run's log: what the teacher model is and where its weights live."""
    n = sum(getattr(p, "ds_numel", p.numel()) for p in teacher.parameters())
    where, what = teacher.tagi_teacher
    return f"teacher model: {what}, {n:,} frozen parameters, {where} (KL target)"
