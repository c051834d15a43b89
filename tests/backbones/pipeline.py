"""Every stage for several decoder-only families in ONE process group (one deepspeed launch; startup is the
expensive part on CPU): ``deepspeed --num_gpus 2 tests/backbones/pipeline.py ROOT DS_JSON ARCH[:chat] ...
[--register MODULE:FUNCTION]``. ``--register``: each rank first calls that function, which registers a family that a
test defines (its record and recipes: tests/backbones/test_new_family.py).

For each ARCH, with the checkpoint ``ROOT/ARCH/model`` (tests/backbones/families.py): teachers -> pretrain ->
finetune (KL + param-MSE against the teachers) -> evaluate, each through the launchers' own entry points
(``tagi_ds.cli.train_main`` and launchers/evaluate.py's ``main``), under DS_JSON. ``:chat`` turns on
``data.chat_template``. Outputs go to ``ROOT/ARCH/{teachers,pretrain,finetune,eval}``.
"""

import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tagi_ds.cli import guarded, train_main  # noqa: E402

EVAL = [
    "data.tasks=task101_words_reverse_then_uppercase,task102_words_sort_alpha_then_first",
    "data.max_instances_per_task=4",
]  # two built-in held-out tasks: a short evaluation


def evaluate_main():
    spec = importlib.util.spec_from_file_location("evaluate_launcher", REPO / "launchers" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def family(root: Path, arch: str, chat: bool, deepspeed: str) -> None:
    base = root / arch
    common = ["--recipe", f"tiny-{arch}", "--model_name_or_path", str(base / "model"), "--deepspeed", deepspeed]
    sets = [
        "--set",
        "data.tasks_per_batch=2",
        "data.examples_per_task=2",
        "data.max_source_length=48",
        "data.max_target_length=12",
        "data.max_instruction_length=48",
        "train.log_steps=1",
        "train.lr=1e-2",
        f"data.chat_template={chat}",
    ]
    teachers = base / "teachers" / "teachers"
    stages = {
        "teachers": lambda: train_main(
            "teachers", "", [*common, "--output_dir", str(base / "teachers"), "--max_steps", "2", *sets]
        ),
        "pretrain": lambda: train_main(
            "pretrain", "", [*common, "--output_dir", str(base / "pretrain"), "--max_steps", "2", *sets]
        ),
        "finetune": lambda: train_main(
            "finetune",
            "",
            [
                *common,
                "--output_dir",
                str(base / "finetune"),
                "--max_steps",
                "2",
                "--teachers",
                str(teachers),
                "--init_hypernet",
                str(base / "pretrain" / "hypernet"),
                *sets,
            ],
        ),
        "evaluate": lambda: evaluate_main()(
            [
                *common[2:],
                "--hypernet",
                str(base / "finetune" / "hypernet"),
                "--output_dir",
                str(base / "eval"),
                "--max_new_tokens",
                "4",
                "--set",
                f"data.chat_template={chat}",
                *EVAL,
            ]
        ),
    }
    for stage, run in stages.items():
        t0 = time.perf_counter()
        run()
        if os.environ.get("RANK", "0") == "0":
            print(f"[pipeline] {arch} {stage} {time.perf_counter() - t0:.1f}s", flush=True)


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher's; dist reads the env
    if "--register" in argv:
        at = argv.index("--register")
        module, _, function = argv[at + 1].partition(":")
        getattr(importlib.import_module(module), function)()
        del argv[at : at + 2]
    root, deepspeed = Path(argv[0]), argv[1]
    for item in argv[2:]:
        arch, _, flag = item.partition(":")
        family(root, arch, flag == "chat", deepspeed)


if __name__ == "__main__":
    guarded(main)
