#!/usr/bin/env python
"""A finetuned baseline's shared LoRA merged into its backbone, saved as a backbone dir (a ``--teacher_model``).

The miniature's separate teacher model (``tagi_ds.teacher_model``) is a concat-finetuned copy of the frozen
backbone: ``launchers/finetune.py --mode concat`` trains one shared LoRA on instruction + input over every
training task; this script adds its delta ``s B A`` to each adapted weight of a plain copy of the backbone and
writes the result with ``save_pretrained`` plus the backbone dir's tokenizer files, so the existing
backbone-from-path code (``--model_name_or_path``, ``--teacher_model``) loads it. Its logits on instruction +
input equal the concat model's (tests/scripts/test_merge_lora.py). At scale the teacher is a fully finetuned
checkpoint (Tk-Instruct) and needs no merge.

    python scripts/merge_lora.py --adapter runs/concat/baseline_lora --out runs/teacher_model
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from tagi_ds import artifacts, assembly, data, stages
from tagi_ds.config import ConfigError
from tagi_ds.files import atomic_dir
from tagi_ds.runtime.preflight import guarded

WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "config.json")


def merge(adapter: Path, out: Path) -> Path:
    """``adapter`` (a baseline_lora/ dir) merged into the backbone it was trained on, written to ``out``."""
    cfg = artifacts.read_config(adapter, "--adapter")
    src = cfg.model.model_name_or_path
    if not src:
        raise ConfigError(
            f"--adapter {adapter}: trained on a random-init backbone (no model.model_name_or_path); a merged copy "
            "needs the backbone's directory (train the baseline with --model_name_or_path DIR)"
        )
    tok = data.load_tokenizer(cfg)
    spec = stages.spec("finetune", cfg)
    if spec.mode.source.name != "shared":
        raise ConfigError(f"--adapter {adapter}: mode {cfg.mode} has no shared LoRA (a baseline_lora/ dir has one)")
    artifacts.check(adapter, assembly.meta_model(cfg, spec, tok.special_ids), "--adapter")
    ids = tok.special_ids
    model = assembly.assemble(spec, cfg, {}, ids, runner="none", loads=assembly.Loads(artifact=adapter)).model
    # The same frozen weights, without adapted sites: the module the merged copy is saved from.
    plain = assembly.assemble(spec, cfg, {}, ids, runner="none", adapt=lambda backbone: backbone).model
    bank = model.bank
    with torch.no_grad():
        for s in model.sites:
            A, B = bank.A[str(s.index)][0], bank.B[str(s.index)][0]  # [r, d_in], [d_out, r]
            w = plain.get_submodule(s.name).weight
            w += (bank.scale * (B.float() @ A.float())).to(w.dtype)
    with atomic_dir(out) as tmp:
        # The tokenizer and any other file of the backbone dir, then the merged weights and config over them.
        for f in Path(src).iterdir():
            if f.is_file() and not any(f.match(p) for p in WEIGHTS):
                shutil.copy2(f, tmp / f.name)
        plain.save_pretrained(tmp)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, help="a baseline_lora/ dir (launchers/finetune.py --mode concat)")
    ap.add_argument("--out", required=True, help="the backbone dir to write (for --teacher_model)")
    args = ap.parse_args(argv)
    print(f"merged {args.adapter} -> {merge(Path(args.adapter), Path(args.out))}")


if __name__ == "__main__":
    guarded(lambda: main(sys.argv[1:]))
