"""Copy probe of a bare backbone: a random word list with one word masked -> ROUGE-L of the decoded output
against the original list (the denoising mode the backbone was pretrained in).

    python docs/dev_split/probe.py BACKBONE_DIR
"""

import random
import sys

import sentencepiece as spm
import torch
from transformers import T5ForConditionalGeneration

from tagi_ds.data.builtin import ANIMALS, COLORS, FOODS, OBJECTS
from tagi_ds.data.tokenizer import BUILTIN_MODEL
from tagi_ds.eval.metrics import rouge_l

MASK_ID, EOS_ID = 2, 1  # scripts/pretrain_backbone.py's mask (the tokenizer's unk) and eos

sp = spm.SentencePieceProcessor(model_file=str(BUILTIN_MODEL))
model = T5ForConditionalGeneration.from_pretrained(sys.argv[1]).eval()
rng = random.Random(0)
scores = []
for i in range(100):
    words = rng.sample(ANIMALS + FOODS + OBJECTS + COLORS, rng.randint(3, 6))
    j = rng.randrange(len(words))
    ids = sp.encode(" ".join(words[:j])) + [MASK_ID] + sp.encode(" ".join(words[j + 1:])) + [EOS_ID]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    pred = sp.decode(out[0].tolist())
    scores.append(rouge_l(pred, [" ".join(words)]))  # already x100
    if i < 3:
        print(" ".join(words), "->", pred)
print(f"{sys.argv[1]}: copy probe ROUGE-L {sum(scores) / len(scores):.1f}")
