"""TagiModel: frozen backbone + adapted sites + (hypernet | LoRA bank) + the stage objective.

The stage's mode (:func:`tagi_ds.stages.spec`) decides where the student's adapters come from:

=============  ================  ==========================================================
stage          mode              student adapters / input / loss
=============  ================  ==========================================================
teachers       teacher           bank row per task; instruction + input; CE
pretrain       tagi              generated from segment a; segment b; CE on c
finetune       tagi              generated; input (+ fused instruction); CE + l1 KL + l2 align
finetune       concat            one shared LoRA; instruction + input; CE
finetune       no_instruction    one shared LoRA; input only; CE
=============  ================  ==========================================================

``forward(batch)`` returns ``(loss, terms)`` so that the DeepSpeed engine wraps the whole step and every
rank calls the same modules in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from tagi_ds import backbones, families, loss_terms, stages
from tagi_ds.adapters import AdapterSet, AdapterState, LoraBank, Site
from tagi_ds.adapters.bank import call_whole
from tagi_ds.backbones.base import enable_checkpointing, freeze, inject
from tagi_ds.batch import TaskBatch
from tagi_ds.config import TagiConfig
from tagi_ds.hypernet import Generator, InstructionEncoder
from tagi_ds.losses import target_rows, token_sums


def fuses(cfg: TagiConfig) -> bool:
    """Instruction fusion-in-decoder is on: ``hypernet.fusion`` on a family that fuses (T5; decoder-only models
    have no encoder)."""
    return cfg.hypernet.fusion and families.get(cfg.model.arch).fusion


class TagiModel(nn.Module):
    def __init__(
        self,
        cfg: TagiConfig,
        spec: stages.Spec,
        backbone: nn.Module,
        sites: list[Site],
        state: AdapterState,
        generator: Generator | None = None,
        bank: LoraBank | None = None,
        teacher: LoraBank | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.spec, self.sites, self.state = cfg, spec, sites, state
        self.stage = spec.stage.name
        self.family = families.get(cfg.model.arch)
        self.source = self.spec.mode.source  # where the student's adapters come from (stages.AdapterSource)
        self.arch = backbones.get(cfg.model.arch)
        self.causal = self.family.causal
        self.backbone = backbone
        self.generator = generator
        self.bank = bank
        # The frozen distillation teacher is deliberately NOT a submodule: it stays whole in host memory on
        # every rank, outside DeepSpeed (never partitioned, cast, checkpointed or all-gathered), and each
        # step copies only the rows of the batch's tasks to the device (``LoraBank.take``).
        # ``runtime.engine.keep_teacher`` keeps it in the training dtype, on the device where it fits.
        object.__setattr__(self, "teacher", teacher)
        # A separate frozen teacher model (``tagi_ds.teacher_model``, ``--teacher_model``): the KL target instead of
        # the bank on this backbone. A submodule, unlike the bank: ZeRO-3 partitions it and its hooks gather it.
        self.teacher_model: nn.Module | None = None
        self.encoder = InstructionEncoder(
            backbone, self.arch, state, cfg.hypernet.pooling, cfg.hypernet.checkpoint_encoder
        )
        self.fusion = fuses(cfg) and generator is not None

    # -- adapters ---------------------------------------------------------------------------------------
    def generate(self, batch: TaskBatch) -> tuple[AdapterSet, torch.Tensor]:
        """Generated adapters for the batch's tasks and the instruction states ``[K, Li, d]``."""
        if batch.instr_input_ids is None:
            raise ValueError("mode tagi needs instr_input_ids in the batch (one instruction per task)")
        states, pooled = self.encoder(batch.instr_input_ids, batch.instr_attention_mask)
        factors = dict(enumerate(call_whole(self.generator, pooled)))
        return AdapterSet(
            factors,
            batch.example_offsets,
            self.generator.scale,
            self.cfg.model.adapter_impl,
            host_offsets=batch.offsets_list(),
        ), states

    def bank_adapters(self, bank: LoraBank, batch: TaskBatch, shared: bool = False) -> AdapterSet:
        # Offsets and rows are read from the batch's host copies: no device syncs.
        offsets, impl = batch.offsets_list(), self.cfg.model.adapter_impl
        if shared:  # every example uses row 0: one segment [0, B], not K copies of the row
            rows = torch.zeros(1, dtype=torch.long, device=batch.example_offsets.device)
            return bank.adapters(
                rows, batch.example_offsets[:: batch.num_tasks], impl, host_rows=[0], host_offsets=[0, offsets[-1]]
            )
        host_rows = self._teacher_rows(batch)
        return bank.adapters(batch.teacher_index, batch.example_offsets, impl, host_rows, offsets)

    def teacher_adapters(self, batch: TaskBatch, student: AdapterSet) -> AdapterSet:
        """The batch's rows of the host-resident teacher bank, on the student's device and dtype."""
        a, _ = next(iter(student.factors.values()))
        return self.teacher.take(
            self._teacher_rows(batch),
            batch.example_offsets,
            a.device,
            a.dtype,
            self.cfg.model.adapter_impl,
            batch.offsets_list(),
        )

    @staticmethod
    def _teacher_rows(batch: TaskBatch) -> list[int]:
        rows = batch.teacher_rows_list()
        if rows is None or min(rows, default=0) < 0:
            raise ValueError(f"batch tasks {batch.task_names} need teacher_index rows (a teacher per task)")
        return rows

    def student_adapters(self, batch: TaskBatch) -> tuple[AdapterSet, torch.Tensor | None]:
        return self.source.adapters(self, batch)

    # -- forward ----------------------------------------------------------------------------------------
    def fusion_prefix(self, batch: TaskBatch | None, instr_states: torch.Tensor | None):
        """Each example's task instruction states ``[B, Li, d]`` and mask ``[B, Li]`` (T5 fusion), or Nones."""
        if not self.fusion or instr_states is None:
            return None, None
        per_example = batch.task_of_example
        return self._marked(instr_states)[per_example], batch.instr_attention_mask[per_example]

    def _marked(self, instr_states: torch.Tensor) -> torch.Tensor:
        return self.generator.marker(instr_states) if self.generator.marker is not None else instr_states

    def prefix_cache(
        self, batch: TaskBatch | None, instr_states: torch.Tensor | None, adapters: AdapterSet | None
    ) -> Callable[[torch.Tensor], object] | None:
        """At inference with fusion: a builder of the decoder's cross-attention cache (``arch.cross_cache``)
        that projects each task's instruction states once instead of once per example. None when
        autograd is on (training keeps HF's own per-example projection, with its gradients and activation
        checkpointing), without fusion, or for a family without ``cross_cache``. Call it under
        ``state.use(adapters)``."""
        if not self.fusion or not self.family.cross_cache or instr_states is None or torch.is_grad_enabled():
            return None
        task_rows = None
        if adapters is not None:  # the same factors over one row per task
            rows = torch.arange(batch.num_tasks + 1, device=adapters.example_offsets.device)
            task_rows = AdapterSet(adapters.factors, rows, adapters.scale, adapters.impl)
        return partial(
            self.arch.cross_cache,
            self.backbone,
            prefix=self._marked(instr_states),
            rows=batch.task_of_example,
            prefix_scope=lambda: self.state.use(task_rows),
        )

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        adapters: AdapterSet | None,
        batch: TaskBatch | None = None,
        instr_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        prefix, prefix_mask = self.fusion_prefix(batch, instr_states)
        cache = self.prefix_cache(batch, instr_states, adapters)
        with self.state.use(adapters):
            return self.arch.logits(self.backbone, input_ids, attention_mask, labels, prefix, prefix_mask, cache)

    def head_rows(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        adapters: AdapterSet | None,
        batch: TaskBatch | None = None,
        instr_states: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Callable]:
        """The LM head's inputs at the target tokens ``[N, *]``, their labels ``[N]`` and the head
        (``arch.head_inputs``): the loss makes logits from them a chunk at a time, never ``[B, L, V]``."""
        prefix, prefix_mask = self.fusion_prefix(batch, instr_states)
        with self.state.use(adapters):
            x, head = self.arch.head_inputs(self.backbone, input_ids, attention_mask, labels, prefix, prefix_mask)
        x, labels = target_rows(x, labels, self.causal)
        return x, labels, head

    def train(self, mode: bool = True) -> TagiModel:
        super().train(mode)
        if self.teacher_model is not None:  # the KL target has no dropout
            self.teacher_model.eval()
        return self

    def forward(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, terms)``: every loss term that is on (``tagi_ds.loss_terms.active``), by name, and their
        weighted sum in registry order (CE first)."""
        adapters, instr_states = self.student_adapters(batch)
        student, labels, head = self.head_rows(
            batch.input_ids, batch.attention_mask, batch.labels, adapters, batch, instr_states
        )
        lc = self.cfg.loss
        # A teacher: the bank, or a separate teacher model (KL only; preflight gives alignment the bank).
        taught = (self.teacher is not None or self.teacher_model is not None) and self.spec.stage.distils
        on = loss_terms.active(lc, teacher=taught)
        reads_bank = self.teacher is not None and any(t.teacher for t in on)
        teacher_adapters = self.teacher_adapters(batch, adapters) if reads_bank else None
        teacher, teacher_head = self.teacher_view(batch, teacher_adapters, student, on)
        values = token_sums(
            head,
            student,
            labels,
            teacher,
            lc,
            loss_terms.token_terms(),
            [t for t in on if t.kind == "token"],
            teacher_head,
        )
        for t in on:
            if t.kind == "adapter":
                values[t.name] = t.fn(adapters, teacher_adapters if t.teacher_adapters else None, lc)
        terms, loss = {}, None
        for t in on:
            terms[t.name] = values[t.name]
            part = t.weight_of(lc) * values[t.name]
            loss = part if loss is None else loss + part
        return loss, terms

    def teacher_view(
        self, batch: TaskBatch, teacher_adapters: AdapterSet | None, student: torch.Tensor, on: list
    ) -> tuple[torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor] | None]:
        """The teacher's LM-head inputs at the target tokens (no gradient) and their head, when a term that is on
        reads them: from the separate teacher model if there is one (its own head), else from this backbone with
        the teacher bank's rows (``head`` None: the student's)."""
        reading = [t for t in on if t.teacher_view]
        if not reading:
            return None, None
        if batch.teacher_input_ids is None:
            raise ValueError(f"{reading[0].weight_label()} > 0 needs the teacher view (teacher_input_ids) in the batch")
        ids, mask, labels = batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_labels
        head = None
        with torch.no_grad():
            if self.teacher_model is None:
                teacher, _, _ = self.head_rows(ids, mask, labels, teacher_adapters)
            else:
                x, head = self.arch.head_inputs(self.teacher_model, ids, mask, labels)
                teacher, _ = target_rows(x, labels, self.causal)
        if teacher.shape[0] != student.shape[0]:
            raise ValueError(
                f"the teacher view has {teacher.shape[0]} target tokens, the student's "
                f"{student.shape[0]}: both views must carry the same labels"
            )
        return teacher, head

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_backbone(cfg: TagiConfig, special_ids: dict[str, int] | None = None) -> nn.Module:
    """The HF model only (so a launcher can build it under ``deepspeed.zero.Init``)."""
    ids = special_ids or {}
    kwargs = {k: ids[k] for k in ("pad_id", "eos_id", "bos_id") if k in ids}
    build = backbones.get(cfg.model.arch).build
    if cfg.model.model_name_or_path:
        return build(cfg.model, **kwargs)
    # Random init from model.init_seed, whatever the caller's RNG state: every stage of a pipeline (each
    # with its own train.seed) must see the same frozen backbone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.model.init_seed)
        return build(cfg.model, **kwargs)


def build_model(
    cfg: TagiConfig,
    stage: stages.Spec | str,
    backbone: nn.Module,
    num_bank_rows: int = 0,
    with_teacher: bool = False,
    teacher_init: str = "peft",
) -> TagiModel:
    """Freeze the backbone, inject adapted sites and attach the adapters of ``stage`` in its mode
    (:func:`tagi_ds.stages.spec`): the hypernetwork, a LoRA bank with a row per task, or one shared LoRA.

    ``stage``: the run's resolved spec (a run resolves it once, ``tagi_ds.assembly``), or a stage name (tools and
    tests). ``num_bank_rows``: teachers in stage 0, or the teacher bank's size in stage 2 (``with_teacher``);
    ``teacher_init="empty"``: that bank allocated uninitialised (its values are loaded, or do not matter: benchmarks).
    """
    spec = stage if isinstance(stage, stages.Spec) else stages.spec(stage, cfg)
    source = spec.mode.source
    cfg.validate()
    arch = backbones.get(cfg.model.arch)
    freeze(backbone, cfg.model.trainable)
    state = AdapterState()
    sites = inject(backbone, arch.site_names(backbone, cfg.model), state)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(backbone, {"use_reentrant": False, "context_fn": state.checkpoint_context})
    d_model = getattr(backbone.config, families.get(cfg.model.arch).shape["d_model"])
    built = source.build(sites, cfg, d_model, num_bank_rows, fuses(cfg))
    teacher = None
    if with_teacher and source.instruction:  # the frozen distillation bank: only a source that reads the
        # instruction distils (stages.spec; the planner asks with_teacher for any mode)
        teacher = LoraBank(sites, num_bank_rows, cfg.teacher.rank, cfg.teacher.alpha, init=teacher_init).requires_grad_(
            False
        )
    return TagiModel(cfg, spec, backbone, sites, state, teacher=teacher, **built)
