"""The Tk-Instruct / SNI prompt format, split into TAGI's two strings.

Tk-Instruct (``src/ni_collator.py``) builds one source string::

    Definition: {definition}.\\n\\n
     Positive Example 1 -\\nInput: {input}.\\n Output: {output}.\\n\\n      (Def+kPos only, k times)
    Now complete the following example -\\nInput: {input}.\\nOutput:{space}

where a "." is appended to a piece that does not already end with punctuation, and the leading spaces
before "Positive Example" and "Output" are part of the upstream format. TAGI cuts it in two: the
*instruction* (definition + positive examples, read once per task by the hypernetwork) and the instance.
``concat`` mode and the teacher's view put the two back together, which gives exactly Tk-Instruct's string.
In ``tagi`` and ``no_instruction`` modes the backbone reads the instance input alone (stripped): that the
instruction is not repeated per example is the point of TAGI.

With ``data.chat_template`` (instruction-tuned checkpoints) each of these strings becomes the one user message
of the tokenizer's chat template (:class:`ChatFormat`): the instruction the hypernetwork encodes as a closed user
turn, and every prompt the backbone reads (input alone, or Tk-Instruct's instruction + instance in ``concat``
and the teacher's view) as a user turn followed by the opened assistant turn; the target follows as the reply.
A message is the stripped string (templates such as Llama-3's and Gemma's trim it; the others then render the
same), and the template's own tokens come on top of the ``data.max_*_length`` budgets. Plain text otherwise.
Stage 1 reads raw corpus text either way.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

from tagi_ds.data.task import DataError, Task

SETTINGS = ("def", "def_pos")


def _end(text: str) -> str:
    return text if text and text[-1] in string.punctuation else text + "."


def format_instruction(task: Task, setting: str = "def", num_pos: int = 2, definition: int = 0) -> str:
    """The instruction string: ``Definition: ...`` (+ ``num_pos`` positive examples in ``def_pos``)."""
    if setting not in SETTINGS:
        raise ValueError(f"data.setting must be one of {', '.join(SETTINGS)}; got {setting!r}")
    text = _end("Definition: " + task.definitions[definition].strip()) + "\n\n"
    if setting == "def_pos":
        for i, demo in enumerate(task.positives[:num_pos]):
            text += (
                f" Positive Example {i + 1} -\n"
                + _end(f"Input: {demo.input.strip()}")
                + "\n"
                + _end(f" Output: {demo.output.strip()}")
                + "\n\n"
            )
    return text


def format_instance(text: str) -> str:
    """The instance part of the Tk-Instruct string (what follows the instruction)."""
    return _end(f"Now complete the following example -\nInput: {text.strip()}") + "\nOutput: "


def format_concat(task: Task, text: str, setting: str = "def", num_pos: int = 2, definition: int = 0) -> str:
    """The whole Tk-Instruct source string: instruction + instance."""
    return format_instruction(task, setting, num_pos, definition) + format_instance(text)


@dataclass(frozen=True)
class ChatFormat:
    """Token ids of a tokenizer's chat template around one user message (``Tokenizer.chat_parts``): ``prefix``
    (without bos) before it; ``turn_end`` closing the user turn; ``reply`` closing it and opening the assistant's."""

    prefix: tuple[int, ...]
    turn_end: tuple[int, ...]
    reply: tuple[int, ...]

    def wrap(self, ids: Sequence[int], reply: bool) -> list[int]:
        """``ids`` as the user message: ``prefix + ids + (reply if reply else turn_end)``."""
        return [*self.prefix, *ids, *(self.reply if reply else self.turn_end)]


def chat_format(tokenizer) -> ChatFormat:
    """The tokenizer's chat template as a :class:`ChatFormat`; DataError naming the tokenizer if it has none."""
    parts = tokenizer.chat_parts()
    if parts is None:
        raise DataError(
            f"data.chat_template=true but the tokenizer {tokenizer.name} has no chat template "
            "(tokenizer_config.json chat_template or chat_template.jinja); set data.chat_template=false"
        )
    return ChatFormat(*(tuple(tokenizer.encode(p)) for p in parts))
