"""The SVNR UNet: an ADM/SR3-style denoiser whose time conditioning is a per-pixel map.

The network sees `concat(y', x_t)` and the per-pixel time map `tau` (DESIGN.md §1.6). Every ResBlock
modulates its second GroupNorm with a tabulated time embedding: K knots uniform in the warped time
`u = sqrt(tau / T) * (K - 1)` (dense at the small times where few-step sampling lives), knot times
`tau_k = T * (k / (K - 1))^2`, `table_b = Linear_b(SiLU(MLP(sinusoidal(tau_k))))` of shape (K, 2C).
Per level the time map is the average-pooled full-resolution `tau`, warped to `u`; the fused op
`svnr::groupnorm_film` lerps the two table rows around `u` inside GroupNorm + FiLM + SiLU.

Two parametrisations of the output, selected by `UNetConfig.parametrisation`:
- "epsilon" (the paper): the network predicts the noise, `eps_hat = F`.
- "edm" (the default, better in the pilot): EDM-style preconditioning per pixel with `sigma^2 =
  gamma(tau)`, `sigma_data = 0.5`: the network sees `c_in (x_t - 0.5)` and `x0_hat = 0.5 + c_skip (x_t -
  0.5) + c_out F`.
Either way `predict` returns `eps_hat = (x_t - x0_hat) / sqrt(gamma(tau))` (0 where gamma(tau) = 0) for
the sampler and `x0_hat`. Models are saved as safetensors with their config (svnr_fast.app.checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import GroupNormSiLU, GroupNormSpatialFiLM, TimeEmbedding, warp
from ..schedule import Schedule

PARAMETRISATIONS = ("edm", "epsilon")
MAX_T = 100_000


@dataclass(frozen=True)
class UNetConfig:
    image_channels: int = 3
    channels: int = 64                    # width of level 0; level l has channels * channel_mult[l]
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    res_blocks: int = 2                   # ResBlocks per encoder level (the decoder has one more)
    attention_levels: tuple[int, ...] = ()   # levels (0 = full resolution) with self-attention
    attention_window: int = 8             # attention within windows of this many positions squared
    head_channels: int = 32
    groups: int = 32
    dropout: float = 0.0
    knots: int = 257
    parametrisation: str = "edm"
    sigma_data: float = 0.5
    schedule: dict = field(default_factory=lambda: Schedule().config())

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if self.parametrisation not in PARAMETRISATIONS:
            raise ValueError(f"parametrisation must be one of {PARAMETRISATIONS}, got {self.parametrisation!r}")
        # bounds far beyond any useful model, so that a damaged or hostile config is refused before anything
        # is built from it (a file's weights are checked against the config on the meta device afterwards)
        for name, low, high in (("image_channels", 1, 16), ("channels", 1, 4096), ("res_blocks", 0, 32),
                                ("attention_window", 1, 1024), ("head_channels", 1, 4096), ("groups", 1, 4096),
                                ("knots", 2, 65537)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
        levels = len(self.channel_mult)
        if not 1 <= levels <= 10 or any(isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 64
                                        for m in self.channel_mult):
            raise ValueError(f"channel_mult must be 1 to 10 ints in [1, 64], got {self.channel_mult}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.sigma_data, (int, float)) and 0 < self.sigma_data < float("inf")):
            raise ValueError(f"sigma_data must be a positive number, got {self.sigma_data!r}")
        T = self.schedule.get("T") if isinstance(self.schedule, dict) else None
        if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_T:
            raise ValueError(f"schedule must be a dict with T an int in [1, {MAX_T}], got {self.schedule!r}")
        if any(not 0 <= a < levels for a in self.attention_levels):
            raise ValueError(f"attention_levels must lie in [0, {levels}), got {self.attention_levels}")
        for width in {self.channels * m for m in self.channel_mult}:
            if width % self.groups:
                raise ValueError(f"groups ({self.groups}) must divide every level width, not {width}")
        for level in self.attention_levels:
            width = self.channels * self.channel_mult[level]
            if width % max(1, width // self.head_channels):
                raise ValueError(f"the attention width {width} of level {level} must split into heads of "
                                 f"{self.head_channels} channels")

    @property
    def multiple(self) -> int:
        """Height and width are padded to a multiple of this (2 ** number of downsamplings)."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "UNetConfig":
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {sorted(unknown)} (written by a newer svnr_fast?)")
        return cls(**values)


