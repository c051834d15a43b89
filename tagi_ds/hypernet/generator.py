"""The generator: pooled instruction vector + site embedding -> LoRA factors for every adapted site.

For K tasks and S sites: ``h[k, s] = trunk([p_k ; e_s])`` (``[K, S, hidden]``), then a head per group of
sites with one shape (projection kind): ``A = head_A(h) -> [K, S_g, r, d_in]``, ``B = head_B(h) ->
[K, S_g, d_out, r]``. ``shared``: one head per group, the site embedding tells layers apart;
``per_layer``: one head per site, stored stacked ``[S_g, hidden, out]`` and applied with one einsum.
``head_B`` starts at zero, so every generated delta starts at exactly zero.

With ``fusion`` (T5 and ``hypernet.fusion``) and ``hypernet.fusion_marker`` the generator also owns
:class:`FusionMarker`, a learned vector added to the fused instruction states so that the decoder can tell
instruction tokens from input tokens (both reach its cross-attention as one unordered memory; see
``TagiModel.fusion_prefix``). Off by default: on the built-in dev split it changed nothing measurable
(docs/dev_split/README.md).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from tagi_ds.adapters.layer import Site
from tagi_ds.config import HypernetConfig


class _Head(nn.Module):
    """``[K, S_g, hidden] -> [K, S_g, out]``; weight ``[1 or S_g, hidden, out]``."""

    def __init__(self, n_weights: int, hidden: int, out: int, std: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(n_weights, hidden, out) * std if std else torch.zeros(n_weights, hidden, out)
        )
        self.bias = nn.Parameter(torch.zeros(n_weights, out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.weight.shape[0] == 1:
            return h @ self.weight[0] + self.bias[0]
        return torch.einsum("ksh,sho->kso", h, self.weight) + self.bias


class FusionMarker(nn.Module):
    """``states [K, Li, d] -> states + m``: a learned instruction-segment vector (zero at start, so a marker
    that never trained leaves fusion exactly as without it). A module of its own so that ZeRO-3 gathers ``m``
    when it is applied."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.vector = nn.Parameter(torch.zeros(d_model))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return states + self.vector.to(states.dtype)


class Generator(nn.Module):
    def __init__(self, d_model: int, sites: list[Site], cfg: HypernetConfig, fusion: bool = False) -> None:
        super().__init__()
        self.rank = cfg.rank
        self.num_sites = len(sites)
        self.scale = cfg.alpha / cfg.rank
        self.site_embed = nn.Embedding(len(sites), cfg.site_dim)
        nn.init.normal_(self.site_embed.weight, std=1.0)
        self.norm = nn.LayerNorm(d_model)
        self.trunk = nn.Sequential(
            nn.Linear(d_model + cfg.site_dim, cfg.hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.GELU(),
        )
        groups: dict[tuple[str, int, int], list[Site]] = defaultdict(list)
        for s in sites:
            groups[(s.kind, s.d_in, s.d_out)].append(s)
        self.groups = list(groups.values())
        self.head_A = nn.ModuleList()
        self.head_B = nn.ModuleList()
        for group in self.groups:
            n = 1 if cfg.generator == "shared" else len(group)
            d_in, d_out = group[0].d_in, group[0].d_out
            # A's entries come out with std ~ 1/sqrt(d_in) (like a Kaiming-initialised LoRA A) for O(1) h.
            self.head_A.append(_Head(n, cfg.hidden, cfg.rank * d_in, 1.0 / math.sqrt(cfg.hidden * d_in)))
            self.head_B.append(_Head(n, cfg.hidden, d_out * cfg.rank, 0.0))
        self.marker = FusionMarker(d_model) if fusion and cfg.fusion_marker else None
        for g, group in enumerate(self.groups):
            self.register_buffer(f"_sites_{g}", torch.tensor([s.index for s in group]), persistent=False)

    def forward(self, pooled: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``pooled [K, d_model]`` -> ``[(A [K, r, d_in], B [K, d_out, r])]`` indexed by site.

        A plain list of tensors (not a dict keyed by int): ZeRO-3 hooks the tensors a module returns to
        re-gather its parameters for backward, and only understands tensors in lists, tuples and str-keyed dicts.
        """
        p = self.norm(pooled.to(self.norm.weight.dtype))
        K, r = p.shape[0], self.rank
        out: list = [None] * self.num_sites
        for g, group in enumerate(self.groups):
            idx = getattr(self, f"_sites_{g}")
            e = self.site_embed(idx)  # [S_g, site_dim]
            h = self.trunk(torch.cat([p[:, None, :].expand(K, len(group), -1), e[None].expand(K, -1, -1)], dim=-1))
            A = self.head_A[g](h).view(K, len(group), r, group[0].d_in)
            B = self.head_B[g](h).view(K, len(group), group[0].d_out, r)
            for j, s in enumerate(group):
                out[s.index] = (A[:, j], B[:, j])
        return out
