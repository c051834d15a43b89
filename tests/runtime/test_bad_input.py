"""Bad input, table-driven, across every entry point: the five launchers, the planner and ``python -m
tagi_ds.data``. Each case must end with exit code 2, exactly one non-empty stderr line starting with
``error:`` and naming what is at fault, no traceback, and a fresh ``--output_dir`` left absent (nothing
written, no probe left behind).

The cases run in this process (calling each entry point's main with argv, as its ``__main__`` does), which
costs milliseconds each; a few run as real processes, and one under the deepspeed launcher on 2 ranks, for
what only a process shows (the traceback that would otherwise print; rank 0 alone reporting).
Corrupt-file cases damage their own copies of the session's artifacts (``conftest.runs``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tagi_ds.cli import guarded, train_main
from tests.train.harness import HANG_S, REPO, env, launch


@dataclass
class Case:
    id: str
    entry: str  # pretrain | teachers | finetune | evaluate | generate_adapter | plan | data | serve
    argv: list[str]
    needle: str | tuple[str, ...]  # what the one line must name (the flag, key, file or value at fault)
    out: bool = True  # give the entry point a fresh --output_dir


def _launcher(name: str):
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", REPO / "launchers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_entry(entry: str, argv: list[str]) -> tuple[object, str]:
    """(exit code, stderr) of one entry point run in this process as its ``__main__`` runs it."""
    err = io.StringIO()
    code: object = 0
    with contextlib.redirect_stderr(err):
        try:
            if entry in ("pretrain", "teachers", "finetune"):
                guarded(lambda: train_main(entry, entry, argv))
            elif entry in ("evaluate", "generate_adapter"):
                guarded(lambda: _launcher(entry).main(argv))
            elif entry == "plan":
                from tagi_ds.plan.cli import main

                main(argv)
            elif entry == "serve":
                from tagi_ds.serve.__main__ import main as serve_main

                guarded(lambda: serve_main(argv))
            else:
                from tagi_ds.data.__main__ import main

                code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


class Files:
    """Damaged copies of the session's artifacts, made on demand under ``tmp``."""

    def __init__(self, runs: Path, tmp: Path) -> None:
        self.runs, self.tmp = runs, tmp

    def copy(self, rel: str) -> Path:
        dst = self.tmp / "copies" / rel.replace("/", "_")
        if not dst.exists():
            shutil.copytree(self.runs / rel, dst)
        return dst

    def truncated(self, rel: str, name: str, keep: str = "0.5") -> Path:
        d = self.copy(rel)
        f = d / name
        f.write_bytes(f.read_bytes()[: int(f.stat().st_size * float(keep))])
        return d

    def edited(self, rel: str, name: str, edit) -> Path:
        d = self.copy(rel)
        f = d / name
        f.write_text(edit(f.read_text()) if callable(edit) else edit)
        return d

    def file(self, name: str, data: bytes) -> Path:
        f = self.tmp / name
        f.write_bytes(data)
        return f

    def ds(self, name: str, obj) -> Path:
        return self.file(name, json.dumps(obj).encode())

    def resolve(self, token: str) -> str:
        """``{kind:args}`` placeholders of the table -> paths."""
        prefix, brace, rest = token.partition("{")
        if not (brace and token.endswith("}")):
            return token
        if prefix:  # text:{empty}
            return prefix + self.resolve(brace + rest)
        kind, _, arg = token[1:-1].partition(":")
        fn = {
            "teachers": lambda: self.runs / "teachers/teachers",
            "hypernet": lambda: self.runs / "pretrain/hypernet",
            "adapter": lambda: self.runs / "concat/baseline_lora",
            "trunc": lambda: self.truncated(*arg.split("|")),
            "json": lambda: self.edited(*arg.split("|", 2)),
            "nosites": lambda: self.edited(
                arg, "config.json", lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "sites"})
            ),
            "empty": lambda: self.file("empty.txt", b""),
            "binary": lambda: self.file("binary.txt", b"\xff\xfe\x00 not text"),
            "afile": lambda: self.file("a_file", b"x"),
            "under_afile": lambda: self.file("a_file", b"x") / "run",
            "teachers_rank4": lambda: self.edited("teachers/teachers", "config.json", edit_json(rank=4)),
            "backbone": lambda: self.runs / "backbone",
            # backbone_set:KEY=JSON -> a copy of the backbone dir whose config.json has KEY set to JSON
            "backbone_set": lambda: self.edited(
                "backbone", "config.json", edit_json(**{arg.split("=")[0]: json.loads(arg.split("=", 1)[1])})
            ),
            "ds": lambda: self.ds(f"ds_{len(list(self.tmp.glob('ds_*')))}.json", json.loads(arg)),
            "badsni": lambda: self._bad_sni(),
            "ckpt_tmp": lambda: self._ckpt_renamed(),
            "ckpt_trunc": lambda: self.truncated("pretrain/checkpoints/step-2", arg),
            "ckpt": lambda: self.runs / arg,
            "ckpt_nofile": lambda: self._ckpt_without(arg),
        }[kind]
        return str(fn())

    def _bad_sni(self) -> Path:
        root = self.tmp / "sni"
        (root / "tasks").mkdir(parents=True)
        (root / "splits" / "default").mkdir(parents=True)
        (root / "tasks" / "task001_x.json").write_text('{"Definition": ["x"],\n "Instances": [}')
        (root / "splits" / "default" / "train_tasks.txt").write_text("task001_x\n")
        return root

    def _ckpt_renamed(self) -> Path:
        d = self.copy("pretrain/checkpoints/step-2")
        return d.rename(d.with_name("step-2.tmp"))

    def _ckpt_without(self, name: str) -> Path:
        d = self.copy("pretrain/checkpoints/step-2")
        (d / name).unlink()
        return d


