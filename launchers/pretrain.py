#!/usr/bin/env python
"""Stage 1 — hypernetwork pretraining on plain text split a | b | c.

The hypernetwork reads a, the frozen backbone (with the generated adapters) reads b, the loss is
cross-entropy on c. Writes OUTPUT_DIR/hypernet/. With no flag it runs the embedded default (tiny T5,
built-in corpus) on CPU:

    deepspeed launchers/pretrain.py --deepspeed ds_configs/z3.json
"""

from tagi_ds.cli import guarded, train_main

if __name__ == "__main__":
    guarded(lambda: train_main("pretrain", __doc__))
