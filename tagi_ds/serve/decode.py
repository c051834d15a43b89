"""Decoding one batch of requests whatever their instructions: each row through its own instruction's adapter.

The rows are grouped by adapter, so the batch is a TaskBatch-shaped layout that the adapted layers already read:
adapter k owns rows ``offsets[k]:offsets[k+1]`` and every adapted Linear runs ``ops.lora_delta`` over those
segments (the per-task op training runs, Triton on CUDA). Prefill once (T5: the encoder and the inputs'
cross-attention keys and values, the instructions' coming from the adapter cache; decoder-only: the prompt), then
one token per step with the KV cache (HF's ``DynamicCache`` / ``EncoderDecoderCache``). A row that ends (eos, a
stop string, ``max_tokens``, its client gone) leaves the batch: the cache, the masks and the adapter segments are
cut to the rows still running, so the next steps compute nothing for it.

Greedy rows take the argmax, as ``eval/generate.greedy_config`` does (``temperature`` 0, or under ``GREEDY_BELOW``,
1e-5); sampled rows draw from the temperature-scaled, ``top_p``-truncated distribution with a generator of their
own (``seed``), so a seeded request gets the same tokens whatever it was batched with (up to the float ties
batching can move).
"""

from __future__ import annotations

import random
import time

import torch

from tagi_ds.adapters import AdapterSet
from tagi_ds.backbones.base import cache_kwarg
from tagi_ds.batch import TaskBatch
from tagi_ds.serve.engine import Engine, Request

# A temperature below this decodes greedily: logits / 1e-40 overflow to inf, and softmax turns inf - inf into NaN,
# which the draw read as the last (least likely) token. The limit of sampling as the temperature goes to 0 is argmax.
GREEDY_BELOW = 1e-5
REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes an unfinished UTF-8 sequence to: held back


def returned_cache(out):
    """The KV cache a forward returned: ``out.cache`` in newer transformers (where ``past_key_values`` warns)."""
    return out.cache if "cache" in out else out.past_key_values


class Output:
    """One row's tokens and text; emits text as it becomes final (never a possible stop string's start)."""

    def __init__(self, req: Request, tok) -> None:
        self.req, self.tok = req, tok
        self.tokens: list[int] = []
        self.generated = 0
        self.text = self.emitted = ""
        self.reason: str | None = None
        seed = req.seed if req.seed is not None else random.SystemRandom().randrange(2**63)  # the global RNG untouched
        self.gen = torch.Generator().manual_seed(seed) if req.temperature >= GREEDY_BELOW else None

    def push(self, token: int) -> None:
        self.generated += 1
        if token == self.tok.eos_id and not self.req.ignore_eos:
            self.reason = "stop"
        elif token == self.tok.eos_id:  # ignore_eos (benchmarks): decoding goes on, the text takes nothing
            if self.generated >= self.req.max_tokens:
                self.reason = "length"
        else:
            self.tokens.append(token)
            text = self.tok.decode(self.tokens)
            cuts = [text.find(s) for s in self.req.stop if s in text]
            if cuts:
                text, self.reason = text[: min(cuts)], "stop"
            elif self.generated >= self.req.max_tokens:
                self.reason = "length"
            self.text = text
        self._emit(final=self.reason is not None)

    def cancel(self) -> None:
        self.reason = "cancelled"

    def _emit(self, final: bool) -> None:
        text = self.text
        if not final:
            hold = len(text) - len(text.rstrip(REPLACEMENT))
            for s in self.req.stop:
                hold = max(hold, next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0))
            text = text[: len(text) - hold]
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            self.req.emit("delta", text[len(self.emitted) :])
            self.emitted = text


def pick(logits: torch.Tensor, outs: list[Output]) -> torch.Tensor:
    """Next tokens ``[B]`` from ``logits [B, V]`` (float32): argmax, or a draw for the sampled rows."""
    tokens = logits.argmax(-1)
    sampled = [i for i, o in enumerate(outs) if o.gen is not None]
    if not sampled:
        return tokens
    idx = torch.tensor(sampled, device=logits.device)
    temp = torch.tensor([outs[i].req.temperature for i in sampled], device=logits.device)
    top_p = torch.tensor([outs[i].req.top_p for i in sampled], device=logits.device)
    probs = torch.softmax(logits[idx] / temp[:, None], dim=-1)
    p, order = probs.sort(dim=-1, descending=True)
    p = p.masked_fill(p.cumsum(-1) - p > top_p[:, None], 0.0)  # the smallest head holding top_p (>= 1 token)
    cdf = (p / p.sum(-1, keepdim=True)).cumsum(-1)
    u = torch.stack([torch.rand((), generator=outs[i].gen) for i in sampled]).to(logits.device)
    j = torch.searchsorted(cdf, u[:, None].to(cdf.dtype)).clamp_max(cdf.shape[-1] - 1)
    tokens[idx] = order.gather(-1, j).squeeze(-1)
    return tokens