def edit_json(**changes):
    def edit(text: str) -> str:
        obj = json.loads(text)
        obj.update(changes)
        return json.dumps(obj)

    return edit


TEACH = ["--teachers", "{teachers}"]
NO_PARAM = ["--set", "loss.param_weight=0"]
HN = ["--hypernet", "{hypernet}"]
FAULT_RULE = (
    "train.inject_fault: must be empty, nan@STEP[-LAST]:RANK, raise|kill|stop@STEP:RANK, enospc@STEP or rofs@STEP"
)
CASES = [
    # flags and argparse
    Case("unknown-flag", "pretrain", ["--max_stpes", "3"], "unrecognized arguments: --max_stpes"),
    Case("unknown-recipe", "teachers", ["--recipe", "t5-small"], "argument --recipe: invalid choice"),
    Case("max-steps-not-int", "pretrain", ["--max_steps", "abc"], "argument --max_steps"),
    Case("max-steps-zero", "pretrain", ["--max_steps", "0"], "--max_steps: must be > 0 (0)"),
    Case("save-steps-negative", "finetune", ["--save_steps", "-1"], "--save_steps: must be > 0 (-1)"),
    Case("mode-choice", "finetune", ["--mode", "lora"], "argument --mode: invalid choice"),
    # config keys and values (ranges declared with the fields)
    Case("unknown-key", "pretrain", ["--set", "hypernet.rnak=3"], "hypernet.rnak: unknown config key"),
    Case("unknown-section", "pretrain", ["--set", "nosuch.x=1"], "nosuch: unknown config key"),
    Case("set-without-equals", "pretrain", ["--set", "rank"], "--set rank: expected KEY=VALUE"),
    Case("set-a-section", "pretrain", ["--set", "hypernet=3"], "hypernet: is a section"),
    Case("retired-key", "pretrain", ["--set", "data.num_workers=2"], "data.num_workers: removed: it was never used"),
    Case("lr-not-a-number", "pretrain", ["--set", "train.lr=fast"], "train.lr: expects a finite float ('fast')"),
    Case("lr-negative", "pretrain", ["--set", "train.lr=-1"], "train.lr: must be > 0 (-1.0)"),
    Case("save-steps-zero", "pretrain", ["--set", "train.save_steps=0"], "train.save_steps: must be > 0 (0)"),
    Case("log-steps-zero", "teachers", ["--set", "train.log_steps=0"], "train.log_steps: must be > 0 (0)"),
    Case("grad-accum-zero", "pretrain", ["--set", "train.grad_accum=0"], "train.grad_accum: must be > 0 (0)"),
    Case("warmup-nan", "pretrain", ["--set", "train.warmup_ratio=nan"], "train.warmup_ratio: expects a finite"),
    Case("warmup-above-one", "pretrain", ["--set", "train.warmup_ratio=1.5"], "train.warmup_ratio: must be in [0, 1]"),
    Case("lr-inf", "finetune", ["--set", "train.lr=inf"], "train.lr: expects a finite float ('inf')"),
    Case("inject-fault-bogus", "pretrain", ["--set", "train.inject_fault=bogus"], "train.inject_fault: must be"),
    Case(
        "inject-fault-enospc-step", "pretrain", ["--set", "train.inject_fault=enospc@x"], f"{FAULT_RULE} ('enospc@x')"
    ),
    Case("inject-fault-kill-no-rank", "pretrain", ["--set", "train.inject_fault=kill@3"], f"{FAULT_RULE} ('kill@3')"),
    Case(
        "inject-fault-stop-range",
        "pretrain",
        ["--set", "train.inject_fault=stop@3-5:1"],
        f"{FAULT_RULE} ('stop@3-5:1')",
    ),
    Case(
        "grad-ratio-every-negative",
        "finetune",
        ["--set", "train.grad_ratio_every=-1"],
        "train.grad_ratio_every: must be >= 0 (-1)",
    ),
    Case(
        "param-align-choice",
        "finetune",
        ["--set", "loss.param_align=absolute"],
        "loss.param_align: must be one of relative, delta, factors",
    ),
    Case(
        "builtin-suite-choice",
        "pretrain",
        ["--set", "data.builtin_suite=v3"],
        "data.builtin_suite: must be one of v1, v2 ('v3')",
    ),
    Case("hidden-zero", "pretrain", ["--set", "hypernet.hidden=0"], "hypernet.hidden: must be > 0 (0)"),
    Case("num-layers-negative", "pretrain", ["--set", "model.num_layers=-1"], "model.num_layers: must be > 0 (-1)"),
    Case("dropout-one", "pretrain", ["--set", "hypernet.dropout=1"], "hypernet.dropout: must be in [0, 1)"),
    Case("seed-negative", "pretrain", ["--seed", "-1"], "train.seed: must be in [0, 4294967295] (-1)"),
    Case("temperature-zero", "finetune", ["--set", "loss.temperature=0"], "loss.temperature: must be > 0"),
    Case("kl-weight-negative", "finetune", ["--set", "loss.kl_weight=-1"], "loss.kl_weight: must be >= 0"),
    Case("bool-not-bool", "pretrain", ["--set", "hypernet.fusion=maybe"], "hypernet.fusion: expects bool"),
    Case("granularity", "teachers", ["--set", "teacher.granularity=domain"], "teacher.granularity: must be one of"),
    Case("precision-bf16-on-cpu", "pretrain", ["--set", "train.precision=bf16"], "train.precision=bf16 needs a CUDA"),
    Case("source-length-one", "finetune", ["--set", "data.max_source_length=1"], "data.max_source_length: must be"),
    Case("llama-fusion", "pretrain", ["--set", "model.arch=llama"], "hypernet.fusion: true is T5-only"),
    Case(
        "llama-kv-heads",
        "pretrain",
        ["--recipe", "tiny-llama", "--set", "model.num_kv_heads=3"],
        "model.num_kv_heads: must divide model.num_heads=4 (3)",
    ),
    Case("unknown-projection", "pretrain", ["--set", "model.adapted=q,zz"], "model.adapted: unknown T5 projection"),
    Case("trainable-matches-nothing", "teachers", ["--set", 'model.trainable=["nomatch"]'], "model.trainable"),
    Case("trainable-bad-regex", "pretrain", ["--set", 'model.trainable=["("]'], "model.trainable: bad regex"),
    Case("frozen-backbone-bad-choice", "pretrain", ["--set", "train.frozen_backbone=sharded"], "train.frozen_backbone"),
    Case("pretrain-concat", "pretrain", ["--mode", "concat"], "mode must be tagi, got 'concat'"),
    # data sources
    Case("data-scheme", "pretrain", ["--data", "ftp:/x"], "unknown scheme 'ftp'"),
    Case("data-missing-dir", "finetune", ["--data", "sni:/nonexistent/sni"], "/nonexistent/sni does not exist"),
    Case("corpus-empty-file", "pretrain", ["--data", "text:{empty}"], "empty corpus"),
    Case("corpus-not-utf8", "pretrain", ["--data", "text:{binary}"], "binary.txt"),
    Case("sni-malformed-json", "teachers", ["--data", "sni:{badsni}"], "task001_x.json: invalid JSON"),
    Case("data-tasks-unknown", "teachers", ["--set", "data.tasks=no_such_task"], "data.tasks names"),
    Case("data-categories-unknown", "teachers", ["--set", "data.categories=Nope"], "data.categories"),
    # a local checkpoint dir for the backbone (its config.json and weight headers, before anything is built)
    Case("model-dir-missing", "pretrain", ["--model_name_or_path", "/nonexistent/t5"], "/nonexistent/t5"),
    Case(
        "model-weights-truncated",
        "pretrain",
        ["--model_name_or_path", "{trunc:backbone|model.safetensors}"],
        "model.safetensors: truncated",
    ),
    Case(
        "model-arch-mismatch",
        "pretrain",
        ["--recipe", "tiny-llama", "--model_name_or_path", "{ckpt:backbone}"],
        "a t5 checkpoint, but model.arch=llama",
    ),
    Case(
        "model-config-invalid", "pretrain", ["--model_name_or_path", "{json:backbone|config.json|[1,}"], "config.json"
    ),
    # the DeepSpeed JSON, against DeepSpeed's own schema
    Case("ds-missing", "pretrain", ["--deepspeed", "nope.json"], "--deepspeed 'nope.json': no such file"),
    Case("ds-directory", "pretrain", ["--deepspeed", "ds_configs"], "is a directory"),
    Case("ds-invalid-json", "pretrain", ["--deepspeed", "{afile}"], "invalid JSON at line 1"),
    Case("ds-list", "finetune", ["--deepspeed", "{ds:[1, 2]}"], "expected a JSON object"),
    Case(
        "ds-auto",
        "pretrain",
        ["--deepspeed", '{ds:{"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}}'],
        'zero_optimization.reduce_bucket_size is "auto"',
    ),
    Case(
        "ds-owned-key",
        "teachers",
        ["--deepspeed", '{ds:{"train_batch_size": 8}}'],
        "'train_batch_size' comes from the tagi-ds config",
    ),
    Case(
        "ds-stage-three",
        "pretrain",
        ["--deepspeed", '{ds:{"zero_optimization": {"stage": "three"}}}'],
        "zero_optimization.stage: Input should be",
    ),
    Case(
        "ds-unknown-zero-key",
        "finetune",
        ["--deepspeed", '{ds:{"zero_optimization": {"stage": 3, "bogus": 1}}}'],
        "zero_optimization.bogus: Extra inputs are not permitted (1)",
    ),
    Case(
        "ds-unknown-top-key",
        "pretrain",
        ["--deepspeed", '{ds:{"zero_optimization": {"stage": 2}, "zero_optimisation": {}}}'],
        "zero_optimisation: not a DeepSpeed",
    ),
    Case(
        "ds-bad-offload-device",
        "pretrain",
        ["--deepspeed", '{ds:{"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}}}'],
        "zero_optimization.offload_param.device",
    ),
    Case(
        "ds-rejected-value",
        "teachers",
        ["--deepspeed", '{ds:{"zero_optimization": {"stage": 3}, "communication_data_type": "fp8"}}'],
        "DeepSpeed rejects it: Invalid communication_data_type",
    ),
    # the output directory
    Case(
        "out-is-a-file", "pretrain", ["--output_dir", "{afile}"], "--output_dir: exists and is not a directory", False
    ),
    Case("out-under-a-file", "teachers", ["--output_dir", "{under_afile}"], "is not a directory", False),
    Case(
        "out-under-proc",
        "pretrain",
        ["--output_dir", "/proc/tagi_run"],
        "--output_dir: cannot create files under /proc",
        False,
    ),
    # checkpoints to resume
    Case("resume-latest-none", "pretrain", ["--resume_from_checkpoint", "latest"], "no complete checkpoint"),
    Case("resume-tmp-dir", "pretrain", ["--resume_from_checkpoint", "{ckpt_tmp}"], "an incomplete checkpoint"),
    Case(
        "resume-other-stage",
        "pretrain",
        ["--resume_from_checkpoint", "{ckpt:teachers/checkpoints/step-2}"],
        "written with stage teachers, this run has pretrain",
    ),
    Case(
        "resume-other-mode",
        "finetune",
        [
            "--resume_from_checkpoint",
            "{ckpt:concat/checkpoints/step-2}",
            "--set",
            "loss.kl_weight=0",
            "loss.param_weight=0",
        ],
        "written with mode concat, this run has tagi",
    ),
    Case(
        "resume-other-recipe",
        "pretrain",
        ["--recipe", "mini", "--resume_from_checkpoint", "{ckpt:pretrain/checkpoints/step-2}"],
        "written with recipe tiny",
    ),
    Case(
        "resume-other-shapes",
        "pretrain",
        ["--set", "hypernet.rank=4", "--resume_from_checkpoint", "{ckpt:pretrain/checkpoints/step-2}"],
        "trainable parameter generator.",
    ),
    Case(
        "resume-truncated-trainer",
        "pretrain",
        ["--resume_from_checkpoint", "{ckpt_trunc:trainer_rank0.pt}"],
        "trainer_rank0.pt is damaged",
    ),
    Case(
        "resume-truncated-deepspeed",
        "pretrain",
        ["--resume_from_checkpoint", "{ckpt_trunc:zero_pp_rank_0_mp_rank_00_optim_states.pt}"],
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ),
    Case(
        "resume-missing-trainer",
        "pretrain",
        ["--resume_from_checkpoint", "{ckpt_nofile:trainer_rank0.pt}"],
        "not a complete tagi-ds checkpoint",
    ),
    # artifacts a run reads
    Case("finetune-needs-teachers", "finetune", [], "--teachers: finetune with loss.kl_weight"),
    Case("teachers-missing", "finetune", ["--teachers", "/nonexistent/teachers"], "rows.json: missing"),
    Case(
        "teachers-truncated",
        "finetune",
        ["--teachers", "{trunc:teachers/teachers|teachers.safetensors}"],
        "teachers.safetensors: truncated",
    ),
    Case(
        "teachers-config-invalid",
        "finetune",
        ["--teachers", "{json:teachers/teachers|config.json|{not json}"],
        "config.json: invalid JSON",
    ),
    Case("teachers-config-no-sites", "finetune", ["--teachers", "{nosites:teachers/teachers}"], "no 'sites' key"),
    Case(
        "teachers-rows-not-object",
        "finetune",
        ["--teachers", "{json:teachers/teachers|rows.json|[1, 2]}"],
        "rows.json: expected a JSON object",
    ),
    Case(
        "teachers-other-rank",
        "finetune",
        ["--teachers", "{teachers_rank4}"],
        ("--teachers ", "teachers.safetensors: tensor A.0 has shape (76, 8, 64), this model's is (76, 4, 64)"),
    ),
    Case("teachers-unused", "finetune", [*TEACH, "--mode", "concat"], "--teachers"),
    Case(
        "teacher-model-missing",
        "finetune",
        ["--teacher_model", "/nonexistent/teacher", *NO_PARAM],
        "--teacher_model /nonexistent/teacher: expected a local backbone directory with config.json",
    ),
    Case(
        "teacher-model-vocab",
        "finetune",
        ["--teacher_model", "{backbone_set:vocab_size=512}", *NO_PARAM],
        ("--teacher_model ", "vocab_size 512, the student backbone's is 1024"),
    ),
    Case(
        "teacher-model-shape",
        "finetune",
        ["--teacher_model", "{backbone_set:d_model=48}", *NO_PARAM],
        ("--teacher_model ", "model.safetensors: tensor ", "its config.json says"),
    ),
    Case(
        "teacher-model-family",
        "finetune",
        ["--teacher_model", '{backbone_set:model_type="llama"}', *NO_PARAM],
        ("--teacher_model ", "a llama model, but the student backbone is t5"),
    ),
    Case(
        "teacher-model-param-needs-teachers",
        "finetune",
        ["--teacher_model", "{backbone}"],
        "needs teacher LoRA deltas, which a full teacher model has none of: add --teachers DIR",
    ),
    Case(
        "teacher-model-kl-zero",
        "finetune",
        [*TEACH, "--teacher_model", "{backbone}", "--set", "loss.kl_weight=0"],
        "it gives the KL target, but loss.kl_weight=0",
    ),
    Case(
        "teacher-model-teachers-unused",
        "finetune",
        [*TEACH, "--teacher_model", "{backbone}", *NO_PARAM],
        "unused with --teacher_model and loss.param_weight=0",
    ),
    Case(
        "teacher-model-unused",
        "finetune",
        ["--teacher_model", "{backbone}", "--mode", "concat"],
        "--teacher_model",
    ),
    Case(
        "hypernet-truncated",
        "finetune",
        [*TEACH, "--init_hypernet", "{trunc:pretrain/hypernet|generator.safetensors}"],
        "generator.safetensors: truncated",
    ),
    Case(
        "hypernet-header-garbage",
        "finetune",
        [*TEACH, "--init_hypernet", "{trunc:pretrain/hypernet|generator.safetensors|0.0005}"],
        "generator.safetensors",
    ),
    Case(
        "hypernet-config-invalid",
        "finetune",
        [*TEACH, "--init_hypernet", "{json:pretrain/hypernet|config.json|[1,}"],
        "config.json: invalid JSON",
    ),
    Case(
        "hypernet-config-no-sites",
        "finetune",
        [*TEACH, "--init_hypernet", "{nosites:pretrain/hypernet}"],
        "no 'sites' key",
    ),
    Case(
        "hypernet-other-rank",
        "finetune",
        [*TEACH, "--init_hypernet", "{hypernet}", "--set", "hypernet.rank=4"],
        "generator.safetensors: tensor",
    ),
    Case(
        "hypernet-other-sites",
        "finetune",
        ["--init_hypernet", "{hypernet}", "--set", "model.adapted=q,k", "loss.kl_weight=0", "loss.param_weight=0"],
        ("--init_hypernet ", "hypernet/config.json: adapted sites differ"),
    ),
    Case("init-hypernet-concat", "finetune", ["--init_hypernet", "{hypernet}", "--mode", "concat"], "--init_hypernet"),
    # evaluate
    Case("eval-split-choice", "evaluate", [*HN, "--split", "nonsense"], "argument --split: invalid choice"),
    Case("eval-nothing", "evaluate", [], "nothing to evaluate"),
    Case(
        "eval-hypernet-truncated",
        "evaluate",
        ["--hypernet", "{trunc:pretrain/hypernet|generator.safetensors}"],
        "generator.safetensors: truncated",
    ),
    Case("eval-hypernet-no-sites", "evaluate", ["--hypernet", "{nosites:pretrain/hypernet}"], "no 'sites' key"),
    Case(
        "eval-hypernet-config-invalid",
        "evaluate",
        ["--hypernet", "{json:pretrain/hypernet|config.json|[}"],
        ("--hypernet ", "config.json: invalid JSON"),
    ),
    Case(
        "eval-teachers-truncated",
        "evaluate",
        ["--teachers", "{trunc:teachers/teachers|teachers.safetensors}", "--split", "train"],
        "teachers.safetensors: truncated",
    ),
    Case(
        "eval-adapter-truncated",
        "evaluate",
        ["--adapter", "{trunc:concat/baseline_lora|teachers.safetensors}"],
        "teachers.safetensors: truncated",
    ),
    Case("eval-adapter-is-teachers", "evaluate", ["--adapter", "{teachers}"], "a baseline_lora/ dir has one"),
    Case("eval-max-new-tokens", "evaluate", [*HN, "--max_new_tokens", "0"], "--max_new_tokens: must be > 0 (0)"),
    Case("eval-out-file", "evaluate", [*HN, "--output_dir", "{afile}"], "--output_dir: exists and is not", False),
    Case(
        "eval-ds-unknown-key",
        "evaluate",
        [*HN, "--deepspeed", '{ds:{"zero_optimization": {"stage": 3}, "bogus": true}}'],
        "bogus: not a DeepSpeed",
    ),
    Case("eval-other-layers", "evaluate", [*HN, "--set", "model.num_layers=3"], "adapted sites differ"),
    # generate_adapter
    Case(
        "gen-not-utf8",
        "generate_adapter",
        [*HN, "--instruction", b"\xff\xfe".decode("utf-8", "surrogateescape")],
        "--instruction: not valid UTF-8 (b'\\xff\\xfe')",
    ),
    Case("gen-no-text", "generate_adapter", HN, "one of the arguments --instruction --instruction_file is required"),
    Case("gen-empty-text", "generate_adapter", [*HN, "--instruction", "  "], "the text is empty"),
    Case(
        "gen-text-file-missing",
        "generate_adapter",
        [*HN, "--instruction_file", "/nonexistent.txt"],
        "--instruction_file '/nonexistent.txt': cannot read it",
    ),
    Case(
        "gen-hypernet-truncated",
        "generate_adapter",
        ["--hypernet", "{trunc:pretrain/hypernet|generator.safetensors}", "--instruction", "Copy."],
        "generator.safetensors: truncated",
    ),
    Case(
        "gen-out-file",
        "generate_adapter",
        [*HN, "--instruction", "Copy.", "--output_dir", "{afile}"],
        "--output_dir: exists and is not",
        False,
    ),
    Case("gen-data-flag", "generate_adapter", [*HN, "--instruction", "Copy.", "--data", "builtin"], "--data builtin"),
    # the planner
    Case("plan-gpu-mem-nan", "plan", ["--gpu_mem_gb", "nan"], "argument --gpu_mem_gb: expected a finite number", False),
    Case("plan-gpu-mem-inf", "plan", ["--gpu_mem_gb", "inf"], "argument --gpu_mem_gb: expected a finite number", False),
    Case("plan-tflops-text", "plan", ["--tflops_per_gpu", "fast"], "argument --tflops_per_gpu", False),
    Case("plan-stage", "plan", ["--stage", "z4"], "argument --stage: invalid choice", False),
    Case("plan-model", "plan", ["--model", "gpt-5"], "argument --model: invalid choice", False),
    Case("plan-micro-batch", "plan", ["--micro_batch", "0"], "--micro_batch must be > 0", False),
    Case("plan-unknown-flag", "plan", ["--bogus"], "unrecognized arguments: --bogus", False),
    Case("plan-ds-missing", "plan", ["--deepspeed", "nope.json"], "--deepspeed 'nope.json': no such file", False),
    Case("plan-gpu-mem-tiny", "plan", ["--gpu_mem_gb", "0.001"], "--gpu_mem_gb: leaves no usable memory", False),
    Case(
        "start-over-and-resume",
        "pretrain",
        ["--start_over", "--resume_from_checkpoint", "latest"],
        "--start_over: a fresh start",
    ),
    # python -m tagi_ds.serve: every one before the model is built and the port opens
    Case("serve-no-hypernet", "serve", ["--port", "0"], "the following arguments are required: --hypernet", False),
    Case("serve-hypernet-missing", "serve", ["--hypernet", "/nonexistent/hn"], "--hypernet '/nonexistent/hn'", False),
    Case(
        "serve-hypernet-truncated",
        "serve",
        ["--hypernet", "{trunc:pretrain/hypernet|generator.safetensors}"],
        "generator.safetensors: truncated",
        False,
    ),
    Case("serve-max-batch-zero", "serve", [*HN, "--max_batch", "0"], "--max_batch: must be > 0 (0)", False),
    Case("serve-window-negative", "serve", [*HN, "--batch_window_ms", "-1"], "--batch_window_ms: must be >= 0", False),
    Case("serve-window-nan", "serve", [*HN, "--batch_window_ms", "nan"], "--batch_window_ms: must be >= 0", False),
    Case("serve-cache-zero", "serve", [*HN, "--adapter_cache_mb", "0"], "--adapter_cache_mb: must be > 0", False),
    Case("serve-port-range", "serve", [*HN, "--port", "70000"], "--port: must be in [0, 65535] (70000)", False),
    Case("serve-max-tokens-zero", "serve", [*HN, "--max_tokens", "0"], "--max_tokens: must be > 0 (0)", False),
    Case("serve-max-queue-zero", "serve", [*HN, "--max_queue", "0"], "--max_queue: must be > 0 (0)", False),
    Case("serve-body-limit-text", "serve", [*HN, "--max_request_bytes", "1MB"], "argument --max_request_bytes", False),
    Case("serve-mode-choice", "serve", [*HN, "--mode", "lora"], "argument --mode: invalid choice", False),
    Case("serve-unknown-key", "serve", [*HN, "--set", "hypernet.rnak=3"], "hypernet.rnak: unknown config key", False),
    Case(
        "serve-export-dir-file",
        "serve",
        [*HN, "--adapter_export_dir", "{afile}"],
        "--adapter_export_dir: exists and is not a directory",
        False,
    ),
    Case("serve-other-layers", "serve", [*HN, "--set", "model.num_layers=3"], "adapted sites differ", False),
    # python -m tagi_ds.data
    Case("data-cli-scheme", "data", ["--data", "s3://bucket/sni"], "unknown scheme 's3'", False),
    Case(
        "data-cli-set-value",
        "data",
        ["--set", "data.setting=def", "data.num_pos=-1"],
        "data.num_pos: must be >= 0",
        False,
    ),
    Case("data-cli-write-sni-file", "data", ["--write-sni", "{afile}"], "--write-sni: exists and is not", False),
]


