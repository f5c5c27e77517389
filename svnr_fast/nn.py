"""Modules around the fused ops: the per-pixel FiLM and the tabulated time embedding that feeds it.

A UNet conditioned on a per-pixel time map (DESIGN.md §1.6) warps the map to knot units
(`warp`), builds one (K, E) feature table at the K knot times (`TimeEmbedding`), turns it into a
(K, 2C) [scale | shift] table per block (a Linear of its own) and modulates each GroupNorm with
`GroupNormSpatialFiLM(h, u, table)`; its GroupNorms without FiLM but followed by SiLU are `GroupNormSiLU`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .ops import _checks


class GroupNormSpatialFiLM(nn.Module):
    """GroupNorm whose affine output is modulated per pixel by a tabulated time embedding, then SiLU.

    Owns the GroupNorm parameters; `forward(h, u, table)` takes the feature map h (B, C, H, W), the
    warped time map u (B, 1, H, W) in knot units and the (K, 2C) [scale | shift] table of this block
    (DESIGN.md §1.6). Served by the fused op `svnr::groupnorm_film`. Only shapes are checked here:
    a NaN check would synchronise with the GPU in every block of every step.

    A drop-in for a UNet block's `act(GroupNorm(h) * (1 + scale(t)) + shift(t))` with one (scale, shift)
    per image (e.g. diffusers' ResnetBlock2D with time_embedding_norm="scale_shift"): build it with
    `from_group_norm(block.norm2)` and give it, as `table`, the block's own (scale, shift) at K knot times
    (its time-embedding path applied to those times); each pixel then gets the FiLM of its own time, lerped
    between knots. At a time map equal everywhere to a knot time the block computes what it computed
    before. examples/per_pixel_time_unet.py converts a diffusers UNet2DModel this way.
    """

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, act: str = "silu") -> "GroupNormSpatialFiLM":
        """The module for an existing GroupNorm, sharing its weight and bias Parameters."""
        if not norm.affine:
            raise ValueError("the GroupNorm must be affine (GroupNormSpatialFiLM owns a weight and a bias)")
        film = cls(norm.num_channels, norm.num_groups, norm.eps, act)
        film.weight, film.bias = norm.weight, norm.bias
        return film

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-5, act: str = "silu"):
        super().__init__()
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or channels % groups:
            raise ValueError(f"groups must be a positive int dividing channels ({channels}), got {groups!r}")
        self.channels, self.groups, self.eps, self.act = channels, groups, eps, act
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, h: torch.Tensor, u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        _checks.groupnorm_film_args(h, u, table, self.weight, self.bias, self.groups, self.eps, self.act,
                                    check_values=False)
        return torch.ops.svnr.groupnorm_film(h, u, table, self.weight, self.bias, self.groups, float(self.eps),
                                             self.act)[0]

    def extra_repr(self) -> str:
        return f"{self.channels}, groups={self.groups}, eps={self.eps}, act={self.act!r}"


class GroupNormSiLU(nn.Module):
    """SiLU(GroupNorm(h)): a drop-in for `nn.GroupNorm(groups, channels)` followed by SiLU, with the same
    parameters (`weight`, `bias`), so state dicts load unchanged. Served by the fused op `svnr::groupnorm_silu`
    (groupnorm_film's C++ and CUDA kernels without FiLM, instead of GroupNorm's and SiLU's own passes over h).
    Only shapes are checked here, as in GroupNormSpatialFiLM."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        super().__init__()
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or channels % groups:
            raise ValueError(f"groups must be a positive int dividing channels ({channels}), got {groups!r}")
        self.groups, self.channels, self.eps = groups, channels, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        _checks.groupnorm_silu_args(h, self.weight, self.bias, self.groups, self.eps, check_values=False)
        return torch.ops.svnr.groupnorm_silu(h, self.weight, self.bias, self.groups, float(self.eps))[0]

    def extra_repr(self) -> str:
        return f"{self.groups}, {self.channels}, eps={self.eps}"


def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM's sinusoidal embedding of (continuous) times t (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def warp(tau: torch.Tensor, T: int, knots: int) -> torch.Tensor:
    """Warped time in knot units: u = sqrt(tau / T) * (K - 1)."""
    return (tau.clamp(0, T) / T).sqrt() * (knots - 1)


def knot_times(T: int, knots: int) -> torch.Tensor:
    """tau_k = T * (k / (K - 1))^2: the inverse warp at the knots."""
    return T * (torch.arange(knots, dtype=torch.float64) / (knots - 1)) ** 2


class TimeEmbedding(nn.Module):
    """MLP(sinusoidal(tau_k)) at the K knots: the shared (K, E) features every ResBlock's table is made from."""

    def __init__(self, channels: int, embed_channels: int, T: int, knots: int):
        super().__init__()
        self.channels = channels
        self.register_buffer("knot_times", knot_times(T, knots).float(), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(channels, embed_channels), nn.SiLU(),
                                 nn.Linear(embed_channels, embed_channels))

    def forward(self) -> torch.Tensor:
        return self.mlp(sinusoidal(self.knot_times, self.channels).to(self.mlp[0].weight.dtype))