class Rows:
    """The running rows' adapters: groups ``[K]`` in row order, their factors stacked once per batch."""

    def __init__(self, engine: Engine, requests: list[Request]) -> None:
        self.engine = engine
        adapters, self.group = [], []
        for r in requests:  # sorted by adapter: each adapter's rows are contiguous (mode concat: none, one group)
            if r.adapter is not None and (not adapters or adapters[-1].id != r.adapter.id):
                adapters.append(r.adapter)
            self.group.append(max(len(adapters) - 1, 0))
        self.adapters = adapters
        model = engine.model
        self.stacked = None
        if engine.generates:
            self.stacked = {
                s: (torch.stack([a.factors[s][0] for a in adapters]), torch.stack([a.factors[s][1] for a in adapters]))
                for s in range(len(model.sites))
            }

    def keep(self, positions: list[int]) -> None:
        self.group = [self.group[p] for p in positions]

    def offsets(self) -> tuple[list[int], list[int]]:
        """(the groups still running, their row offsets ``[K'+1]``)."""
        present, offs = [], [0]
        for i, g in enumerate(self.group):
            if present and present[-1] == g:
                offs[-1] = i + 1
            else:
                present.append(g)
                offs.append(i + 1)
        return present, offs

    def adapter_set(self) -> AdapterSet | None:
        if self.stacked is None:
            return None
        present, offs = self.offsets()
        if len(present) == len(self.adapters):
            factors = self.stacked
        else:
            idx = torch.tensor(present, device=self.engine.device)
            factors = {s: (A[idx], B[idx]) for s, (A, B) in self.stacked.items()}
        cfg = self.engine.cfg
        return AdapterSet(
            factors,
            torch.tensor(offs, device=self.engine.device),
            self.engine.model.generator.scale,
            cfg.model.adapter_impl,
            host_offsets=offs,
        )


class Seq2Seq:
    """T5: the encoder once (adapters on), fusion's cross-attention keys/values projected once per instruction,
    then the decoder step by step."""

    def __init__(self, engine: Engine, batch: TaskBatch, rows: Rows) -> None:
        self.engine, self.batch, self.rows = engine, batch, rows
        self.past = None

    def prefill(self) -> torch.Tensor:
        e, model, b = self.engine, self.engine.model, self.batch
        adapters = self.rows.adapter_set()
        with model.state.use(adapters):
            hidden, _ = model.arch.encode(model.backbone, b.input_ids, b.attention_mask)
            mask = b.attention_mask
            fused = e.fusion_states(self.rows.adapters)
            if fused is not None:
                present, offs = self.rows.offsets()
                view = TaskBatch(
                    b.input_ids,
                    mask,
                    b.input_ids,
                    torch.tensor(offs, device=e.device),
                    instr_attention_mask=fused[1],
                    host_offsets=tuple(offs),
                )
                # the instructions' keys/values come from the cache; only the inputs' are projected here
                self.past = model.arch.cross_cache(
                    model.backbone, hidden, None, view.task_of_example, None, prefix_kv=fused[2]
                )
                hidden, mask = model.arch.fuse(hidden, mask, *model.fusion_prefix(view, fused[0]))
        self.hidden, self.mask = hidden, mask
        start = model.backbone.config.decoder_start_token_id
        return self._decode(torch.full((hidden.shape[0], 1), start, dtype=torch.long, device=e.device), adapters)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._decode(tokens[:, None], self.rows.adapter_set())

    def _decode(self, dec: torch.Tensor, adapters: AdapterSet | None) -> torch.Tensor:
        model = self.engine.model
        with model.state.use(adapters):
            out = model.backbone(
                encoder_outputs=(self.hidden,),
                attention_mask=self.mask,
                decoder_input_ids=dec,
                use_cache=True,
                return_dict=True,
                **{cache_kwarg(model.backbone): self.past},
            )
        self.past = returned_cache(out)
        return out.logits[:, -1].float()

    def select(self, idx: torch.Tensor) -> None:
        self.hidden, self.mask = self.hidden[idx], self.mask[idx]
        self.past.batch_select_indices(idx)


