#!/usr/bin/env python
"""Pretrain the miniature backbone: a small T5 trained as a prefix LM on the built-in corpus.

The paper's frozen backbone is LM-pretrained (T5-LM-Adapt); a randomly initialised frozen T5 cannot
follow anything, so the miniature reproduction first builds the analogue: the shape of a tagi-ds recipe
(default ``mini``), full-parameter training, plain torch + transformers, one process.

Corpus: the documents of ``tagi_ds.data.builtin_documents`` (definitions and Tk-Instruct prompts of the
TRAINING tasks, 25 of their instances each, generated paragraphs; held-out tasks never appear).
Objective: a mix of T5-LM-Adapt's prefix LM (the encoder reads a prefix, the decoder predicts the rest;
Input/Output documents are cut at the answer half of the time) and BART-style text infilling (the
decoder rewrites the document from a copy with masked spans: it teaches the tiny model to copy from its
input quickly). Deterministic from --seed (data order, cuts, masks, init).

Writes OUT (temp dir + rename): the HF model (save_pretrained) and the built-in sentencepiece model as an
HF T5Tokenizer (same ids for every text), so ``--model_name_or_path OUT`` loads both.

    python scripts/pretrain_backbone.py --out runs/backbone --steps 1500
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from tagi_ds.files import atomic_dir

MASK_ID = 2  # the built-in tokenizer's unk: never produced by encode (byte fallback), so free as a mask


def build_tokenizer():
    """The built-in sentencepiece unigram model as a transformers T5Tokenizer (ids identical; checked)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    from tagi_ds.data.tokenizer import BUILTIN_MODEL, EOS_ID, PAD_ID, UNK_ID

    sp = spm.SentencePieceProcessor(model_file=str(BUILTIN_MODEL))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, unk_id=UNK_ID, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (PAD_ID, EOS_ID, UNK_ID)
    return tok, sp


def build_model(recipe: str, seed: int):
    from transformers import T5Config, T5ForConditionalGeneration

    from tagi_ds.recipes import get_recipe

    m = get_recipe(recipe).model
    config = T5Config(
        vocab_size=m.vocab_size,
        d_model=m.d_model,
        d_kv=m.d_kv,
        d_ff=m.d_ff,
        num_layers=m.num_layers,
        num_decoder_layers=m.num_decoder_layers,
        num_heads=m.num_heads,
        feed_forward_proj=m.feed_forward_proj,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


def corpus(sp, seed: int) -> list[tuple[list[int], int | None]]:
    """``(ids, boundary)`` per document of the built-in corpus (training tasks + generated text only).

    A document with an ``Output:`` field (a training instance in the Tk-Instruct format) is tokenised in
    two parts, ``...Output: `` and the answer, as the tagi-ds collator tokenises prompt and target;
    ``boundary`` is where the answer starts (None for other documents)."""
    from tagi_ds.data.corpus import builtin_documents

    out = []
    for doc in builtin_documents(seed):
        head, sep, answer = doc.rpartition("\nOutput: ")
        if sep and answer.strip():
            prefix = sp.encode(head + sep)
            out.append((prefix + sp.encode(answer.strip()), len(prefix)))
        else:
            ids = sp.encode(doc)
            if len(ids) >= 2:
                out.append((ids, None))
    return out


def denoise(d: list[int], rng: random.Random, max_len: int) -> tuple[list[int], list[int]]:
    """BART-style text infilling: spans of 1-3 tokens (15% of starts) become one mask id (unk, which the
    byte-fallback tokenizer never emits); the decoder rewrites the whole (window of the) document."""
    start = rng.randint(0, max(0, len(d) - (max_len - 1)))
    window = d[start : start + max_len - 1]
    src, i = [], 0
    while i < len(window):
        if rng.random() < 0.15:
            src.append(MASK_ID)
            i += rng.randint(1, 3)
        else:
            src.append(window[i])
            i += 1
    return src, window


def make_batch(docs, rng: random.Random, batch: int, max_src: int, max_tgt: int, p_boundary: float, p_denoise: float):
    """One batch of the mixed objective; src = encoder input + eos, tgt = target + eos.

    Per example: with probability ``p_denoise`` text infilling (teaches the frozen model to copy from its
    input, which most built-in tasks need), else prefix LM: a document with a prompt/answer boundary is cut
    there with probability ``p_boundary``, any document at a uniform random point otherwise."""
    src, tgt = [], []
    for _ in range(batch):
        d, boundary = docs[rng.randrange(len(docs))]
        if rng.random() < p_denoise:
            s, t = denoise(d, rng, max_tgt)
            src.append(s + [1])
            tgt.append(t + [1])
            continue
        if boundary is not None and rng.random() < p_boundary:
            i = boundary
        else:  # uniform, so that the target fits max_tgt (the prefix is left-truncated to max_src)
            lo = max(1, len(d) - (max_tgt - 1))
            i = rng.randint(lo, len(d) - 1) if lo <= len(d) - 1 else len(d) - 1
        src.append(d[max(0, i - (max_src - 1)) : i] + [1])
        tgt.append(d[i : i + max_tgt - 1] + [1])
    ls, lt = max(map(len, src)), max(map(len, tgt))
    ids = torch.tensor([s + [0] * (ls - len(s)) for s in src])
    labels = torch.tensor([t + [-100] * (lt - len(t)) for t in tgt])
    return ids, (ids != 0).long(), labels


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output dir (HF model + tokenizer)")
    p.add_argument("--recipe", default="mini", help="tagi-ds recipe whose model shape to build")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max_source_length", type=int, default=128)
    p.add_argument("--max_target_length", type=int, default=64)
    p.add_argument(
        "--p_boundary",
        type=float,
        default=0.5,
        help="probability of cutting an Input/Output document at its answer (else uniform)",
    )
    p.add_argument("--p_denoise", type=float, default=0.4, help="share of text-infilling examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=50)
    args = p.parse_args(argv)

    t_start = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tok, sp = build_tokenizer()
    docs, max_src, max_tgt = corpus(sp, 0), args.max_source_length, args.max_target_length
    model = build_model(args.recipe, args.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"backbone: recipe {args.recipe}, {n_params:,} parameters, {len(docs)} documents, "
        f"{args.steps} steps x {args.batch}",
        flush=True,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, args.steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    rng = random.Random(f"backbone:{args.seed}")
    log, ema = [], None
    for step in range(1, args.steps + 1):
        ids, mask, labels = make_batch(docs, rng, args.batch, max_src, max_tgt, args.p_boundary, args.p_denoise)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if step % args.log_every == 0 or step == args.steps:
            rec = {
                "step": step,
                "loss": round(value, 4),
                "loss_ema": round(ema, 4),
                "lr": sched.get_last_lr()[0],
                "elapsed_s": round(time.time() - t_start, 1),
            }
            log.append(rec)
            print(json.dumps(rec), flush=True)

    out = Path(args.out)
    with atomic_dir(out) as tmp:  # the backbone dir whole or not at all
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "pretrain_log.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1))
    print(f"saved {out} ({time.time() - t_start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
