"""Eager PyTorch reference of every SVNR op (DESIGN.md §1), written to be read beside the paper.

This is the oracle of the tests and the baseline of the benchmarks; `svnr_fast.ops` has the same
signatures and results. Data may be float16/bfloat16/float32/float64; schedule math runs in float32
(float64 for float64 data) and time maps are returned in that precision. Noise arguments are optional:
when one is None it is drawn from a `torch.Generator` seeded from `(seed, offset)`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .ops import _checks


class TrainingSample(NamedTuple):
    y: torch.Tensor        # y' = x0 + sqrt(gamma(tau*)) eps_T: the condition and the sampler's start
    x_t: torch.Tensor      # the diffusion sample at the per-pixel time tau
    tau: torch.Tensor      # (B, 1, H, W) per-pixel time of x_t
    target: torch.Tensor   # eps~ = (x_t - x0) / sqrt(gamma(tau)); 0 (and zero loss weight) where gamma(tau) = 0


# ---------------------------------------------------------------------------------------------------
# §1.2 Schedule lookups
# ---------------------------------------------------------------------------------------------------

def _gamma(tau: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of the table at continuous time tau in [0, T] (clamped)."""
    T = table.numel() - 1
    tau = tau.clamp(0, T)
    k = tau.floor().clamp(max=T - 1).long()     # segment [k, k + 1]; tau = T uses the last one
    frac = tau - k
    g_lo, g_hi = table[k], table[k + 1]
    return g_lo + frac * (g_hi - g_lo)


def _time_from_variance(variance: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The exact inverse of `_gamma`: 0 below g[0], T above g[T]."""
    T = table.numel() - 1
    # k = the last table index with g[k] <= v, kept inside [0, T - 1] so that segment [k, k + 1] exists
    k = (torch.searchsorted(table, variance.contiguous(), right=True) - 1).clamp(0, T - 1)
    g_lo, g_hi = table[k], table[k + 1]
    return (k + (variance - g_lo) / (g_hi - g_lo)).clamp(0, T)


@_checks.one_read()
def _schedule_inputs(name: str, value: torch.Tensor, table: torch.Tensor):
    _checks.tensor(name, value)
    _checks.table(table, value.device)
    _checks.finite(name, value)
    dtype = _checks.compute_dtype(value.dtype)
    return value.to(dtype), table.to(dtype)


def gamma(tau: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """gamma(tau): the variance of the forward process at per-pixel time tau (any shape)."""
    tau, table = _schedule_inputs("tau", tau, table)
    return _gamma(tau, table)


def time_from_variance(v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """tau(v) = gamma^{-1}(v) (any shape)."""
    v, table = _schedule_inputs("v", v, table)
    return _time_from_variance(v, table)


# ---------------------------------------------------------------------------------------------------
# §1.3 Time map
# ---------------------------------------------------------------------------------------------------

def _time_map(variance: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """tau*(b, 1, h, w) = tau(max_c V): one time per pixel, shared by its channels."""
    return _time_from_variance(variance.amax(dim=1, keepdim=True), table)


def time_map(variance: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    _checks.tensor("variance", variance, ndim=4)
    variance, table = _schedule_inputs("variance", variance, table)
    return _time_map(variance, table)


def top_up(y: torch.Tensor, variance: torch.Tensor, table: torch.Tensor, *, z: torch.Tensor | None = None,
           seed: int = 0, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The working observation y' and its time map tau* (DESIGN.md §1.3).

    y' = y + sqrt(max(gamma(tau*) - V_c, 0)) * z gives every channel of a pixel the variance
    gamma(tau*), tau* = tau(max_c V). `variance` is the per-channel noise variance of y, (B, C, H, W).
    """
    table = _checks.top_up_args(y, variance, table, z, seed, offset)
    dtype = table.dtype
    variance = variance.to(dtype)
    tau_star = _time_map(variance, table)
    z = _noise(z, y, dtype, generator(y.device, seed, offset) if z is None else None)
    missing = (_gamma(tau_star, table) - variance).clamp_min(0)
    return (y.to(dtype) + missing.sqrt() * z).to(y.dtype), tau_star


# ---------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------

_MASK64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser: every output bit depends on every input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def generator(device: torch.device, seed: int, offset: int) -> torch.Generator:
    """The reference's noise stream for (seed, offset): distinct offsets give independent streams.

    (seed, offset) are hashed into the seed: the CPU generator (mt19937) keeps only its seed's low 32 bits, so
    a linear mix let offsets that differ by a multiple of 2**32 (the top-up's 2**40 against the sampler's
    step 0) share one stream, and seed 0 with offset 2**40 was manual_seed(0) itself.
    """
    mixed = _splitmix64(_splitmix64(seed & _MASK64) ^ (offset & _MASK64)) % (2**63)
    return torch.Generator(device=device).manual_seed(mixed)


def _noise(given: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype, gen: torch.Generator | None):
    if given is not None:
        return given.to(dtype)
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=dtype)


