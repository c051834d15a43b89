"""What every backbone shares: loading or building the HF model, freezing, and injecting adapted sites."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import torch
from torch import nn

from tagi_ds import families
from tagi_ds.adapters.layer import AdaptedLinear, AdapterState, Site
from tagi_ds.config import ConfigError, ModelConfig, attention_error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_attention(cfg: ModelConfig) -> str:
    """The attention implementation to ask transformers for; a clear error if the family cannot use it (its
    record, as ``validate`` checks it) or flash-attn is absent."""
    if (why := attention_error(cfg)) is not None:  # for a config built without validate()
        raise ConfigError(why)
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn extra: "
            "pip install 'tagi-ds[flash]' (on a CUDA machine); or use sdpa"
        )
    return cfg.attn_implementation


def check_model_dir(path: str) -> Path:
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ConfigError(
            f"--model_name_or_path {path!r}: expected a local directory with config.json "
            "(no model hub access: download the checkpoint beforehand)"
        )
    return p


def freeze(model: nn.Module, trainable: list[str]) -> list[str]:
    """Freeze every parameter except those whose name matches one of ``trainable``; return the unfrozen."""
    patterns = []
    for pat in trainable:
        try:
            patterns.append(re.compile(pat))
        except re.error as err:
            raise ConfigError(f"model.trainable: bad regex {pat!r} ({err})") from err
    unfrozen = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(r.search(name) for r in patterns))
        if p.requires_grad:
            unfrozen.append(name)
    for pat in patterns:
        if not any(pat.search(n) for n in unfrozen):
            raise ConfigError(f"model.trainable: pattern {pat.pattern!r} matches no backbone parameter")
    return unfrozen


def inject(model: nn.Module, named: list[tuple[str, str, int, str]], state: AdapterState) -> list[Site]:
    """Wrap each ``(module_name, stack, layer, kind)`` Linear in an AdaptedLinear; return the sites."""
    sites = []
    for index, (name, stack, layer, kind) in enumerate(named):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, attr)
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"adapted site {name} is {type(base).__name__}, not a Linear")
        site = Site(
            index=index, name=name, stack=stack, layer=layer, kind=kind, d_in=base.in_features, d_out=base.out_features
        )
        setattr(parent, attr, AdaptedLinear(base, site, state))
        sites.append(site)
    if not sites:
        raise ConfigError("no adapted sites: check model.adapted and model.adapted_stacks")
    return sites


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[K, L, d]``, ``[K, L]`` -> ``[K, d]``: mean over real tokens only (padding never counts)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


# transformers renamed two APIs during 5.x (5.2x: ``cache=`` for ``past_key_values=``, and
# ``activation_checkpointing_enable`` for ``gradient_checkpointing_enable``); the GPU image still runs 5.17.
# Call whichever the installed version has, so that neither warns nor breaks.


def cache_kwarg(model: nn.Module) -> str:
    """The name under which ``model.forward`` / ``model.generate`` take a precomputed cache."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def enable_checkpointing(model: nn.Module, kwargs: dict) -> None:
    """Per-layer activation checkpointing of an HF model with the given checkpoint kwargs."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpoint_shape(path: str, arch: str) -> dict:
    """The shape fields of ``model`` as a local checkpoint's config.json gives them (``{}`` when it cannot be
    read: preflight then says what is wrong with the directory). A run on a checkpoint describes that checkpoint
    (planner, saved configs, tokenizer checks), not the recipe it started from; the weights load from the
    checkpoint either way. Which key holds which field is the family's record (``Family.shape``)."""
    import json

    family = families.get(arch)
    try:
        hf = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(hf, dict) or hf.get("model_type") != family.model_type:
        return {}  # another family: the build names the mismatch
    out = {field: hf[key] for field, key in family.shape.items() if hf.get(key) is not None}
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta") if isinstance(rope, dict) else None)
    if theta is not None:  # RoPE families: top-level in older configs, under rope_parameters in transformers 5
        out["rope_theta"] = float(theta)
    if family.window_switch and hf.get(family.window_switch) is False:
        out.pop("sliding_window", None)
    return out