class Causal:
    """Decoder-only: the left-padded prompts once (positions counted from each row's first token, as HF's
    ``generate`` counts them), then one token per step."""

    def __init__(self, engine: Engine, batch: TaskBatch, rows: Rows) -> None:
        self.engine, self.batch, self.rows = engine, batch, rows
        self.past = None

    def prefill(self) -> torch.Tensor:
        mask = self.batch.attention_mask
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        self.mask, self.pos = mask, pos[:, -1:]
        return self._forward(self.batch.input_ids, pos, self.rows.adapter_set())

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.pos = self.pos + 1
        return self._forward(tokens[:, None], self.pos, self.rows.adapter_set())

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, adapters: AdapterSet | None) -> torch.Tensor:
        model = self.engine.model
        with model.state.use(adapters):
            out = model.backbone(
                input_ids=ids,
                attention_mask=self.mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                return_dict=True,
                **{cache_kwarg(model.backbone): self.past},
            )
        self.past = returned_cache(out)
        return out.logits[:, -1].float()

    def select(self, idx: torch.Tensor) -> None:
        self.mask, self.pos = self.mask[idx], self.pos[idx]
        self.past.batch_select_indices(idx)


class Decoding:
    """One batch's decoding, a step at a time (:meth:`step`), so that the scheduler can interleave batches. Each
    request gets its deltas as its text grows and ``("done", result)`` as soon as its own row ends."""

    def __init__(self, engine: Engine, requests: list[Request]) -> None:
        self.engine = engine
        self.reqs = sorted(requests, key=lambda r: r.adapter.id if r.adapter else "")  # each adapter's rows contiguous
        self.batch = engine.prompt_batch(self.reqs)
        self.prompt_tokens = self.batch.attention_mask.sum(1).tolist()
        self.rows = Rows(engine, self.reqs)
        self.outs = [Output(r, engine.tok) for r in self.reqs]
        self.stepper = (Causal if engine.causal else Seq2Seq)(engine, self.batch, self.rows)
        self.live = list(range(len(self.reqs)))
        self.logits: torch.Tensor | None = None

    @property
    def running(self) -> int:
        return len(self.live)

    @torch.no_grad()
    def prefill(self) -> None:
        """The batch's first forward (the scheduler runs it when it builds the batch: a request that breaks it is
        found before any row has emitted)."""
        self.logits = self.stepper.prefill()

    @torch.no_grad()
    def step(self) -> bool:
        """The prefill if not run yet; then one token for every running row. True once every row has ended."""
        if self.logits is None:
            self.prefill()
        live, outs = self.live, self.outs
        tokens = pick(self.logits, [outs[i] for i in live])
        for i, t in zip(live, tokens.tolist()):
            if self.reqs[i].cancelled.is_set():
                outs[i].cancel()
            else:
                outs[i].push(t)
            if outs[i].reason is not None:
                self._done(i)
        keep = [p for p, i in enumerate(live) if outs[i].reason is None]
        if not keep:
            self.live = []
            return True
        if len(keep) < len(live):  # rows that ended leave the batch: nothing more is computed for them
            idx = torch.tensor(keep, device=self.engine.device)
            self.stepper.select(idx)
            self.rows.keep(keep)
            tokens = tokens[idx]
            self.live = [live[p] for p in keep]
        self.logits = self.stepper.step(tokens)
        return False

    def fail(self, err: BaseException) -> None:
        """An error in a step: every row still running gets it."""
        for i in self.live:
            self.reqs[i].emit("error", err)
        self.live = []

    def _done(self, i: int) -> None:
        r, o, n = self.reqs[i], self.outs[i], self.prompt_tokens[i]
        m = self.engine.metrics
        m.inc("prompt_tokens_total", n)
        m.inc("completion_tokens_total", o.generated)
        if o.reason == "cancelled":
            m.inc("requests_cancelled_total")
        m.observe("request_seconds", time.perf_counter() - r.arrived)
        r.emit(
            "done",
            {
                "text": o.text,
                "finish_reason": o.reason,
                "prompt_tokens": n,
                "completion_tokens": o.generated,
                "instruction_tokens": r.adapter.instruction_tokens if r.adapter else 0,
                "adapter": r.adapter.id if r.adapter else None,
                "cache": r.cache or None,
            },
        )


def run(engine: Engine, requests: list[Request]) -> None:
    """Decode ``requests`` (adapters resolved) together, to the end."""
    decoding = Decoding(engine, requests)
    while not decoding.step():
        pass