def _per_image(dtype: torch.dtype, *params: torch.Tensor) -> list[torch.Tensor]:
    """Per-image (B,) parameters as (B, 1, 1, 1) tensors."""
    return [p.to(dtype).view(-1, 1, 1, 1) for p in params]


# ---------------------------------------------------------------------------------------------------
# §1.4 Training sample
# ---------------------------------------------------------------------------------------------------

def training_sample(x0: torch.Tensor, sigma_r, sigma_s, u, table: torch.Tensor, *, correlated: bool = True,
                    eps_T: torch.Tensor | None = None, eps_prime: torch.Tensor | None = None,
                    seed: int = 0, offset: int = 0, per_channel: bool = False, t0_per: str = "image",
                    min_std: float = 0.0) -> TrainingSample:
    """One SVNR training sample from a clean batch x0 (B, C, H, W) in [0, 1].

    sigma_r, sigma_s: the Poisson-Gaussian noise of the photo to imitate; u in [0, 1]: how far back
    from tau* (as a fraction of the largest tau*) the sample lies. All three per image.
    Conventions of other SVNR codebases: per_channel=True gives every channel its own time map
    tau*_c = tau(V_c) (tau comes back (B, C, H, W)) instead of the shared tau(max_c V); t0_per="batch"
    takes one t0 for the whole batch, u times the largest tau* of the batch (u is then one value);
    min_std floors the noise standard deviation that sets tau*: V = max(V, min_std^2).
    """
    args = _checks.training_sample_args(x0, sigma_r, sigma_s, u, table, eps_T, eps_prime, seed, offset, t0_per,
                                        min_std)
    return TrainingSample(*_training_sample(x0, args.sigma_r, args.sigma_s, args.u, args.table, correlated,
                                            eps_T, eps_prime, seed, offset, bool(per_channel), t0_per == "batch",
                                            args.min_std))


def _training_sample(x0, sigma_r, sigma_s, u, table, correlated, eps_T, eps_prime, seed, offset, per_channel,
                     batch_t0, min_std):
    """training_sample on checked arguments; sigma_r, sigma_s, u are (B,) tensors."""
    dtype = _checks.compute_dtype(x0.dtype)
    table = table.to(dtype)
    x = x0.to(dtype)
    sigma_r, sigma_s, u = _per_image(dtype, sigma_r, sigma_s, u)
    gen = None if eps_T is not None and eps_prime is not None else generator(x0.device, seed, offset)
    eps_T = _noise(eps_T, x0, dtype, gen)
    eps_prime = _noise(eps_prime, x0, dtype, gen)

    # 1. the true noise variance of x0 gives the time map; y' carries exactly gamma(tau*) of noise
    variance = (sigma_r**2 + sigma_s**2 * x.clamp_min(0)).clamp_min(min_std**2)
    tau_star = _time_from_variance(variance, table) if per_channel else _time_map(variance, table)
    g_star = _gamma(tau_star, table)
    y = x + g_star.sqrt() * eps_T

    x_t, tau, target = bridge_sample(x, y, tau_star, u, table, correlated, eps_prime, batch_t0=batch_t0)
    return y.to(x0.dtype), x_t.to(x0.dtype), tau, target.to(x0.dtype)