PRESETS = {
    # a few thousand parameters' worth of everything: for tests
    "tiny": UNetConfig(channels=16, channel_mult=(1, 2), res_blocks=1, attention_levels=(1,), head_channels=16,
                       groups=8),
    # the model bundled for CPUs (~2.6 M parameters)
    "small": UNetConfig(channels=32, channel_mult=(1, 2, 3, 4), res_blocks=1, attention_levels=(3,),
                        head_channels=32, groups=16),
    # for GPUs (~36 M parameters)
    "base": UNetConfig(channels=96, channel_mult=(1, 2, 3, 4), res_blocks=2, attention_levels=(2, 3),
                       head_channels=64, groups=32),
}


def preset(name: str, **overrides) -> UNetConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm + SiLU (fused), conv, then GroupNorm + per-pixel FiLM + SiLU (fused), dropout, zero-initialised
    conv; skip."""

    def __init__(self, in_channels: int, out_channels: int, embed_channels: int, groups: int, dropout: float):
        super().__init__()
        self.norm_in = GroupNormSiLU(groups, in_channels)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_table = nn.Linear(embed_channels, 2 * out_channels)   # -> (K, 2C) = [scale | shift]
        self.norm_film = GroupNormSpatialFiLM(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def table(self, features: torch.Tensor) -> torch.Tensor:
        return self.time_table(F.silu(features))

    def forward(self, x: torch.Tensor, u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(self.norm_in(x))
        h = self.conv_out(self.dropout(self.norm_film(h, u, table)))   # the op computes in float32 whatever h is
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention within non-overlapping windows of `window` x `window` positions.

    Windows keep the cost linear in the image size and make a photo see the same attention as the
    training crops did (at the lowest level of a 64x64 crop, one 8x8 window is the whole map).
    Maps that are not a multiple of the window are padded by replication for the attention only.
    """

    def __init__(self, channels: int, head_channels: int, groups: int, window: int):
        super().__init__()
        self.heads, self.window = max(1, channels // head_channels), window
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        w, heads = self.window, self.heads
        h = self.norm(x)
        pad_h, pad_w = -H % w, -W % w
        if pad_h or pad_w:
            h = F.pad(h, (0, pad_w, 0, pad_h), mode="replicate")
        rows, cols = (H + pad_h) // w, (W + pad_w) // w
        qkv = self.qkv(h).reshape(B, 3, heads, C // heads, rows, w, cols, w)
        qkv = qkv.permute(1, 0, 4, 6, 2, 5, 7, 3).reshape(3, B * rows * cols, heads, w * w, C // heads)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])     # (windows, heads, w*w, C / heads)
        out = out.reshape(B, rows, cols, heads, w, w, C // heads).permute(0, 3, 6, 1, 4, 2, 5)
        out = out.reshape(B, C, rows * w, cols * w)[..., :H, :W]
        return x + self.proj(out)


class Prediction(NamedTuple):
    eps_hat: torch.Tensor   # (x_t - x0_hat) / sqrt(gamma(tau)); 0 where gamma(tau) = 0
    x0_hat: torch.Tensor    # the clean-image estimate; x_t itself where gamma(tau) = 0


class SVNRUNet(nn.Module):
    """`predict(y, x_t, tau)` -> Prediction(eps_hat, x0_hat); `forward` returns eps_hat.

    y, x_t: (B, C, H, W) in the signal domain [0, 1]; tau: (B, 1, H, W) per-pixel time. Any H, W: the
    input is padded (reflection) to a multiple of `config.multiple` and the output cropped back.
    In eval mode without autograd the time tables are computed once and cached until a weight changes.
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config = config or UNetConfig()
        self.schedule = Schedule.from_config(config.schedule)
        self.register_buffer("variance_table", self.schedule.table.clone(), persistent=False)
        ch, groups, levels = config.channels, config.groups, len(config.channel_mult)
        embed = 4 * ch
        self.time_embedding = TimeEmbedding(ch, embed, self.schedule.T, config.knots)
        self.conv_in = nn.Conv2d(2 * config.image_channels, ch, 3, padding=1)

        def block(cin, cout):
            return ResBlock(cin, cout, embed, groups, config.dropout)

        def attention(width, level):
            if level not in config.attention_levels:
                return None
            return SelfAttention(width, config.head_channels, groups, config.attention_window)

        self.down = nn.ModuleList()
        skip_widths, width = [ch], ch
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.res_blocks):
                self.down.append(_Block(block(width, ch * mult), attention(ch * mult, level), level))
                width = ch * mult
                skip_widths.append(width)
            if level < levels - 1:
                self.down.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skip_widths.append(width)
        self.middle = nn.ModuleList([_Block(block(width, width), attention(width, levels - 1), levels - 1),
                                     _Block(block(width, width), None, levels - 1)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for _ in range(config.res_blocks + 1):
                self.up.append(_Block(block(width + skip_widths.pop(), ch * mult), attention(ch * mult, level), level))
                width = ch * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                             nn.Conv2d(width, width, 3, padding=1)))
        self.norm_out = GroupNormSiLU(groups, width)
        self.conv_out = _zero(nn.Conv2d(width, config.image_channels, 3, padding=1))
        self._cached_tables: tuple | None = None

    # -- time tables --------------------------------------------------------------------------------

    def res_blocks(self) -> list[ResBlock]:
        return [m for m in self.modules() if isinstance(m, ResBlock)]

    def _table_parameters(self) -> list[torch.Tensor]:
        return list(self.time_embedding.parameters()) + [p for b in self.res_blocks() for p in b.time_table.parameters()]

    def _table_key(self) -> tuple:
        # inference tensors (a model made under torch.inference_mode) have no version counter: their
        # storage and dtype are the key, so in-place edits of them inside inference mode go unseen
        return tuple((p.data_ptr(), -1 if p.is_inference() else p._version, p.dtype) for p in self._table_parameters())

    def time_tables(self) -> list[torch.Tensor]:
        """The (K, 2C) [scale | shift] table of every ResBlock, in `res_blocks()` order.

        Computed in the parameters' dtype (float32 also under autocast: the tables are small and the
        fused op reads them in float32).
        Recomputed (differentiably) in training mode or under autograd; in eval mode without autograd
        cached and recomputed only when a parameter they depend on changed (in-place updates move its
        version counter, `.to()` and `load_state_dict` its storage or version).
        """
        use_cache = not self.training and not torch.is_grad_enabled()
        if use_cache and self._cached_tables is not None and self._cached_tables[0] == self._table_key():
            return self._cached_tables[1]
        with torch.autocast(self.variance_table.device.type, enabled=False):
            features = self.time_embedding()
            tables = [block.table(features) for block in self.res_blocks()]
        self._cached_tables = (self._table_key(), tables) if use_cache else None
        return tables

    def invalidate_time_tables(self) -> None:
        """Drop the cached tables (only needed after writing weights through `.data`, which autograd does not see)."""
        self._cached_tables = None

    def train(self, mode: bool = True):
        self._cached_tables = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._cached_tables = None
        return super()._apply(fn, *args, **kwargs)

    # -- forward --------------------------------------------------------------------------------------

    def gamma(self, tau: torch.Tensor) -> torch.Tensor:
        """gamma(tau) of the model's schedule (no value checks: safe inside loops that must not sync)."""
        tau = _at_least_float32(tau)
        return torch.ops.svnr.gamma(tau, self.variance_table.to(tau.dtype))

    def network(self, y: torch.Tensor, x_t: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """The raw network output F (B, C, H, W) for (y', x_t, tau), in float32."""
        self._check_inputs(y, x_t, tau)
        config = self.config
        if config.parametrisation == "edm":
            c_in = (self.gamma(tau) + config.sigma_data ** 2).rsqrt()
            x_in = c_in * (x_t - 0.5)
        else:
            x_in = 2 * x_t - 1
        h = torch.cat([2 * y - 1, x_in], dim=1)
        H, W = h.shape[-2:]
        m = config.multiple
        pad_h, pad_w = -H % m, -W % m
        if pad_h or pad_w:
            mode = "reflect" if pad_h < H and pad_w < W else "replicate"
            h = F.pad(h, (0, pad_w, 0, pad_h), mode=mode)
            tau = F.pad(tau, (0, pad_w, 0, pad_h), mode=mode)
        out = self._unet(h, _at_least_float32(tau))
        return _at_least_float32(out[..., :H, :W])

    def _unet(self, h: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        T, K = self.schedule.T, self.config.knots
        levels = len(self.config.channel_mult)
        taus = [tau]
        for _ in range(levels - 1):
            taus.append(F.avg_pool2d(taus[-1], 2))
        u = [warp(t, T, K) for t in taus]
        tables = iter(self.time_tables())
        h = self.conv_in(h)
        skips = [h]
        for stage in self.down:
            h = stage(h, u, tables) if isinstance(stage, _Block) else stage(h)
            skips.append(h)
        for stage in self.middle:
            h = stage(h, u, tables)
        for stage in self.up:
            if isinstance(stage, _Block):
                h = stage(torch.cat([h, skips.pop()], dim=1), u, tables)
            else:
                h = stage(h)
        return self.conv_out(self.norm_out(h))

    def _check_inputs(self, y, x_t, tau) -> None:
        C = self.config.image_channels
        if y.dim() != 4 or y.shape[1] != C or x_t.shape != y.shape:
            raise ValueError(f"y and x_t must both have shape (B, {C}, H, W), got {tuple(y.shape)} and "
                             f"{tuple(x_t.shape)}")
        B, _, H, W = y.shape
        if tuple(tau.shape) != (B, 1, H, W):
            raise ValueError(f"tau must be a time map of shape (B, 1, H, W) = {(B, 1, H, W)}, got {tuple(tau.shape)}")

    def predict(self, y: torch.Tensor, x_t: torch.Tensor, tau: torch.Tensor) -> Prediction:
        """eps_hat for the sampler and x0_hat, the clean-image estimate, in float32 (float64 for a float64 model)."""
        return self.prediction_from_network(self.network(y, x_t, tau), x_t, tau)

    def forward(self, y: torch.Tensor, x_t: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return self.predict(y, x_t, tau).eps_hat

    # -- parametrisation ------------------------------------------------------------------------------

    def prediction_from_network(self, out: torch.Tensor, x_t: torch.Tensor, tau: torch.Tensor) -> Prediction:
        g = self.gamma(tau)
        x_t = _at_least_float32(x_t)
        active = g > 0
        if self.config.parametrisation == "epsilon":
            eps_hat = torch.where(active, out, 0)
            return Prediction(eps_hat, x_t - g.sqrt() * eps_hat)
        sd2 = self.config.sigma_data ** 2
        sigma, total = g.sqrt(), g + sd2
        centred = x_t - 0.5
        x0_hat = 0.5 + (sd2 / total) * centred + (sigma * self.config.sigma_data * total.rsqrt()) * out
        # (x_t - x0_hat) / sigma written without the division, which is exact where sigma -> 0
        eps_hat = (sigma * centred - self.config.sigma_data * total.sqrt() * out) / total
        return Prediction(torch.where(active, eps_hat, 0), x0_hat)

    def network_target(self, x0: torch.Tensor, x_t: torch.Tensor, tau: torch.Tensor,
                       eps_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What `network` is trained to output, and the (B, 1, H, W) mask of pixels that carry loss.

        epsilon: the noise eps~; edm: F* = (x0 - 0.5 - c_skip (x_t - 0.5)) / c_out (EDM's effective
        target, unit variance at every noise level). Pixels with gamma(tau) = 0 have nothing to predict.
        """
        g = self.gamma(tau)
        mask = g > 0
        if self.config.parametrisation == "epsilon":
            return _at_least_float32(eps_target), mask
        sd, sd2 = self.config.sigma_data, self.config.sigma_data ** 2
        total = g + sd2
        c_skip = sd2 / total
        c_out = torch.where(mask, g.sqrt() * sd * total.rsqrt(), 1)
        target = (_at_least_float32(x0) - 0.5 - c_skip * (_at_least_float32(x_t) - 0.5)) / c_out
        return torch.where(mask, target, 0), mask


class _Block(nn.Module):
    """A ResBlock at one level (it takes the next time table and the level's warped time map), then attention."""

    def __init__(self, block: ResBlock, attention: SelfAttention | None, level: int):
        super().__init__()
        self.block, self.attention, self.level = block, attention, level

    def forward(self, h: torch.Tensor, u: list[torch.Tensor], tables) -> torch.Tensor:
        h = self.block(h, u[self.level], next(tables))
        return h if self.attention is None else self.attention(h)
