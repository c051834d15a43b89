"""Final artifacts: ``hypernet/`` and ``teachers/`` (safetensors + JSON), written atomically.

``hypernet/``: ``generator.safetensors`` + ``config.json`` (the resolved TagiConfig and the site list).
``teachers/``: ``teachers.safetensors`` (``A.<site>`` ``[N, r, d_in]``, ``B.<site>`` ``[N, d_out, r]``),
``rows.json`` (task or category name -> row) and ``config.json``.
Under ZeRO-3 the parameters are gathered (a collective: every rank calls save_*), rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tagi_ds import stages
from tagi_ds.config import ConfigError, TagiConfig, from_dict
from tagi_ds.files import atomic_dir, read_json, usual_permissions
from tagi_ds.runtime import dist
from tagi_ds.runtime.preflight import fail, safetensors_header


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter]):
    """Full parameter values on every rank for the duration (a no-op without ZeRO-3)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def _write_dir(final: Path, files: dict[str, Any]) -> None:
    """Write ``files`` (name -> dict of tensors | JSON object) into ``final``, whole or not at all."""
    with atomic_dir(final) as tmp:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                save_file({k: v.detach().cpu().contiguous() for k, v in content.items()}, str(tmp / name))
                usual_permissions(tmp / name)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2), encoding="utf-8")


def _sites_meta(model) -> list[dict[str, Any]]:
    return [dataclasses.asdict(s) for s in model.sites]


