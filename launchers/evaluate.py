#!/usr/bin/env python
"""Evaluate on unseen tasks: TAGI, the concat / no-instruction baselines, or the teachers.

SNI-style data (builtin, sni:DIR): greedy generation (<= --max_new_tokens), exact match and ROUGE-L.
P3 data (p3:DIR): rank classification of the answer choices, accuracy per prompt / dataset, MTest11 mean.
Writes OUTPUT_DIR/predictions.jsonl, results.json (metrics, per-task FLOPs and wall time) and config.json.
Runs in one process, or on N ranks in step under ZeRO-3 (same predictions):

    python launchers/evaluate.py --hypernet runs/finetune/hypernet --output_dir runs/eval/tagi
    deepspeed --num_gpus 2 launchers/evaluate.py --deepspeed ds_configs/z3.json \\
        --hypernet runs/finetune/hypernet --data sni:../shared/data/sni_sample --output_dir runs/eval/tagi
    python launchers/evaluate.py --adapter runs/concat/baseline_lora --output_dir runs/eval/concat
    python launchers/evaluate.py --mode no_instruction --output_dir runs/eval/bare      # bare backbone
    python launchers/evaluate.py --teachers runs/teachers/teachers --split train --output_dir runs/eval/teachers
    python launchers/evaluate.py --hypernet runs/finetune/hypernet --split dev --output_dir runs/eval/dev  # tuning
"""

import textwrap

from tagi_ds.cli import base_parser, guarded


def parser():
    # --help shows the examples above; the artifact's config.json fixes the model, the recipe only without one
    p = base_parser(
        "evaluate.py",
        __doc__,
        recipe_default=None,
        epilog=textwrap.fill(
            "--mode defaults to tagi with --hypernet and to the baseline's own mode with --adapter; --teachers "
            "selects mode teacher. The default run reads the test split of --data (the built-in suite: its 29 "
            "held-out tasks, at most data.max_instances_per_task=100 instances each) and writes runs/eval/. Bad "
            "input: one line 'error: ...' and exit code 2, nothing written."
        ),
    )
    p.add_argument(
        "--hypernet",
        default=None,
        metavar="DIR",
        help="mode tagi: hypernet/ dir from pretrain.py or finetune.py (generated adapters)",
    )
    p.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="mode concat / no_instruction: baseline_lora/ dir from finetune.py --mode concat|"
        "no_instruction (without it: the bare backbone)",
    )
    p.add_argument(
        "--teachers",
        default=None,
        metavar="DIR",
        help="mode teacher: teachers/ dir from train_teachers.py; each task uses its own row "
        "(every evaluated task needs one)",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "dev", "train"],
        help="which split's tasks to evaluate; dev = the built-in suite's development tasks (new skill "
        "chains held out like the test tasks, for tuning)",
    )
    p.add_argument(
        "--task",
        default="auto",
        choices=["auto", "generate", "rank"],
        help="generate (greedy; EM / ROUGE-L) or rank (answer choices; accuracy); auto = rank for p3:",
    )
    p.add_argument("--max_new_tokens", type=int, default=128, help="generation budget per example (greedy)")
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="rows per batch and rank (default: data.tasks_per_batch x data.examples_per_task)",
    )
    p.add_argument(
        "--flops",
        default="auto",
        choices=["auto", "counter", "formula"],
        help="counter (torch FlopCounterMode), formula (2 x params x tokens, see tagi_ds/eval/cost.py);"
        " auto = counter on CPU, formula on GPU",
    )
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    from tagi_ds.artifact_flags import resolve_evaluation  # heavy (transformers, deepspeed): after --help
    from tagi_ds.eval.evaluate import run

    cfg, eval_args = resolve_evaluation(args)
    run(cfg, eval_args)


if __name__ == "__main__":
    guarded(main)
