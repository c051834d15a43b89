"""The one training loop, for all three stages: preflight, setup, step, finish.

Read top to bottom: it is the whole of what a launcher runs. :func:`preflight` checks and loads every input
before anything is written or any process group starts; :func:`train` then runs: :func:`setup` (process group,
config.json, model, engine, resume), :func:`step` until ``train.max_steps``, :func:`finish` (the artifact).
What the stage trains, reads and writes comes from its spec (:mod:`tagi_ds.stages`). Stops: ``max_steps``
(exit 0), ``train.stop_after`` / a signal / the launcher gone (checkpoint, exit 0), ``train.max_bad_steps``
non-finite steps in a row (checkpoint, one line, exit code 3).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tagi_ds import artifacts, assembly, data, plan, stages, teacher_model
from tagi_ds.config import ConfigError, TagiConfig, frozen
from tagi_ds.runtime import dist, rundir
from tagi_ds.runtime import engine as ds_engine
from tagi_ds.runtime import preflight as preflight_checks
from tagi_ds.train import checkpoint, grad_ratio
from tagi_ds.train import resume as resume_settings
from tagi_ds.train.guards import Guards, TooManyBadSteps
from tagi_ds.train.progress import Progress

SAVE_WARN_S = 20.0  # a save longer than this does not fit deepspeed's 30 s SIGTERM grace with a step around it


@dataclass
class RunArgs:
    """What a launcher adds to the config: where things are, not how to train."""

    stage: str
    output_dir: Path
    deepspeed: str | None = None
    resume_from_checkpoint: str | None = None
    teachers: str | None = None  # finetune: teachers/ dir for KL + param alignment
    init_hypernet: str | None = None  # finetune: start from a pretrained hypernet/
    teacher_model: str | None = None  # finetune: a frozen backbone dir whose logits are the KL target
    start_over: bool = False  # a fresh run into a dir with another run's checkpoints: move them aside first


@dataclass
class Checked:
    """Everything preflight checked and loaded for a run, handed to :func:`train` (nothing written yet)."""

    cfg: TagiConfig  # frozen (config.frozen): what preflight resolved is what runs; a later change is an error
    args: RunArgs
    spec: stages.Spec  # what the stage trains, reads and writes
    ds: dict  # the final DeepSpeed dict for this world size
    world_size: int
    tokenizer: Any
    loader: Any  # this rank's training loader
    fingerprint: dict  # what a checkpoint of this run records (and a resumed one must match)
    rows: dict[str, int] | None = None  # teacher-bank rows: stage teachers (trained) or finetune (frozen)
    resume: Path | None = None
    teacher_cfg: TagiConfig | None = None  # --teacher_model's config (tagi_ds.teacher_model.check)


def preflight(cfg: TagiConfig, args: RunArgs) -> Checked:
    """Check every input of the run before anything is written and before any process group starts: the
    output dir, the DeepSpeed JSON (DeepSpeed's own schema), the artifacts (--teachers, --init_hypernet:
    config keys, sites, every tensor's shape from the safetensors headers), the tokenizer and data (loaded
    here, once), the model (built on the meta device) and the checkpoint to resume (fingerprint, files).
    Bad input raises ConfigError / DataError (one line, exit code 2 under ``runtime.preflight.guarded``).
    The stage is resolved into its spec once, here; the config it returns is a frozen copy (``config.frozen``)."""
    world, rank = preflight_checks.env_world_size(), preflight_checks.env_rank()
    out = preflight_checks.check_output_dir(args.output_dir)
    if rank == 0 and (holder := rundir.holder(out)):  # rank 0 alone: the others would see their own rank 0's lock
        raise ConfigError(
            f"--output_dir {out}: another run is using it ({holder}); wait for it to end, or choose "
            "another --output_dir"
        )
    if args.start_over and args.resume_from_checkpoint:
        raise ConfigError("--start_over: a fresh start, so it cannot go with --resume_from_checkpoint; drop one")
    if not args.resume_from_checkpoint and not args.start_over:
        checkpoint.refuse_previous_run(out)
    ds = preflight_checks.deepspeed_config(args.deepspeed, cfg, world)
    spec = stages.spec(args.stage, cfg)  # what the stage trains, reads and writes
    if args.teachers and not spec.teacher:
        raise ConfigError(
            f"--teachers {args.teachers}: unused by this run (it needs finetune, mode tagi and "
            f"loss.kl_weight or loss.param_weight > 0; mode {cfg.mode}); drop --teachers"
        )
    if args.init_hypernet and not spec.mode.instruction:
        raise ConfigError(f"--init_hypernet {args.init_hypernet}: a hypernetwork needs mode tagi (mode {cfg.mode})")
    teacher_model.check_flags(cfg, args.teacher_model, args.teachers, spec.teacher)
    bank = teacher_model.needs_bank(cfg, args.teacher_model, spec.teacher)  # the teacher LoRA bank is read
    rows = None
    if bank:
        if not args.teachers:
            raise ConfigError(
                "--teachers: finetune with loss.kl_weight or loss.param_weight > 0 needs --teachers DIR "
                "(or --teacher_model DIR with loss.param_weight=0, or --set loss.kl_weight=0 loss.param_weight=0)"
            )
        cfg, rows = artifacts.adopt_teacher(cfg, Path(args.teachers))  # rank, alpha, granularity from the dir
    tokenizer = data.load_tokenizer(cfg)
    teacher_cfg = teacher_model.check(cfg, args.teacher_model, tokenizer) if args.teacher_model else None
    tasks = data.load_tasks(cfg.data.spec, cfg.data, "train") if spec.stage.data == "tasks" else None
    if spec.mode.source.per_task:  # the teachers stage: a bank row per task (or category) it trains
        rows = data.teacher_rows(tasks, cfg.teacher.granularity)
    elif bank:
        artifacts.check_rows(
            tasks,
            rows,
            cfg.teacher.granularity,
            f"--teachers {args.teachers}",
            "train the teachers on the same data and filters",
        )
    loader = data.build_train_loader(
        cfg,
        tokenizer,
        stage=spec,
        rank=rank,
        world_size=world,
        teacher_rows=rows,
        tasks=tasks,
        teacher_view=True if teacher_cfg is not None else None,
    )
    model = assembly.meta_model(cfg, spec, tokenizer.special_ids, rows=len(rows) if rows else 0, teacher=bank)
    if bank:
        artifacts.check_teachers(Path(args.teachers), model.teacher, model, "--teachers")
    if args.init_hypernet:
        artifacts.check_hypernet(Path(args.init_hypernet), model, "--init_hypernet")
    fingerprint = checkpoint.fingerprint(args.stage, cfg, world, model)
    resume = checkpoint.check(args.resume_from_checkpoint, out, fingerprint) if args.resume_from_checkpoint else None
    if resume is not None:  # a changed setting the restored state belongs to is refused here, the others listed
        resume_settings.compare(resume, cfg, ds)
    fingerprint.update(resume_settings.record(cfg, ds))  # what the next resume compares itself with
    # The run a checkpoint belongs to (pruning removes only its own): a resume continues the checkpoint's run.
    fingerprint["run_id"] = checkpoint.run_id(resume) if resume is not None else None
    return Checked(frozen(cfg), args, spec, ds, world, tokenizer, loader, fingerprint, rows, resume, teacher_cfg)


def run(cfg: TagiConfig, args: RunArgs) -> Path:
    """Preflight, then train one stage; returns the final artifact directory (``hypernet/`` or ``teachers/``)."""
    return train(preflight(cfg, args))


def train(checked: Checked) -> Path:
    """Train one stage from what :func:`preflight` checked; returns the final artifact directory (or, when a
    stop request ended the session early, the checkpoint it saved)."""
    s = setup(checked)
    tc = checked.cfg.train
    try:
        while s.step < tc.max_steps:
            done = step(s)
            stop_bad = s.guards.too_many_bad()
            if s.step % tc.log_steps == 0 or s.step == tc.max_steps or stop_bad or done.ratios:
                s.progress.log(metrics(s, done))
            signalled = s.guards.stop_requested()
            pause = signalled or (tc.stop_after > 0 and s.step - s.start >= tc.stop_after)
            if s.step % tc.save_steps == 0 or pause or stop_bad or s.step == tc.max_steps:
                save(s)
            if stop_bad:
                stop_on_bad_steps(s)
            if pause and s.step < tc.max_steps:
                return stop(s, s.guards.reason if signalled else f"train.stop_after={tc.stop_after}")
    except TooManyBadSteps:
        raise
    except BaseException:
        s.progress.close()
        raise
    return finish(s)


# -- the parts of train() ---------------------------------------------------------------------------------------
@dataclass
class Session:
    """A training run in progress: what :func:`setup` built, and where the loop stands."""

    checked: Checked
    model: torch.nn.Module
    eng: Any  # the DeepSpeed engine
    batches: Any  # iterator over this rank's micro-batches
    guards: Guards
    progress: Progress
    out: Path
    start: int  # the step the session began at (0, or the resumed checkpoint's)
    step: int = 0  # optimizer steps done
    save_s: float = 0.0  # how long the last checkpoint took

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


@dataclass
class StepDone:
    """What one optimizer step leaves for its log line."""

    lr: float
    t0: float  # when it started (perf_counter)
    tokens: int = 0  # this rank's input + target tokens
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # loss and each term, mean over micro-batches
    loss_bad: bool = False  # a non-finite loss on some rank: nobody stepped
    norm: float | None = None  # the global gradient norm (None: the step was skipped)
    ratios: dict[str, float] = field(default_factory=dict)  # grad_ratio/* on train.grad_ratio_every steps


def setup(checked: Checked) -> Session:
    """Join the process group, write config.json, build the model (loading the artifacts it starts from) and
    the engine, and restore the checkpoint to resume."""
    cfg, args, ds, loader, rows = checked.cfg, checked.args, checked.ds, checked.loader, checked.rows
    out = rundir.start(rundir.RunStart.of(cfg, ds, args, checked.world_size))
    if checked.fingerprint.get("run_id") is None:
        checked.fingerprint["run_id"] = dist.broadcast_object(uuid.uuid4().hex if dist.is_main() else None)
    run = assembly.assemble(
        checked.spec,
        cfg,
        ds,
        checked.tokenizer.special_ids,
        world_size=checked.world_size,
        placement=plan.for_training(cfg, ds, checked.world_size, checked.teacher_cfg),
        rows=len(rows) if rows else 0,
        teacher=model_bank(checked),
        teacher_model=checked.teacher_cfg,
        loads=assembly.Loads(
            teachers=Path(args.teachers) if model_bank(checked) else None,
            init_hypernet=Path(args.init_hypernet) if args.init_hypernet else None,
        ),
    )
    model, eng = run.model, run.runner

    start = 0
    if checked.resume is not None:
        start, loader_state = checkpoint.load(eng, checked.resume)
        loader.load_state_dict(loader_state)
        resume_settings.apply(eng, cfg)  # this run's lr and schedule, not the restored ones (config.json's)

    guards = Guards(cfg.train.max_bad_steps, cfg.train.inject_fault)
    progress = Progress(out, args.stage, cfg.train.max_steps, start, cfg.train.tensorboard)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.trainable_parameters())  # full sizes
    progress.message(
        f"tagi-ds {args.stage}: recipe {cfg.recipe}, mode {cfg.mode}, {dist.world_size()} rank(s), "
        f"ZeRO-{ds_engine.zero_stage(ds)}, precision {ds_engine.precision(cfg)}, "
        f"device {eng.device.type}, {trainable:,} trainable parameters"
        + (f", resumed at step {start}" if start else "")
    )
    if layout := run.describe():
        progress.message(layout)
    if model.teacher_model is not None:
        progress.message(teacher_model.describe(model.teacher_model))
    return Session(checked, model, eng, iter(loader), guards, progress, out, start, step=start)


def model_bank(checked: Checked) -> bool:
    """The run holds the frozen teacher LoRA bank (``tagi_ds.teacher_model.needs_bank``)."""
    return teacher_model.needs_bank(checked.cfg, checked.args.teacher_model, checked.spec.teacher)


def step(s: Session) -> StepDone:
    """One optimizer step over ``train.grad_accum`` micro-batches; a non-finite loss on any rank skips it."""
    cfg, eng, guards = s.checked.cfg, s.eng, s.guards
    done = StepDone(lr=eng.get_lr()[0], t0=time.perf_counter())  # the rate this step uses (eng.step advances it)
    ratios = grad_ratio.StepRatios(s.model, cfg.loss) if grad_ratio.due(cfg.train.grad_ratio_every, s.step) else None
    for _ in range(cfg.train.grad_accum):
        batch = next(s.batches)
        # Counted on the host copy: reading the device's would wait for it (a sync per micro-step).
        done.tokens += int(batch.attention_mask.sum()) + batch.num_target_tokens()
        batch = batch.to(eng.device)
        if ratios is not None:  # before the step's own forward: ZeRO-3 backward expects its graph to be the last
            ratios.add(batch)
        loss, terms = eng(batch)
        loss = guards.inject(s.step, loss)
        if guards.loss_is_bad(loss, s.step):  # same decision on every rank: nobody steps
            done.loss_bad = True
            break
        eng.backward(loss)
        eng.step()
        for k, v in {"loss": loss, **terms}.items():  # device tensors, read once per logged step
            done.sums[k] = done.sums.get(k, 0.0) + v.detach().double() / cfg.train.grad_accum
    if done.loss_bad:
        eng.zero_grad()
    elif ratios is not None:
        done.ratios = ratios.result()
    # A skipped step has no gradient norm of its own (DeepSpeed still reports the previous one).
    done.norm = None if done.loss_bad else _norm(eng.get_global_grad_norm())
    guards.record(done.loss_bad or guards.grad_norm_is_bad(done.norm), s.step + 1)  # non-finite norm: update skipped
    s.step += 1
    return done


def metrics(s: Session, done: StepDone) -> dict[str, Any]:
    """The step's metrics.jsonl record; a collective (the terms are averaged over ranks)."""
    return {
        "step": s.step,
        **({"loss": None} if done.loss_bad else _mean_over_ranks(done.sums, s.eng.device)),
        "lr": done.lr,
        "grad_norm": done.norm,
        "tokens_per_s": done.tokens * dist.world_size() / (time.perf_counter() - done.t0),
        "skipped_steps": s.guards.skipped,
        **done.ratios,
    }