def backbone_fingerprint(model) -> str:
    """A short hash of the frozen weights a generator was trained against: a strided sample (4096 values) of
    the base weight of the first and the last adapted site, as bf16, so an fp32 and a bf16 copy of one
    checkpoint agree. Shapes are checked elsewhere; this tells two backbones of the same shape apart (another
    checkpoint of the family, another seed of a random init). Collective under ZeRO-3 (it gathers 2 weights)."""
    weights = [model.backbone.get_submodule(model.sites[i].name).base_layer.weight for i in (0, -1)]
    digest = hashlib.sha256()
    with gathered(weights):
        for w in weights:
            flat = w.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096]
            digest.update(sample.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def save(model, path: Path, rows: dict[str, int] | None = None) -> None:
    """Write the artifact of ``model``'s adapter source (``stages.AdapterSource``): its trained module's tensors
    (float32) in the source's file, ``config.json``, and for a bank ``rows.json`` (the source's rows)."""
    src = model.source
    _save(model, src.trained(model), src.file, path, src.rows(rows, model.cfg), src.fingerprint)


def save_hypernet(model, path: Path) -> None:
    _save(model, model.generator, "generator.safetensors", path, None, fingerprint=True)


def _save(
    model, module, file: str, path: Path, rows: tuple[dict[str, int], str] | None, fingerprint: bool = False
) -> None:
    """``module``'s tensors in ``file``; ``rows``: ``(rows.json, granularity)`` of a LoRA bank, None without;
    ``fingerprint``: config.json records the backbone it was trained against (:func:`backbone_fingerprint`)."""
    fp = backbone_fingerprint(model) if fingerprint else None  # a collective: every rank, before rank 0 writes
    with gathered(list(module.parameters())):
        if dist.is_main():
            meta = {"tagi": model.cfg.to_dict(), "sites": _sites_meta(model)}
            if fp is not None:
                meta["backbone_fingerprint"] = fp
            files: dict[str, Any] = {file: {k: v.float() for k, v in module.state_dict().items()}}
            if rows is not None:
                files["rows.json"] = rows[0]
                meta.update(rank=module.rank, alpha=module.alpha, granularity=rows[1])
            _write_dir(path, {**files, "config.json": meta})
    dist.barrier()


def warn_if_other_backbone(model, path: Path, flag: str = "--hypernet") -> None:
    """One warning line when ``path`` was trained against other backbone weights of the same shapes: the
    generated adapters then run, but fit a backbone that is not this one (hypernets saved before the
    fingerprint existed are taken as they are)."""
    meta = read_json(Path(path) / "config.json", f"{flag} {Path(path) / 'config.json'}")
    saved = meta.get("backbone_fingerprint") if isinstance(meta, dict) else None
    mine = backbone_fingerprint(model)
    if isinstance(saved, str) and saved != mine and dist.is_main():
        trained = (meta.get("tagi") or {}).get("model", {}).get("model_name_or_path") or "a built-in random init"
        print(
            f"warning: {flag} {path}: trained against other backbone weights (fingerprint {saved}, this "
            f"backbone's {mine}; same shapes): its adapters fit {trained}, not this backbone; pass the "
            "--model_name_or_path it was trained with",
            flush=True,
        )


def read_config(path: Path, flag: str = "artifact") -> TagiConfig:
    """The TagiConfig an artifact dir was trained with (its ``config.json``, key ``tagi``)."""
    f = Path(path) / "config.json"
    meta = read_json(f, f"{flag} {f}", ("tagi",))
    try:
        return from_dict(meta["tagi"])
    except ConfigError as err:
        fail(f"{flag} {f}", f"not a config this version reads: {err}")


def _check_sites(path: Path, model, flag: str = "artifact") -> None:
    f = Path(path) / "config.json"
    meta = read_json(f, f"{flag} {f}", ("sites",))
    try:
        saved = [(s["name"], s["d_in"], s["d_out"]) for s in meta["sites"]]
    except (TypeError, KeyError) as err:
        fail(f"{flag} {f}", f"bad 'sites' entry (no {err})")
    mine = [(s.name, s.d_in, s.d_out) for s in model.sites]
    if saved != mine:
        first = next((a, b) for a, b in zip(saved + [None] * len(mine), mine + [None] * len(saved)) if a != b)
        fail(
            f"{flag} {f}",
            f"adapted sites differ from this model's: saved {first[0]}, here {first[1]}; use the same "
            "recipe and model.adapted",
            f"{len(saved)} saved, {len(mine)} here",
        )


def _check_tensors(f: Path, flag: str, expected: dict[str, tuple[int, ...]], optional: tuple[str, ...] = ()) -> None:
    """``f``'s header (the file whole) holds exactly ``expected``'s tensors with those shapes."""
    header = safetensors_header(f, f"{flag} {f}")
    for key, shape in expected.items():
        if key not in header:
            if key not in optional:
                fail(f"{flag} {f}", f"no tensor {key}; use the same recipe and hypernet.*/teacher.* settings")
        elif header[key][1] != shape:
            fail(
                f"{flag} {f}",
                f"tensor {key} has shape {header[key][1]}, this model's is {shape}; use the same "
                "recipe and hypernet.*/teacher.* settings (rank, hidden, ...)",
            )
    extra = sorted(set(header) - set(expected))
    if extra:
        fail(f"{flag} {f}", f"unexpected tensor {extra[0]} (written by another model or version)")


def check_hypernet(path: Path, model, flag: str = "--hypernet") -> None:
    """Preflight of a hypernet/ dir against the model this run builds (on the meta device): its config keys,
    adapted sites, and every generator tensor's shape in the safetensors header (the file whole)."""
    path = Path(path)
    _check_sites(path, model, flag)
    if model.generator is None:
        fail(flag, f"a hypernet/ dir needs mode tagi (this run trains mode {model.cfg.mode})", str(path))
    expected = {k: tuple(v.shape) for k, v in model.generator.state_dict().items()}
    _check_tensors(path / "generator.safetensors", flag, expected, optional=("marker.vector",))


def check_teachers(path: Path, bank, model, flag: str = "--teachers") -> None:
    """Preflight of a teachers/ or baseline_lora/ dir against ``bank`` of the meta model: sites and every
    factor's shape ``A.<site> [N, r, d_in]``, ``B.<site> [N, d_out, r]``."""
    path = Path(path)
    _check_sites(path, model, flag)
    expected = {f"{ab}.{k}": tuple(v.shape) for ab, part in (("A", bank.A), ("B", bank.B)) for k, v in part.items()}
    _check_tensors(path / "teachers.safetensors", flag, expected)


def load_hypernet(model, path: Path, flag: str = "--hypernet") -> None:
    """Load generator weights (before the engine is built). Sites and shapes must match; one warning when it was
    trained against other backbone weights of the same shapes."""
    _load_into(
        model.generator,
        Path(path) / "generator.safetensors",
        model,
        "a hypernet/ dir written by pretrain.py or finetune.py",
        flag,
    )


def _load_into(module: torch.nn.Module, f: Path, model, what: str, flag: str | None = None) -> None:
    """``f``'s tensors into ``module`` (the generator or a LoRA bank of ``model``); sites and shapes must match.
    ``flag``: the artifact records the backbone it was trained against; warn (naming ``flag``) if not this one."""
    if not f.is_file():
        raise ConfigError(f"{str(f.parent)!r}: no {f.name} ({what} is expected)")
    _check_sites(f.parent, model)
    state = load_file(str(f))
    mine = module.state_dict()
    for key, want in mine.items():  # in module order, so the first mismatch named is the first one built
        if key in state and tuple(state[key].shape) != tuple(want.shape):
            raise ConfigError(
                f"{f}: {type(module).__name__.lower().replace('lorabank', 'LoRA bank')} tensor {key} "
                f"has shape {tuple(state[key].shape)}, this model's {tuple(want.shape)}; use the same "
                "recipe and hypernet.*/teacher.* settings (rank, hidden, number of rows, ...)"
            )
    missing, unexpected = module.load_state_dict(state, strict=False)
    if flag is not None:  # a source whose artifact records its backbone (stages.AdapterSource.fingerprint)
        warn_if_other_backbone(model, f.parent, flag)
    if missing == ["marker.vector"] and not unexpected:
        # A hypernet saved without hypernet.fusion_marker: the marker is set to zero, which is exactly fusion
        # without a marker, so the loaded model computes what the saved one did (and finetuning may train it).
        with torch.no_grad():
            module.marker.vector.zero_()
        if dist.is_main():
            print(f"{f}: no fusion marker saved; it starts at zero (identical to fusion without a marker)", flush=True)
        return
    if missing or unexpected:
        raise ConfigError(
            f"{f}: tensor keys differ (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "use the same hypernet.*/teacher.* settings"
        )


def check(path: Path, model, flag: str) -> None:
    """Preflight of the dir that gives ``model`` (on the meta device) its adapters: a hypernet/ dir for its
    generator, a teachers/ or baseline_lora/ dir for its LoRA bank (what its ``stages.AdapterSource`` trains)."""
    src, path = model.source, Path(path)
    _check_sites(path, model, flag)
    expected = {k: tuple(v.shape) for k, v in src.trained(model).state_dict().items()}
    _check_tensors(path / src.file, flag, expected, optional=src.optional)


def load(model, path: Path) -> None:
    """Load the adapters ``model`` runs with (before an engine is built): its generator's, or its LoRA bank's."""
    src = model.source
    _load_into(
        src.trained(model),
        Path(path) / src.file,
        model,
        f"a {src.dir}/ dir",
        f"--{src.flag}" if src.fingerprint else None,
    )


def save_teachers(model, path: Path, rows: dict[str, int], granularity: str) -> None:
    _save(model, model.bank, "teachers.safetensors", path, (rows, granularity))


def read_teacher_rows(path: Path, flag: str = "--teachers") -> tuple[dict[str, int], dict[str, Any]]:
    """``rows.json`` (name -> row, rows 0..N-1) and ``config.json`` (rank, alpha, granularity, ...) of a
    teachers/ or baseline_lora/ dir, checked."""
    path = Path(path)
    rows = read_json(path / "rows.json", f"{flag} {path / 'rows.json'}")
    meta = read_json(
        path / "config.json", f"{flag} {path / 'config.json'}", ("tagi", "sites", "rank", "alpha", "granularity")
    )
    if (
        not isinstance(rows, dict)
        or not rows
        or sorted(rows.values()) != list(range(len(rows)))
        or not all(isinstance(v, int) for v in rows.values())
    ):
        fail(f"{flag} {path / 'rows.json'}", "expected a JSON object of names to rows 0..N-1", str(rows)[:60])
    if not (
        isinstance(meta["rank"], int)
        and meta["rank"] > 0
        and isinstance(meta["alpha"], (int, float))
        and meta["granularity"] in stages.ROW_GRANULARITIES
    ):
        fail(
            f"{flag} {path / 'config.json'}",
            "rank, alpha or granularity is not valid",
            f"{meta['rank']!r}, {meta['alpha']!r}, {meta['granularity']!r}",
        )
    return rows, meta


def adopt_teacher(cfg: TagiConfig, path: Path, flag: str = "--teachers") -> tuple[TagiConfig, dict[str, int]]:
    """A new config whose ``teacher`` takes a teachers/ dir's rank, alpha and granularity (the bank this run
    builds takes the saved shapes), validated again, and the dir's rows; ``cfg`` itself is left as it was."""
    rows, meta = read_teacher_rows(path, flag)
    teacher = dataclasses.replace(cfg.teacher, rank=meta["rank"], alpha=meta["alpha"], granularity=meta["granularity"])
    cfg = dataclasses.replace(cfg, teacher=teacher)
    try:
        cfg.validate()
    except ConfigError as err:
        fail(f"{flag} {Path(path) / 'config.json'}", str(err))
    return cfg, rows


def check_rows(tasks, rows: dict[str, int], granularity: str, where: str, hint: str) -> None:
    """Every task has a teacher row (by its name, or its category); the first one without is a ConfigError."""
    for task in tasks:
        key = task.name if granularity == "task" else task.category
        if key not in rows:
            raise ConfigError(
                f"{where}: no teacher for {granularity} {key!r} (rows.json has {len(rows)} "
                f"{granularity}s, e.g. {next(iter(rows))!r}); {hint}"
            )


def load_teachers(bank, path: Path, model) -> None:
    """Copy saved teacher factors into ``bank`` (before the engine is built)."""
    _load_into(bank, Path(path) / "teachers.safetensors", model, "a teachers/ dir written by train_teachers.py")
