"""Files -> training batches. Public API (everything else in the package is an implementation detail).

Sources (``--data SPEC``): ``builtin`` (the built-in instruction suite), ``sni:DIR`` (Super-NaturalInstructions
layout), ``p3:DIR`` (P3 templates as JSON lines), ``text:FILE_OR_DIR`` (a pretraining corpus).

Tasks
    ``parse_spec(spec) -> DataSpec``                      unknown scheme / missing path -> DataError
    ``load_tasks(spec, data_cfg, split) -> list[Task]``   split: train | test; filters of ``data_cfg``
    ``teacher_rows(tasks, granularity) -> dict[str, int]``  task or category name -> teacher-bank row
    ``Task(name, category, definitions, instances, positives, negatives)``, ``Example(id, input, outputs,
    choices)``, ``Demo(input, output, explanation)``
    ``format_instruction(task, setting, num_pos)``, ``format_instance(text)``, ``format_concat(...)``: the
    Tk-Instruct prompt, cut into TAGI's instruction and instance parts
    ``builtin_suite(seed) -> {"train": tasks, "dev": tasks, "test": tasks}``, ``write_builtin(dir, seed)``,
    ``write_sni(dir, train, test)``: the built-in suite and the SNI layout writer

Tokenizer
    ``load_tokenizer(cfg) -> Tokenizer``: ``data.tokenizer`` dir, else the model dir (AutoTokenizer), else the
    built-in sentencepiece model (vocab 1024; pad=0 eos=1 unk=2 bos=3). ``Tokenizer``: ``encode(text)``
    (no special tokens), ``decode(ids)``, ``pad_id``, ``eos_id``, ``bos_id``, ``vocab_size``.
    ``train_sentencepiece(sentences=None, seed=0) -> bytes``: the deterministic builder of the shipped model.

Batches (``tagi_ds.batch.TaskBatch``)
    ``build_train_loader(cfg, tokenizer, stage, rank=0, world_size=1, teacher_rows=None, tasks=None)
    -> TaskLoader``: stage teachers | pretrain | finetune; infinite, ``state_dict()`` / ``load_state_dict()``
    for exact resume, ``stats`` / ``report()`` for truncation counts. The table in ``loader.py`` lists the
    fields each stage and mode fills.
    ``build_eval_loader(cfg, tokenizer, split="test", rank=0, world_size=1, generation=True) -> EvalLoader``:
    one ordered pass (ranks padded to equal length: deduplicate by example id).

Config: ``DataConfig`` (``tagi_ds.config``); added for this package: ``corpus`` (stage-1 text source),
``streaming`` (stream the corpus files), ``sample_variants`` (train-time paraphrase / answer draws).
Collation tokenises on the fly in the training process (cheap next to a step): there are no loader workers.

Errors: bad data raises ``DataError`` (a ``ValueError``) with one line naming file, field and value.
Inspection: ``python -m tagi_ds.data --data SPEC`` prints tasks, categories and length percentiles.
"""

from tagi_ds.data.builtin import builtin_suite, write_builtin
from tagi_ds.data.collate import IGNORE_INDEX, PretrainCollator, TaskCollator
from tagi_ds.data.corpus import builtin_documents, split_abc
from tagi_ds.data.loader import EvalLoader, TaskLoader, build_eval_loader, build_train_loader
from tagi_ds.data.prompt import format_concat, format_instance, format_instruction
from tagi_ds.data.sampler import Segment, TaskBatchSampler
from tagi_ds.data.sni import write_sni
from tagi_ds.data.spec import DataSpec, load_tasks, parse_spec, teacher_rows
from tagi_ds.data.task import DataError, Demo, Example, Task
from tagi_ds.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer, train_sentencepiece

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "DataSpec",
    "Demo",
    "EvalLoader",
    "Example",
    "HFTokenizer",
    "PretrainCollator",
    "Segment",
    "SentencePieceTokenizer",
    "Task",
    "TaskBatchSampler",
    "TaskCollator",
    "TaskLoader",
    "Tokenizer",
    "build_eval_loader",
    "build_train_loader",
    "builtin_documents",
    "builtin_suite",
    "format_concat",
    "format_instance",
    "format_instruction",
    "load_tasks",
    "load_tokenizer",
    "parse_spec",
    "split_abc",
    "teacher_rows",
    "train_sentencepiece",
    "write_builtin",
    "write_sni",
]
