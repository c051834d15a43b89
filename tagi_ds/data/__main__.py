"""Inspect a data source: ``python -m tagi_ds.data --data SPEC [--split train|test|all] [--set data.k=v ...]``.

Prints tasks, categories, instance counts and token-length percentiles (instruction, input, output, and the
concatenated Tk-Instruct prompt) with the configured tokenizer; ``--write-sni DIR`` writes the tasks in
the SNI layout (e.g. to look at the built-in suite as files).
"""

from __future__ import annotations

import sys
from collections import Counter
from textwrap import shorten

import numpy as np
from rich.console import Console
from rich.table import Table

from tagi_ds.config import ConfigError, apply_overrides
from tagi_ds.data.corpus import builtin_documents, corpus_files, iter_documents
from tagi_ds.data.prompt import format_instance, format_instruction
from tagi_ds.data.sni import write_sni
from tagi_ds.data.spec import SCHEMES, load_tasks, parse_spec
from tagi_ds.data.task import DataError
from tagi_ds.data.tokenizer import load_tokenizer
from tagi_ds.recipes import get_recipe
from tagi_ds.runtime.flags import Parser, add_set_flag
from tagi_ds.runtime.preflight import EXIT_USAGE, check_output_dir

PERCENTILES = (50, 90, 99)


def length_row(name: str, lengths: list[int], budget: int | None) -> list[str]:
    a = np.asarray(lengths)
    over = "-" if budget is None else f"{int((a > budget).sum())} ({100 * float((a > budget).mean()):.1f}%)"
    return [
        name,
        str(len(a)),
        *(f"{np.percentile(a, p):.0f}" for p in PERCENTILES),
        str(a.max()),
        "-" if budget is None else str(budget),
        over,
    ]


def length_table(title: str, rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for col in ("text", "count", *(f"p{p}" for p in PERCENTILES), "max", "budget", "over budget"):
        table.add_column(col, justify="left" if col == "text" else "right")
    for row in rows:
        table.add_row(*row)
    return table


def show_tasks(console: Console, cfg, tok, split: str, max_rows: int) -> list:
    d = cfg.data
    tasks = load_tasks(d.spec, d, split)
    n_inst = sum(len(t.instances) for t in tasks)
    console.print(
        f"[bold]{split}[/bold]: {len(tasks)} tasks, {n_inst} instances, {len({t.category for t in tasks})} categories"
    )
    cats = Table(title=f"{split}: categories")
    for col in ("category", "tasks", "instances"):
        cats.add_column(col, justify="left" if col == "category" else "right")
    per_cat: Counter = Counter()
    inst_cat: Counter = Counter()
    for t in tasks:
        per_cat[t.category] += 1
        inst_cat[t.category] += len(t.instances)
    for c in sorted(per_cat):
        cats.add_row(c, str(per_cat[c]), str(inst_cat[c]))
    console.print(cats)
    table = Table(title=f"{split}: tasks (first {min(max_rows, len(tasks))} of {len(tasks)})")
    for col in ("task", "category", "instances", "definition", "first instance -> output"):
        table.add_column(col, overflow="fold")
    for t in tasks[:max_rows]:
        ex = t.instances[0]
        cut = lambda text, width: shorten(text, width, placeholder=" ...")
        table.add_row(
            t.name,
            t.category,
            str(len(t.instances)),
            cut(t.definitions[0], 120),
            f"{cut(ex.input, 50)!r} -> {cut(ex.outputs[0], 40)!r}",
        )
    console.print(table)
    instr = [len(tok.encode(format_instruction(t, d.setting, d.num_pos))) for t in tasks]
    per_ex = [
        (
            len(tok.encode(ex.input.strip())),
            len(tok.encode(ex.outputs[0])),
            i + len(tok.encode(format_instance(ex.input))),
        )
        for t, i in zip(tasks, instr)
        for ex in t.instances
    ]
    inp, out, concat = (list(x) for x in zip(*per_ex))
    console.print(
        length_table(
            f"{split}: token lengths ({tok.name}, setting {d.setting})",
            [
                length_row("instruction (per task)", instr, d.max_instruction_length - 1),
                length_row("input", inp, d.max_source_length - 1),
                length_row("output (first answer)", out, d.max_target_length - 1),
                length_row("concat prompt", concat, d.max_instruction_length + d.max_source_length - 1),
            ],
        )
    )
    return tasks


def show_corpus(console: Console, cfg, tok, path) -> None:
    docs = list(iter_documents(corpus_files(path))) if path is not None else builtin_documents()
    lengths = [len(tok.encode(doc)) + 1 for doc in docs]  # + eos between documents
    total = sum(lengths)
    console.print(
        f"[bold]corpus[/bold] {path or 'builtin'}: {len(docs)} documents, {total} tokens, "
        f"{total // cfg.data.pretrain_length} windows of {cfg.data.pretrain_length}"
    )
    console.print(length_table(f"document lengths ({tok.name})", [length_row("document", lengths, None)]))


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m tagi_ds.data", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="builtin", help=f"data spec: {' | '.join(SCHEMES)}:PATH")
    parser.add_argument("--recipe", default="tiny", help="the config whose data.* and tokenizer are used")
    parser.add_argument(
        "--split",
        choices=("train", "dev", "test", "all"),
        default="all",
        help="all = train and test (and dev for the built-in suite)",
    )
    add_set_flag(parser, "any config field, e.g. --set data.setting=def_pos data.english_only=false")
    parser.add_argument("--max-rows", type=int, default=20, help="tasks listed per split")
    parser.add_argument("--write-sni", metavar="DIR", help="also write the tasks in the SNI layout")
    console = Console(width=None if sys.stdout.isatty() else 140)
    try:
        args = parser.parse_args(argv)
        if args.max_rows < 0:
            raise ConfigError(f"--max-rows: must be >= 0 ({args.max_rows})")
        cfg = apply_overrides(get_recipe(args.recipe), [f"data.spec={args.data}", *args.overrides]).validate()
        if args.write_sni:
            check_output_dir(args.write_sni, "--write-sni")
        spec = parse_spec(cfg.data.spec)
        tok = load_tokenizer(cfg)
        if spec.scheme == "text":
            show_corpus(console, cfg, tok, spec.path)
            return 0
        every = ("train", "dev", "test") if spec.scheme == "builtin" else ("train", "test")
        splits = every if args.split == "all" else (args.split,)
        loaded = {s: show_tasks(console, cfg, tok, s, args.max_rows) for s in splits}
        if args.write_sni:
            out = write_sni(args.write_sni, loaded.get("train", ()), loaded.get("test", ()))
            console.print(f"wrote {sum(map(len, loaded.values()))} tasks to {out}")
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
