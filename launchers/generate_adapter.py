#!/usr/bin/env python
"""Generate a LoRA adapter from an instruction with a trained hypernetwork; export it in PEFT format.

Writes OUTPUT_DIR/adapter_config.json + adapter_model.safetensors (load with peft) and tagi_adapter.json
(provenance). One process, no training; the backbone is built as in training (ZeRO-3 config by default).

    python launchers/generate_adapter.py --hypernet runs/finetune/hypernet \\
        --instruction "Reverse the order of the words and write them in uppercase." --output_dir runs/adapter

    from peft import PeftModel                    # then, with the backbone the hypernet was trained on:
    model = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(BACKBONE), "runs/adapter")

--condition instance (IAG-style use of the same hypernetwork): the hypernetwork reads one instance's
question/context as is (as in stage-1 pretraining it reads raw text), not a "Definition: ..." task
instruction; the adapter then answers that instance:

    python launchers/generate_adapter.py --hypernet runs/pretrain/hypernet --condition instance \\
        --instruction "Context: The Nile flows north into the Mediterranean Sea. Question: Where does the Nile end?" \\
        --output_dir runs/adapter_nile

With hypernet.fusion=true (T5 default) the decoder also reads the instruction's encoder states in tagi-ds;
that is not a weight, so the PEFT adapter alone is the adapter without fusion (a warning says so).
"""

import sys
import textwrap
from pathlib import Path

from tagi_ds.cli import base_parser, guarded, output_dir
from tagi_ds.config import ConfigError


def parser():
    # --help shows the examples above; the hypernet's config.json fixes the model
    p = base_parser(
        "generate_adapter.py",
        __doc__,
        recipe_default=None,
        epilog=textwrap.fill(
            "--data and --mode do not apply (one text, a tagi hypernet); the hypernet's config fixes the model. "
            "Reads --hypernet and the text, trains nothing, writes runs/adapter/ by default. Bad input: one line "
            "'error: ...' and exit code 2, nothing written."
        ),
    )
    p.add_argument("--hypernet", required=True, metavar="DIR", help="hypernet/ dir from pretrain.py or finetune.py")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument(
        "--instruction",
        metavar="TEXT",
        help="the instruction (or, with --condition instance, the question/context) the hypernetwork reads",
    )
    text.add_argument("--instruction_file", metavar="PATH", help="read that text from a UTF-8 file instead")
    p.add_argument(
        "--condition",
        default="task",
        choices=["task", "instance"],
        help="task: a task instruction, formatted 'Definition: ...' as in training; instance: one "
        "question/context, read as is (IAG-style)",
    )
    p.add_argument(
        "--base_model_name_or_path",
        default=None,
        metavar="PATH",
        help="written into adapter_config.json (default: --model_name_or_path / the hypernet's)",
    )
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    from tagi_ds.artifact_flags import artifact_config, artifact_dir  # heavy (torch): after --help
    from tagi_ds.export.peft import generate_adapter
    from tagi_ds.model import fuses
    from tagi_ds.stages import flag_mode

    if args.data or args.mode not in (None, flag_mode("hypernet")):
        flag = f"--data {args.data}" if args.data else f"--mode {args.mode}"
        raise ConfigError(f"{flag}: generate_adapter reads one text (--instruction) with a tagi --hypernet")
    hypernet = artifact_dir("hypernet", args.hypernet)
    text = args.instruction
    if args.instruction_file:
        path = Path(args.instruction_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--instruction_file {str(path)!r}: cannot read it ({err})") from None
    if not text.strip():
        raise ConfigError("--instruction/--instruction_file: the text is empty")
    cfg = artifact_config(args, hypernet, "tagi", "hypernet")
    out = generate_adapter(
        cfg,
        hypernet,
        text,
        args.condition,
        output_dir(args, "generate_adapter"),
        args.deepspeed,
        args.base_model_name_or_path,
    )
    if fuses(cfg):
        print(
            "warning: hypernet.fusion=true: the exported adapter omits the instruction fusion (not a weight); "
            "PEFT outputs match tagi-ds's only for hypernet.fusion=false",
            file=sys.stderr,
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    guarded(main)