def save(s: Session) -> None:
    """A checkpoint of this step (a collective); warns when it took too long for deepspeed's SIGTERM grace."""
    t = time.perf_counter()
    checkpoint.save(
        s.eng,
        s.ckpt_dir,
        s.step,
        s.checked.loader.state_dict(),
        s.checked.cfg.train.keep_last,
        s.checked.fingerprint,
        fault=s.guards.save_fault,
    )
    s.save_s = time.perf_counter() - t
    if s.save_s > SAVE_WARN_S:
        s.progress.message(
            f"warning: saving step {s.step} took {s.save_s:.0f}s; deepspeed's launch.py kills ranks "
            "30 s after a SIGTERM, so stop this job by signalling the runner's PID (README: "
            "stopping)"
        )


def stop_on_bad_steps(s: Session) -> None:
    """``train.max_bad_steps`` non-finite steps in a row (saved already): one line, then exit code 3."""
    s.progress.close()
    message = s.guards.bad_steps_message(s.step, str(s.ckpt_dir / f"step-{s.step}"))
    preflight_checks.say_once(message)
    dist.barrier()  # rank 0 has printed before any rank exits (the launcher ends the job at the first)
    raise TooManyBadSteps(message)


def stop(s: Session, why: str) -> Path:
    """End the session early on request (saved already); returns the checkpoint to resume from."""
    s.progress.message(
        f"{why}: saved step {s.step} in {s.save_s:.1f}s, stopping (resume with --resume_from_checkpoint latest)"
    )
    s.progress.close()
    rundir.unlock(s.out)
    return s.ckpt_dir / f"step-{s.step}"


def finish(s: Session) -> Path:
    """Write the stage's artifact (``teachers/``, ``hypernet/`` or ``baseline_lora/``); returns its directory."""
    spec = s.checked.spec
    s.progress.close()
    s.progress.message(f"data (rank 0): {s.checked.loader.report()}")
    final = s.out / spec.artifact
    artifacts.save(s.model, final, s.checked.rows)  # what it holds: the mode's source (stages.AdapterSource)
    s.progress.message(f"done: {final}")
    dist.barrier()  # every rank is done with the directory before rank 0 lets another run have it
    rundir.unlock(s.out)
    return final


def _mean_over_ranks(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Every logged term averaged over ranks in one collective (same keys on every rank)."""
    if not values:
        return {}
    t = torch.stack([v.to(device, torch.float64) for v in values.values()])
    if not torch.distributed.is_initialized():
        return dict(zip(values, t.tolist()))
    torch.distributed.all_reduce(t)
    return {k: float(v) / dist.world_size() for k, v in zip(values, t.tolist())}


def _norm(value) -> float | None:
    return None if value is None else float(value)
