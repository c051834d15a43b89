"""The serving engine: the frozen backbone and the hypernetwork loaded once, adapters from the cache, batches of
requests decoded together.

Loading follows ``launchers/generate_adapter.py`` and ``launchers/evaluate.py``: the hypernet/ dir's config.json
fixes the model (``artifact_flags.artifact_config``), the dir is checked against the model built on the meta device
(``artifacts.check_hypernet``) before anything is built, the backbone is built as evaluation builds it (a random-init
one equals the plain build that ZeRO-3 training overwrote its values with, ``runtime.engine.build_backbone``), but
whole, in this one process, on its device: serving holds the whole model, there is no process group.

An instruction becomes an adapter as ``export/peft.py`` makes one (``condition_text``, ``instruction_tensors``, the
model's encoder and generator), several new instructions in one forward; a request's input is laid out by the
evaluation collator (``TaskCollator``, the view of the mode), so the backbone reads exactly what
``launchers/evaluate.py`` feeds it for the same instruction and input.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tagi_ds import artifacts, assembly, data, stages
from tagi_ds.adapters import AdapterSet
from tagi_ds.adapters.bank import call_whole
from tagi_ds.backbones.base import DTYPES
from tagi_ds.batch import TaskBatch
from tagi_ds.config import TagiConfig
from tagi_ds.data import Example, Segment, Task, TaskCollator
from tagi_ds.data.collate import pad
from tagi_ds.export.peft import CONDITIONS, condition_text, instruction_tensors
from tagi_ds.runtime import dist
from tagi_ds.runtime import engine as ds_engine
from tagi_ds.runtime import preflight as preflight_checks
from tagi_ds.serve.cache import Adapter, AdapterCache, adapter_id
from tagi_ds.serve.metrics import Metrics
from tagi_ds.stages import MODES

INSTRUCTION_FIELDS = ("max_instruction_length", "chat_template")  # data.* that instruction_tensors reads
SERVE_MODES = ("tagi", "concat")  # tagi: generated adapters; concat: the instruction prepended, bare backbone


@dataclass
class Request:
    """One completion: what the client asked, and where its text goes. ``emit(kind, value)`` is called from the
    engine thread: ``("delta", text)`` as text becomes final, then ``("done", result dict)`` or ``("error", exc)``."""

    instruction: str
    prompt: str
    condition: str = "task"
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # decode max_tokens tokens whatever comes (benchmarks, as vLLM's ignore_eos)
    emit: Callable[[str, object], None] = lambda kind, value: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    adapter_only: bool = False  # POST /v1/adapters: generate (or find) the adapter, decode nothing
    # set by the engine
    adapter: Adapter | None = None
    cache: str = ""  # hit | miss


def fingerprint(hypernet: Path, cfg: TagiConfig, model) -> str:
    """sha256 of the generator's weights, the hypernet's config.json, the model config it runs with, the data
    fields the instruction is laid out by (``INSTRUCTION_FIELDS``) and the backbone's weights
    (``artifacts.backbone_fingerprint``): adapters of two different hypernetworks, backbones or instruction
    layouts never share an id."""
    h = hashlib.sha256(artifacts.backbone_fingerprint(model).encode())
    for name in ("generator.safetensors", "config.json"):
        with open(hypernet / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    h.update(json.dumps(cfg.to_dict()["model"], sort_keys=True).encode())
    # the data fields the instruction is laid out by (export/peft.instruction_tensors: its truncation, the chat
    # wrapping), as resolved here: a --set over them changes what the hypernetwork reads, so the adapter's id
    data_cfg = cfg.to_dict()["data"]
    h.update(json.dumps({k: data_cfg[k] for k in INSTRUCTION_FIELDS}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def preflight(cfg: TagiConfig, hypernet: Path):
    """Every input checked before anything is built or a port opens: one process, the tokenizer, and the hypernet/
    dir against the model on the meta device (sites, every tensor's shape). Returns the tokenizer."""
    if preflight_checks.env_world_size() > 1:
        preflight_checks.fail(
            "tagi_ds.serve",
            "runs in one process: python -m tagi_ds.serve ...",
            f"WORLD_SIZE={preflight_checks.env_world_size()}",
        )
    tok = data.load_tokenizer(cfg)
    model = assembly.meta_model(cfg, stages.spec("finetune", cfg), tok.special_ids)
    artifacts.check_hypernet(hypernet, model, "--hypernet")
    return tok


def load(
    cfg: TagiConfig,
    hypernet: Path,
    tok,
    cache_bytes: int,
    metrics: Metrics,
    mode: str = "tagi",
    device: torch.device | None = None,
) -> Engine:
    """Build the frozen backbone + hypernetwork once (after :func:`preflight`)."""
    device = device or dist.device()
    # the precision evaluate.py's engine runs in (train.precision; auto: bf16 on CUDA), else the backbone's own
    # model.dtype; parameters only (RoPE's fp32 inv_freq buffer stays): the generator, saved in fp32, then reads
    # states of its own dtype
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ds_engine.precision(cfg))
    model = assembly.assemble(
        stages.spec("finetune", cfg),
        cfg,
        {},  # no DeepSpeed: one process holds the whole model
        tok.special_ids,
        runner="infer",
        placement=ds_engine.Placement("whole", "serving: one process holds the whole model"),
        teacher=False,
        loads=assembly.Loads(artifact=hypernet),
        device=device,
        dtype=half or DTYPES[cfg.model.dtype],
        init_on_device=True,
    ).model
    return Engine(
        cfg, model, tok, fingerprint(hypernet, cfg, model), device, AdapterCache(cache_bytes, metrics), metrics, mode
    )