def bridge_sample(x0: torch.Tensor, y: torch.Tensor, tau_star: torch.Tensor, u: torch.Tensor, table: torch.Tensor,
                  correlated: bool, eps_prime: torch.Tensor, *, batch_t0: bool = False):
    """Steps 2-5 of the training sample: x_t between x0 and the condition y' (at tau*), and its target.

    All tensors in one compute dtype; u is (B, 1, 1, 1); tau_star (B, 1, H, W) or (B, C, H, W).
    Returns (x_t, tau, target).
    """
    g_star = _gamma(tau_star, table)
    # 2. every pixel steps back from tau* by the same amount t0, as the sampler moves
    largest = tau_star.amax() if batch_t0 else tau_star.amax(dim=(1, 2, 3), keepdim=True)
    t0 = u * largest
    tau = (tau_star - t0).clamp_min(0)
    g = _gamma(tau, table)

    # 3.-4. the Brownian bridge between x0 (time 0) and y' (time tau*), or independent noise (ablation)
    if correlated:
        r = torch.where(g_star > 0, g / torch.where(g_star > 0, g_star, 1), 0)
        x_t = x0 + r * (y - x0) + (g * (1 - r)).clamp_min(0).sqrt() * eps_prime
    else:
        x_t = x0 + g.sqrt() * eps_prime

    # 5. the epsilon target; pixels at gamma(tau) = 0 have no noise to predict and get zero loss weight
    target = torch.where(g > 0, (x_t - x0) / torch.where(g > 0, g, 1).sqrt(), 0)
    return x_t, tau, target


# ---------------------------------------------------------------------------------------------------
# §1.5 Reverse step
# ---------------------------------------------------------------------------------------------------

def reverse_step(x: torch.Tensor, eps_hat: torch.Tensor, tau: torch.Tensor, delta, table: torch.Tensor, *,
                 eta: float = 1.0, z: torch.Tensor | None = None, clamp=None, seed: int = 0, offset: int = 0,
                 return_x0_hat: bool = False):
    """One step from per-pixel time tau to s = max(tau - delta, 0).

    Returns (x_new, tau_new), or (x_new, tau_new, x0_hat) with return_x0_hat=True.
    eta = 1 samples the posterior q(x_s | x_t, x0_hat); eta = 0 is deterministic (DDIM-like).
    """
    args = _checks.reverse_step_args(x, eps_hat, tau, delta, table, eta, z, clamp, seed, offset)
    low, high = args.clamp if args.clamp is not None else (None, None)
    x_new, tau_new, x0_hat = _reverse_step(x, eps_hat, tau, args.delta, args.table, args.eta, z, low, high,
                                           seed, offset, return_x0_hat)
    return (x_new, tau_new, x0_hat) if return_x0_hat else (x_new, tau_new)


def _reverse_step(x, eps_hat, tau, delta, table, eta, z, clamp_min, clamp_max, seed, offset, return_x0_hat):
    """reverse_step on checked arguments; delta is a (B,) tensor; x0_hat is empty unless requested."""
    dtype = _checks.compute_dtype(x.dtype)
    table = table.to(dtype)
    xc, eps = x.to(dtype), eps_hat.to(dtype)
    (delta,) = _per_image(dtype, delta)
    z = _noise(z, x, dtype, generator(x.device, seed, offset) if z is None else None)

    # 1.
    s = (tau.to(dtype) - delta).clamp_min(0)
    gt, gs = _gamma(tau.to(dtype), table), _gamma(s, table)
    # 3. the network's estimate of the clean image
    x0_hat = xc - gt.sqrt() * eps
    if clamp_min is not None:
        x0_hat = x0_hat.clamp(clamp_min, clamp_max)
    # 4. posterior variance scaled by eta^2; the rest of gamma(s) is carried by eps_hat
    sig2 = eta**2 * gs * (1 - gs / torch.where(gt > 0, gt, 1))
    x_new = x0_hat + (gs - sig2).clamp_min(0).sqrt() * eps + sig2.clamp_min(0).sqrt() * z
    # 2. finished pixels (gamma(tau) = 0) stay as they are
    finished = gt == 0
    x_new = torch.where(finished, xc, x_new)
    x0_hat = torch.where(finished, xc, x0_hat)
    x0_hat = x0_hat.to(x.dtype) if return_x0_hat else x.new_empty(0)
    return x_new.to(x.dtype), s.to(tau.dtype), x0_hat