def test_table_has_the_kinds_the_contract_names():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert {c.entry for c in CASES} == {
        "pretrain",
        "teachers",
        "finetune",
        "evaluate",
        "generate_adapter",
        "plan",
        "data",
        "serve",
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, runs, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # relative paths (ds_configs, nope.json) as a user in the repository root types them
    files = Files(runs, tmp_path)
    fresh = tmp_path / "fresh_out"
    argv = [files.resolve(a) for a in case.argv] + (["--output_dir", str(fresh)] if case.out else [])
    code, err = run_entry(case.entry, argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in case.needle if isinstance(case.needle, tuple) else (case.needle,):
        assert needle in lines[0], lines[0]
    assert not fresh.exists() or not any(fresh.iterdir())
    assert not list(tmp_path.rglob(".tagi-write-probe-*"))


# -- real processes: no traceback reaches the terminal, one line, one report per job ---------------------------
def _proc(*cmd: str, timeout: int = HANG_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], cwd=REPO, env=env(), capture_output=True, timeout=timeout)


def _one_line(stderr: bytes, needle: str) -> None:
    text = stderr.decode("utf-8", "backslashreplace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], text[-3000:]


def test_processes_report_one_line(runs, tmp_path):
    fresh = tmp_path / "fresh"
    # Non-UTF-8 bytes in argv (as a shell passes $'\xff\xfe'), a truncated artifact, the planner.
    proc = _proc(
        str(REPO / "launchers" / "generate_adapter.py"),
        "--hypernet",
        str(runs / "pretrain/hypernet"),
        "--instruction",
        b"\xff\xfe".decode("utf-8", "surrogateescape"),
        "--output_dir",
        str(fresh),
    )
    assert proc.returncode == 2
    _one_line(proc.stderr, "--instruction: not valid UTF-8")
    damaged = Files(runs, tmp_path).truncated("teachers/teachers", "teachers.safetensors")
    proc = _proc(str(REPO / "launchers" / "finetune.py"), "--teachers", str(damaged), "--output_dir", str(fresh))
    assert proc.returncode == 2
    _one_line(proc.stderr, "teachers.safetensors: truncated")
    proc = _proc("-m", "tagi_ds.plan", "--gpu_mem_gb", "nan")
    assert proc.returncode == 2
    _one_line(proc.stderr, "--gpu_mem_gb: expected a finite number")
    assert not fresh.exists()


@pytest.mark.distributed
def test_two_ranks_report_once(tmp_path):
    fresh = tmp_path / "fresh"
    proc = launch("pretrain.py", 2, ["--output_dir", str(fresh), "--set", "train.save_steps=0"])
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    _one_line(proc.stderr.encode(), "train.save_steps: must be > 0 (0)")
    assert "Traceback" not in proc.stdout and "error:" not in proc.stdout
    assert not fresh.exists()
