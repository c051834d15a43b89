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
"""

from __future__ import annotations

import string

from tagi_ds.data.task import Task

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
            text += (f" Positive Example {i + 1} -\n" + _end(f"Input: {demo.input.strip()}") + "\n"
                     + _end(f" Output: {demo.output.strip()}") + "\n\n")
    return text


def format_instance(text: str) -> str:
    """The instance part of the Tk-Instruct string (what follows the instruction)."""
    return _end(f"Now complete the following example -\nInput: {text.strip()}") + "\nOutput: "


def format_concat(task: Task, text: str, setting: str = "def", num_pos: int = 2, definition: int = 0) -> str:
    """The whole Tk-Instruct source string: instruction + instance."""
    return format_instruction(task, setting, num_pos, definition) + format_instance(text)