# ---------------------------------------------------------------------------------------------------
# §1.6 GroupNorm + spatial FiLM (+ SiLU)
# ---------------------------------------------------------------------------------------------------

def lerp_table(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rows floor(u) and floor(u) + 1 of `table` (K, D), lerped at u (B, 1, H, W) -> (B, D, H, W)."""
    K = table.shape[0]
    u = u[:, 0].to(table.dtype).clamp(0, K - 1)
    k = u.floor().clamp(max=K - 2).long()
    frac = (u - k).unsqueeze(-1)
    rows = table[k] + frac * (table[k + 1] - table[k])    # (B, H, W, D)
    return rows.permute(0, 3, 1, 2)


def groupnorm_film(h: torch.Tensor, u: torch.Tensor, table: torch.Tensor, gn_weight: torch.Tensor,
                   gn_bias: torch.Tensor, groups: int, eps: float = 1e-5, act: str = "silu") -> torch.Tensor:
    """act((GroupNorm(h) * gn_weight + gn_bias) * (1 + scale(u)) + shift(u)), scale|shift = lerp(table, u).

    h: (B, C, H, W); u: (B, 1, H, W) warped time in knot units [0, K-1] (clamped); table: (K, 2C) with
    columns [scale | shift]. Differentiable in h, table, gn_weight and gn_bias (not u).
    """
    _checks.groupnorm_film_args(h, u, table, gn_weight, gn_bias, groups, eps, act)
    return _groupnorm_film(h, u, table, gn_weight, gn_bias, groups, eps, act)[0]


def _groupnorm_film(h, u, table, gn_weight, gn_bias, groups, eps, act):
    """groupnorm_film on checked arguments -> (out, mean, rstd).

    mean and rstd = 1 / sqrt(var + eps) of each (image, group), shape (B, groups) in the compute dtype,
    are what the backward reuses instead of recomputing them.
    """
    dtype = _checks.compute_dtype(h.dtype)
    B, C, H, W = h.shape
    # F.group_norm, also returning the statistics (its CUDA kernel takes NCHW-contiguous input only)
    normed, mean, rstd = torch.native_group_norm(h.to(dtype).contiguous(), gn_weight.to(dtype), gn_bias.to(dtype),
                                                 B, C, H * W, groups, eps)
    film = lerp_table(u.detach(), table.to(dtype))
    scale, shift = film[:, :C], film[:, C:]
    out = normed * (1 + scale) + shift
    if act == "silu":
        out = F.silu(out)
    return out.to(h.dtype), mean, rstd


def _groupnorm_film_backward(grad_out, h, u, table, gn_weight, gn_bias, mean, rstd, groups, act):
    """Gradients of groupnorm_film with respect to (h, table, gn_weight, gn_bias), written out.

    mean, rstd: the (B, groups) statistics the forward returned. With xhat the group-normalised h,
    n = xhat * w + b, a = 1 + scale(u), pre = n * a + shift(u):
    dpre = dout * act'(pre); dscale = dpre * n and dshift = dpre go to the two table rows each pixel
    lerps (weights 1 - frac and frac); dn = dpre * a; dw = sum dn * xhat; db = sum dn; and the
    GroupNorm backward dh = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)), dxhat = dn * w.
    """
    dtype = _checks.compute_dtype(h.dtype)
    B, C, H, W = h.shape
    K = table.shape[0]
    group_size = C // groups * H * W
    grouped = h.to(dtype).reshape(B, groups, group_size)
    mean, rstd = mean.to(dtype).reshape(B, groups, 1), rstd.to(dtype).reshape(B, groups, 1)
    xhat = ((grouped - mean) * rstd).reshape(B, C, H, W)
    w, b = gn_weight.to(dtype).view(1, C, 1, 1), gn_bias.to(dtype).view(1, C, 1, 1)
    n = xhat * w + b
    film = lerp_table(u, table.to(dtype))
    scale, shift = film[:, :C], film[:, C:]
    pre = n * (1 + scale) + shift
    dpre = grad_out.to(dtype)
    if act == "silu":
        sig = torch.sigmoid(pre)
        dpre = dpre * sig * (1 + pre * (1 - sig))

    # table: each pixel's d[scale | shift] goes to rows k (weight 1 - frac) and k + 1 (weight frac)
    dfilm = torch.cat([dpre * n, dpre], dim=1).permute(0, 2, 3, 1).reshape(-1, 2 * C)
    uc = u[:, 0].to(dtype).clamp(0, K - 1).reshape(-1)
    k = uc.floor().clamp(max=K - 2).long()
    frac = (uc - k).unsqueeze(1)
    grad_table = torch.zeros(K, 2 * C, dtype=dtype, device=h.device)
    grad_table.index_add_(0, k, dfilm * (1 - frac))
    grad_table.index_add_(0, k + 1, dfilm * frac)

    dn = dpre * (1 + scale)
    grad_bias = dn.sum(dim=(0, 2, 3))
    grad_weight = (dn * xhat).sum(dim=(0, 2, 3))
    dxhat = (dn * w).reshape(B, groups, group_size)
    xhat_g = xhat.reshape(B, groups, group_size)
    grad_h = rstd * (dxhat - dxhat.mean(dim=2, keepdim=True) - xhat_g * (dxhat * xhat_g).mean(dim=2, keepdim=True))
    return (grad_h.reshape(B, C, H, W).to(h.dtype), grad_table.to(table.dtype), grad_weight.to(gn_weight.dtype),
            grad_bias.to(gn_bias.dtype))


def groupnorm_silu(h: torch.Tensor, gn_weight: torch.Tensor, gn_bias: torch.Tensor, groups: int,
                   eps: float = 1e-5) -> torch.Tensor:
    """SiLU(GroupNorm(h) * gn_weight + gn_bias): groupnorm_film without its FiLM, as torch computes it.

    h: (B, C, H, W); gn_weight, gn_bias: (C,). Differentiable in h, gn_weight and gn_bias.
    """
    _checks.groupnorm_silu_args(h, gn_weight, gn_bias, groups, eps)
    return _groupnorm_silu(h, gn_weight, gn_bias, groups, eps)[0]


def _groupnorm_silu(h, gn_weight, gn_bias, groups, eps):
    """groupnorm_silu on checked arguments -> (out, mean, rstd), the statistics as _groupnorm_film returns them."""
    dtype = _checks.compute_dtype(h.dtype)
    B, C, H, W = h.shape
    normed, mean, rstd = torch.native_group_norm(h.to(dtype).contiguous(), gn_weight.to(dtype), gn_bias.to(dtype),
                                                 B, C, H * W, groups, eps)
    return F.silu(normed).to(h.dtype), mean, rstd


def _groupnorm_silu_backward(grad_out, h, gn_weight, gn_bias, mean, rstd, groups):
    """Gradients of groupnorm_silu with respect to (h, gn_weight, gn_bias), by torch's own backward kernels:
    SiLU's at n = GroupNorm(h) * w + b (recomputed from the saved statistics), then GroupNorm's."""
    dtype = _checks.compute_dtype(h.dtype)
    B, C, H, W = h.shape
    x, w = h.to(dtype).contiguous(), gn_weight.to(dtype)
    mean, rstd = mean.to(dtype), rstd.to(dtype)
    xhat = (x.reshape(B, groups, C // groups * H * W) - mean.reshape(B, groups, 1)) * rstd.reshape(B, groups, 1)
    n = xhat.reshape(B, C, H, W) * w.view(1, C, 1, 1) + gn_bias.to(dtype).view(1, C, 1, 1)
    dn = torch.ops.aten.silu_backward(grad_out.to(dtype).contiguous(), n)
    grad_h, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
        dn, x, mean, rstd, w, B, C, H * W, groups, [True, True, True])
    return grad_h.to(h.dtype), grad_weight.to(gn_weight.dtype), grad_bias.to(gn_bias.dtype)
