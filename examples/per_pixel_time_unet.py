"""Per-pixel time conditioning for a diffusers UNet2DModel through svnr_fast.nn.GroupNormSpatialFiLM.

A UNet2DModel built with `resnet_time_scale_shift="scale_shift"` conditions each ResnetBlock2D on the time
of the whole image:

    h = SiLU(GroupNorm(h) * (1 + scale) + shift),   [scale | shift] = time_emb_proj(SiLU(time_embedding(t)))

SVNR gives every pixel its own time. `PerPixelTimeUNet(unet)` keeps every weight of the UNet and replaces
that line of each block with GroupNormSpatialFiLM: the block's [scale | shift] is computed at K knot times
(dense at small times, `tau_k = T (k / (K - 1))^2`) and each pixel lerps the rows of its own time, at
every resolution the time map average-pooled to the block's size (DESIGN.md §1.6). Where the time map
is one knot time everywhere, the converted UNet computes what the UNet computed at that timestep.

    unet = UNet2DModel(in_channels=6, out_channels=3, resnet_time_scale_shift="scale_shift", ...)
    model = PerPixelTimeUNet(unet)               # the UNet's weights, converted in place
    eps_hat = model(y_prime, x, tau)             # tau: (B, 1, H, W) svnr times

Run it: `python examples/per_pixel_time_unet.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from svnr_fast.nn import GroupNormSpatialFiLM, knot_times, warp


class TimeKnots:
    """The knot features and the time map of the forward pass under way, shared by the converted blocks."""

    def __init__(self, T: int, knots: int):
        self.T, self.knots = T, knots
        self.features: torch.Tensor | None = None   # (K, E): the UNet's time embedding at the knot times
        self._u: dict[tuple[int, int], torch.Tensor] = {}
        self._tau: torch.Tensor | None = None

    def start(self, features: torch.Tensor, tau: torch.Tensor) -> None:
        self.features, self._tau, self._u = features, tau, {}

    def u_at(self, size) -> torch.Tensor:
        """The warped time map in knot units, u = sqrt(tau / T) * (K - 1), pooled to a block's resolution."""
        size = tuple(size)
        if size not in self._u:
            tau = self._tau
            if tuple(tau.shape[-2:]) != size:
                tau = F.adaptive_avg_pool2d(tau, size)
            self._u[size] = warp(tau, self.T, self.knots)
        return self._u[size]


class PerPixelResnetBlock(nn.Module):
    """A ResnetBlock2D (time_embedding_norm="scale_shift", SiLU) with its FiLM looked up per pixel."""

    def __init__(self, block: ResnetBlock2D, knots: TimeKnots):
        super().__init__()
        if block.time_embedding_norm != "scale_shift" or block.time_emb_proj is None:
            raise ValueError("convert a UNet built with resnet_time_scale_shift='scale_shift': its blocks apply the "
                             "time as a FiLM after GroupNorm, which GroupNormSpatialFiLM computes per pixel")
        if not isinstance(block.nonlinearity, nn.SiLU) or block.upsample is not None or block.downsample is not None:
            raise ValueError("only SiLU blocks without their own up/down-sampling are converted here")
        self.block = block
        self.film = GroupNormSpatialFiLM.from_group_norm(block.norm2, act="silu")
        self.knots = knots

    def forward(self, input_tensor: torch.Tensor, temb=None, *args, **kwargs) -> torch.Tensor:
        block = self.block
        h = block.conv1(block.nonlinearity(block.norm1(input_tensor)))
        features = self.knots.features if block.skip_time_act else block.nonlinearity(self.knots.features)
        table = block.time_emb_proj(features)                      # (K, 2C): [scale | shift] at each knot
        h = self.film(h, self.knots.u_at(h.shape[-2:]).to(h.dtype), table.to(h.dtype))
        h = block.conv2(block.dropout(h))
        shortcut = input_tensor if block.conv_shortcut is None else block.conv_shortcut(input_tensor)
        return (shortcut + h) / block.output_scale_factor


class PerPixelTimeUNet(nn.Module):
    """`forward(condition, x, tau)`: the UNet on [condition | x] with the per-pixel time map tau (B, 1, H, W)."""

    def __init__(self, unet: UNet2DModel, T: int = 1000, knots: int = 257):
        super().__init__()
        self.unet = unet
        self.knots = TimeKnots(T, knots)
        self.register_buffer("knot_times", knot_times(T, knots).float(), persistent=False)
        blocks = [(name, module) for name, module in unet.named_modules() if isinstance(module, ResnetBlock2D)]
        if not blocks:
            raise ValueError("this UNet has no ResnetBlock2D to convert")
        for name, block in blocks:
            parent, _, attribute = name.rpartition(".")
            setattr(unet.get_submodule(parent), attribute, PerPixelResnetBlock(block, self.knots))

    def forward(self, condition: torch.Tensor, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        dtype = unet.time_embedding.linear_1.weight.dtype
        self.knots.start(unet.time_embedding(unet.time_proj(self.knot_times).to(dtype)), tau)
        # the UNet's own per-image embedding of this timestep feeds none of the converted blocks
        return unet(torch.cat([condition, x], dim=1), 0).sample


def small_unet(channels: int = 3) -> UNet2DModel:
    """A CIFAR-sized UNet2DModel with scale-shift time conditioning, conditioned on [y' | x]."""
    return UNet2DModel(sample_size=32, in_channels=2 * channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       resnet_time_scale_shift="scale_shift")


if __name__ == "__main__":
    torch.manual_seed(0)
    model = PerPixelTimeUNet(small_unet())
    y_prime, x = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    tau = torch.linspace(0, 400, 32).view(1, 1, 1, 32).expand(2, 1, 32, 32).contiguous()   # time grows left to right
    eps_hat = model(y_prime, x, tau)
    eps_hat.square().mean().backward()
    print("eps_hat", tuple(eps_hat.shape), "grad of the knot embedding",
          model.unet.time_embedding.linear_1.weight.grad.norm().item())
