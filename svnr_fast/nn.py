"""Modules around the fused ops."""
from __future__ import annotations

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