class Engine:
    """Everything a batch needs; called from ONE thread (the scheduler's): the adapted layers share one adapter
    slot (``model.state``), so two forwards must never interleave."""

    def __init__(
        self,
        cfg: TagiConfig,
        model,
        tok,
        fingerprint: str,
        device: torch.device,
        cache: AdapterCache,
        metrics: Metrics,
        mode: str = "tagi",
    ) -> None:
        if mode not in SERVE_MODES:
            raise ValueError(f"serve mode must be one of {', '.join(SERVE_MODES)}, got {mode!r}")
        self.cfg, self.model, self.tok, self.fingerprint, self.device = cfg, model, tok, fingerprint, device
        self.cache, self.metrics, self.mode = cache, metrics, mode
        # tagi: the hypernetwork reads each instruction into adapters; concat: the bare backbone reads it in the
        # prompt. Asked of the mode's adapter source (tagi_ds.stages), not of its name.
        self.generates = MODES[mode].instruction
        self.causal = model.causal
        self._texts: dict[str, tuple[str, str]] = {}  # id -> (text, condition), for the ids being generated

    # -- adapters -----------------------------------------------------------------------------------------
    def adapter_key(self, text: str, condition: str) -> str:
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
        return adapter_id(self.fingerprint, condition, text)

    def resolve(self, requests: list[Request]) -> None:
        """Each request's adapter from the cache, the new ones generated in one hypernetwork forward (a request
        that named a cached adapter by id has it already)."""
        for r in requests:
            if r.adapter is not None:
                self.metrics.inc("adapter_cache_hits_total")
        requests = [r for r in requests if r.adapter is None]
        keys = []
        for r in requests:
            key = self.adapter_key(r.instruction, r.condition)
            self._texts.setdefault(key, (r.instruction, r.condition))
            keys.append(key)
        try:
            found, generated = self.cache.resolve(keys, self._generate)
        finally:
            for key in keys:
                self._texts.pop(key, None)
        first = set()
        for r, key in zip(requests, keys):
            r.adapter = found[key]
            r.cache = "miss" if key in generated and key not in first else "hit"
            first.add(key)
            self.metrics.inc("adapter_cache_misses_total" if r.cache == "miss" else "adapter_cache_hits_total")

    @torch.no_grad()
    def _generate(self, keys: list[str]) -> list[Adapter]:
        """The adapters of ``keys``' instructions: one encoder + generator forward for all of them, the
        instructions padded as the collator pads them (right for T5, left for the decoder-only families)."""
        t0 = time.perf_counter()
        rows = []
        for key in keys:
            text, condition = self._texts[key]
            ids, _ = instruction_tensors(self.tok, self.cfg, condition_text(text, condition))
            rows.append(ids[0].tolist())
        side = "left" if self.causal else "right"
        ids = pad(rows, self.tok.pad_id, side).to(self.device)
        mask = pad([[1] * len(r) for r in rows], 0, side).to(self.device)
        states, pooled = self.model.encoder(ids, mask)
        factors = call_whole(self.model.generator, pooled)
        kv = self._cross_kv(states, factors) if self.model.fusion else []
        out = []
        for k, (key, row) in enumerate(zip(keys, rows)):
            n = len(row)  # right-padded (fusion is T5's): the first n positions are the instruction's
            keep = states[k, :n].contiguous() if self.model.fusion else None  # unmarked: fusion_prefix marks them
            out.append(
                Adapter(
                    key,
                    [(A[k].contiguous(), B[k].contiguous()) for A, B in factors],
                    keep,
                    n,
                    [(pk[k, :, :n].contiguous(), pv[k, :, :n].contiguous()) for pk, pv in kv],
                )
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the histogram below times the work, not its launch
        self.metrics.inc("adapter_generations_total", len(keys))
        self.metrics.observe("adapter_generation_seconds", time.perf_counter() - t0)
        return out

    def _cross_kv(self, states: torch.Tensor, factors) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """T5 fusion: every decoder layer's cross-attention keys/values of the (marked) instruction states, each
        instruction under its own adapter, as ``TagiModel.prefix_cache`` projects them for a batch's tasks; kept
        with the adapter, so no later batch projects that instruction again."""
        from tagi_ds.backbones import t5

        model, K = self.model, states.shape[0]
        rows = AdapterSet(
            dict(enumerate(factors)),
            torch.arange(K + 1, device=self.device),
            model.generator.scale,
            self.cfg.model.adapter_impl,
            host_offsets=list(range(K + 1)),
        )
        return t5.prefix_keys_values(model.backbone, model._marked(states), lambda: model.state.use(rows))

    # -- a batch's inputs ---------------------------------------------------------------------------------
    def prompt_batch(self, requests: list[Request]) -> TaskBatch:
        """The rows as the evaluation collator lays them out (one task per request; T5 right-padded, decoder-only
        left-padded prompts), on the device. Mode concat reads Tk-Instruct's instruction + instance."""
        tasks = [
            Task(
                name=f"request{i}",
                category="serve",
                definitions=(r.instruction,),
                instances=(Example(id=str(i), input=r.prompt, outputs=("",)),),
            )
            for i, r in enumerate(requests)
        ]
        collate = TaskCollator(
            tasks,
            self.tok,
            self.cfg.data,
            arch=self.cfg.model.arch,
            input_view=MODES[self.mode].view,
            instruction=False,
            padding_side="left" if self.causal else "right",
            with_targets=not self.causal,
        )
        return collate([Segment(i, (0,), 0) for i in range(len(requests))]).to(self.device)

    def fusion_states(self, adapters: list[Adapter]):
        """T5 fusion: each adapter's instruction states padded to ``[K, Li, d]``, their mask ``[K, Li]``, and
        their cross-attention keys/values padded alike (``[K, H, Li, dk]`` per decoder layer; the padding is
        masked). None without fusion."""
        if not self.model.fusion or not self.generates:
            return None
        n = max(a.states.shape[0] for a in adapters)
        states = torch.zeros(
            len(adapters), n, adapters[0].states.shape[1], dtype=adapters[0].states.dtype, device=self.device
        )
        mask = torch.zeros(len(adapters), n, dtype=torch.long, device=self.device)
        for k, a in enumerate(adapters):
            states[k, : a.states.shape[0]] = a.states
            mask[k, : a.states.shape[0]] = 1
        kv = []
        for layer in range(len(adapters[0].cross_kv)):
            pair = []
            for j in (0, 1):
                first = adapters[0].cross_kv[layer][j]
                t = first.new_zeros(len(adapters), first.shape[0], n, first.shape[2])
                for k, a in enumerate(adapters):
                    t[k, :, : a.states.shape[0]] = a.cross_kv[layer][j]
                pair.append(t)
            kv.append(tuple(pair))
        return states, mask, kv
