"""A generated adapter in PEFT's LoRA format: load it with ``PeftModel.from_pretrained(backbone, dir)``.

The hypernetwork reads one text (a task instruction, or, IAG-style, an instance's question/context) and
generates ``A [r, d_in]``, ``B [d_out, r]`` for every adapted projection, applied as ``W0 x + s B (A x)``
with ``s = hypernet.alpha / hypernet.rank`` — exactly PEFT's LoRA with ``r`` and ``lora_alpha`` (no dropout,
no rsLoRA). Files (written to a temp dir, then renamed into place):

- ``adapter_config.json``: ``peft_type`` LORA, ``r``, ``lora_alpha``, ``target_modules`` (the adapted modules'
  full names, so nothing else matches), ``task_type`` SEQ_2_SEQ_LM (T5) | CAUSAL_LM (every decoder-only family),
  ``base_model_name_or_path``.
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight [r, d_in]`` and
  ``...lora_B.weight [d_out, r]`` (PEFT's saved names: no adapter name), float32.
- ``tagi_adapter.json``: provenance (the text, condition, hypernet dir, sites, fusion, the command's flags).

Not exported: T5 instruction *fusion* (the decoder also cross-attends to the instruction's encoder states)
is not a weight, so a fusion-trained hypernetwork's PEFT adapter reproduces tagi-ds's outputs only with
``hypernet.fusion=false``; the export says so when fusion is on. PEFT is not needed to export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tagi_ds import artifacts, assembly, data, families, stages
from tagi_ds.config import ConfigError, frozen
from tagi_ds.data import Task, TaskCollator, format_instruction
from tagi_ds.files import atomic_dir, usual_permissions
from tagi_ds.runtime import engine as ds_engine
from tagi_ds.runtime import preflight as preflight_checks
from tagi_ds.runtime import rundir

CONDITIONS = ("task", "instance")


def condition_text(text: str, condition: str = "task") -> str:
    """What the hypernetwork reads. ``task``: the instruction as training formats a task definition
    (``Definition: ...``); ``instance``: the question/context as given (as stage 1 reads raw text)."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
    if not text.strip():
        raise ValueError("the instruction text is empty")
    if condition == "instance":
        return text.strip()
    return format_instruction(Task(name="instruction", category="", definitions=(text,), instances=()), "def")


def instruction_tensors(tok, cfg, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, Li]`` ids and mask laid out as the collator lays out an instruction (truncation included)."""
    collator = TaskCollator([], tok, cfg.data, arch=cfg.model.arch)
    row = collator.instruction_row(tok.encode(text.strip() if collator.chat else text))  # a chat message: stripped
    return torch.tensor([row], dtype=torch.long), torch.ones(1, len(row), dtype=torch.long)


@torch.no_grad()
def generate_factors(model, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One text's factors ``[(A [r, d_in], B [d_out, r])]`` in site order (instruction encoded adapters-off)."""
    _, pooled = model.encoder(ids, mask)
    return [(A[0], B[0]) for A, B in model.generator(pooled)]


def peft_state_dict(sites, factors) -> dict[str, torch.Tensor]:
    state = {}
    for site, (A, B) in zip(sites, factors, strict=True):
        state[f"base_model.model.{site.name}.lora_A.weight"] = A.detach().float().cpu().contiguous()
        state[f"base_model.model.{site.name}.lora_B.weight"] = B.detach().float().cpu().contiguous()
    return state


def peft_config(sites, rank: int, alpha: float, arch: str, base_model: str | None) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": families.get(arch).peft_task_type,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": [s.name for s in sites],
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def export_peft(
    out_dir: str | Path, model, factors, base_model: str | None = None, provenance: dict[str, Any] | None = None
) -> Path:
    """Write the PEFT adapter dir for ``factors`` of ``model``'s sites (atomically: temp dir + rename)."""
    cfg = model.cfg
    final = Path(out_dir)
    with atomic_dir(final) as tmp:
        save_file(
            peft_state_dict(model.sites, factors), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"}
        )
        usual_permissions(tmp / "adapter_model.safetensors")
        files = {
            "adapter_config.json": peft_config(
                model.sites, cfg.hypernet.rank, cfg.hypernet.alpha, cfg.model.arch, base_model
            ),
            "tagi_adapter.json": {
                **(provenance or {}),
                "fusion": model.fusion,
                "recipe": cfg.recipe,
                "scale": cfg.hypernet.alpha / cfg.hypernet.rank,
                "sites": [s.name for s in model.sites],
            },
        }
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return final


def preflight(cfg, hypernet: Path, out_dir: Path, deepspeed: str | None = None):
    """Every input checked before anything is written or a process group starts: one process, the output
    dir, the DeepSpeed JSON (DeepSpeed's schema), the tokenizer, and the hypernet/ dir against the model built
    on the meta device. Returns ``(frozen config, its finetune spec, final DeepSpeed dict, tokenizer)``."""
    if preflight_checks.env_world_size() > 1:
        raise ConfigError(
            "generate_adapter: runs in one process: python launchers/generate_adapter.py ... "
            f"(WORLD_SIZE={preflight_checks.env_world_size()})"
        )
    preflight_checks.check_output_dir(out_dir)
    ds = preflight_checks.deepspeed_config(deepspeed, cfg, 1)
    tok = data.load_tokenizer(cfg)
    spec = stages.spec("finetune", cfg)  # the run that trained the hypernetwork
    artifacts.check_hypernet(hypernet, assembly.meta_model(cfg, spec, tok.special_ids), "--hypernet")
    return frozen(cfg), spec, ds, tok


def generate_adapter(
    cfg,
    hypernet: Path,
    text: str,
    condition: str,
    out_dir: Path,
    deepspeed: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Build the frozen backbone + hypernetwork, generate the adapter for ``text``, export it to ``out_dir``.

    The backbone is built as training built it: under ZeRO-3 (``--deepspeed``, default as in training) inside
    ``deepspeed.zero.Init`` in a world of one, so a built-in random-init backbone is the one the hypernetwork
    was trained with; its parameters are gathered for the one forward. Single process: no engine.
    """
    cfg, spec, ds, tok = preflight(cfg, hypernet, out_dir, deepspeed)
    command = {"hypernet": str(hypernet), "condition": condition, "deepspeed": deepspeed, "base_model": base_model}
    # A group of one only under ZeRO-3 (its zero.Init); seeded as training was before building: the same built-in
    # random init. The adapter dir is written whole by atomic_dir: no run-directory lock, no config.json.
    started = rundir.RunStart(
        Path(out_dir),
        "generate_adapter",
        cfg,
        ds,
        command,
        directory=False,
        process_group=ds_engine.zero_stage(ds) == 3,
    )
    rundir.start(started)
    run = assembly.assemble(
        spec, cfg, ds, tok.special_ids, runner="none", teacher=False, loads=assembly.Loads(artifact=hypernet)
    )
    model = run.model.requires_grad_(False).eval()
    read = condition_text(text, condition)
    ids, mask = instruction_tensors(tok, cfg, read)
    with artifacts.gathered(list(model.parameters())):
        factors = generate_factors(model, ids, mask)
    provenance = {
        "condition": condition,
        "text": text,
        "hypernet_input": read,
        "hypernet": str(hypernet),
        "instruction_tokens": int(mask.sum()),
        "command": dict(started.command),
    }
    return export_peft(out_dir, model, factors, base_model or cfg.model.model_name_or_path, provenance)
