"""Estimates Poisson-Gaussian noise parameters (sigma_r, sigma_s) from a single noisy photo.

Method (in the spirit of Foi et al., "Practical Poissonian-Gaussian noise modeling and fitting", 2008):
the finest Haar diagonal detail HH = (a - b - c + d) / 2 of every 2x2 block is, for i.i.d. noise, a
zero-mean normal with the noise variance of the block; it cancels the block's mean and gradients. The HH
coefficients are grouped in windows of 4x4 (8x8 pixels); each window's mean square is a scaled chi-square
with 16 degrees of freedom. Windows are binned by intensity, and in each bin a low quantile of the window
variances, divided by the same quantile of chi2_16 / 16, estimates the noise variance: windows on edges
and texture sit above it, flat windows at it. `var = sigma_r^2 + sigma_s^2 * x` is then fitted to the bins
by weighted least squares with non-negative coefficients. Windows that touch exactly 0 or 1 (clipped
pixels) are left out.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..ops import _checks
from ..schedule import PoissonGaussian

WINDOW = 4            # HH coefficients per window side: 16 degrees of freedom per window variance
QUANTILE = 0.2


class NoiseEstimate(NamedTuple):
    sigma_r: float
    sigma_s: float
    windows_used: int

    def __str__(self) -> str:
        return f"sigma_r={self.sigma_r:.4f}, sigma_s={self.sigma_s:.4f} (from {self.windows_used} windows)"


def _chi2_quantile_over_dof(q: float, dof: int) -> float:
    """The q-quantile of chi2_dof / dof (Wilson-Hilferty, accurate to ~1e-3 at 16 degrees of freedom)."""
    z = math.sqrt(2.0) * torch.special.erfinv(torch.tensor(2 * q - 1, dtype=torch.float64)).item()
    return (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _bin_variances(y: torch.Tensor, bins: int, min_windows: int):
    side = 2 * WINDOW
    H, W = y.shape[-2] // side * side, y.shape[-1] // side * side
    y = y[..., :H, :W].to(torch.float64)
    a, b = y[..., 0::2, 0::2], y[..., 0::2, 1::2]
    c, d = y[..., 1::2, 0::2], y[..., 1::2, 1::2]
    C, h, w = a.shape

    def per_window(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(C, h // WINDOW, WINDOW, w // WINDOW, WINDOW)

    variance = per_window(((a - b - c + d) / 2) ** 2).mean(dim=(2, 4)).reshape(-1)
    level = per_window((a + b + c + d) / 4).mean(dim=(2, 4)).reshape(-1)
    clipped = torch.zeros_like(y, dtype=torch.bool)
    if y.min() >= 0 and y.max() <= 1:
        clipped = (y <= 0) | (y >= 1)
    touched = clipped.reshape(C, h // WINDOW, side, w // WINDOW, side).any(dim=4).any(dim=2)
    keep = ~touched.reshape(-1)
    variance, level = variance[keep], level[keep]
    if variance.numel() == 0:
        return None
    edges = torch.linspace(float(level.min()), float(level.max()) + 1e-9, bins + 1, dtype=torch.float64)
    which = torch.bucketize(level, edges[1:-1])
    scale = _chi2_quantile_over_dof(QUANTILE, WINDOW * WINDOW)
    means, variances, counts = [], [], []
    for k in range(bins):
        members = which == k
        n = int(members.sum())
        if n < min_windows:
            continue
        means.append(level[members].mean())
        variances.append(torch.quantile(variance[members], QUANTILE) / scale)
        counts.append(n)
    if not counts:
        return None
    return torch.stack(means), torch.stack(variances), torch.tensor(counts, dtype=torch.float64), int(keep.sum())


def _fit_non_negative(x: torch.Tensor, v: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
    """Weighted least squares of v = a + b x with a, b >= 0."""
    sw, sx, sv = weight.sum(), (weight * x).sum(), (weight * v).sum()
    sxx, sxv = (weight * x * x).sum(), (weight * x * v).sum()
    det = sw * sxx - sx * sx
    if det > 0:
        a = (sxx * sv - sx * sxv) / det
        b = (sw * sxv - sx * sv) / det
        if a >= 0 and b >= 0:
            return float(a), float(b)
    candidates = [(float(sv / sw), 0.0)]                      # b = 0: constant variance
    if sxx > 0:
        candidates.append((0.0, max(float(sxv / sxx), 0.0)))  # a = 0: pure shot noise
    return min(candidates, key=lambda ab: float((weight * (v - ab[0] - ab[1] * x) ** 2).sum()))


def estimate_noise(y: torch.Tensor, bins: int = 16, min_windows: int = 16) -> NoiseEstimate:
    """(sigma_r, sigma_s) of one noisy image y, (C, H, W) or (1, C, H, W), values in [0, 1] plus noise."""
    _checks.tensor("y", y)
    if y.dim() == 4:
        if y.shape[0] != 1:
            raise ValueError(f"estimate_noise takes one image; got a batch of {y.shape[0]}: call it per image")
        y = y[0]
    if y.dim() != 3 or y.shape[-1] < 2 * WINDOW or y.shape[-2] < 2 * WINDOW:
        raise ValueError(f"y must be an image (C, H, W) of at least {2 * WINDOW}x{2 * WINDOW} pixels, "
                         f"got shape {tuple(y.shape)}")
    _checks.finite("y", y)
    binned = _bin_variances(y, bins, min_windows)
    if binned is None:
        raise ValueError(f"the image is too small or too clipped to estimate its noise (fewer than {min_windows} "
                         "unclipped 8x8 windows in every intensity bin); pass sigma_r and sigma_s explicitly")
    level, variance, count, used = binned
    # the variance of a variance estimate from n samples is ~2 v^2 / n: weight each bin by n / v^2
    weight = count / variance.clamp_min(1e-12) ** 2
    a, b = _fit_non_negative(level, variance, weight)
    return NoiseEstimate(a ** 0.5, b ** 0.5, used)


def estimate_noise_robust(y: torch.Tensor) -> NoiseEstimate:
    """estimate_noise, falling back to 2 intensity bins of at least 8 windows for photos too small or too clipped
    for the default 16 bins (ValueError, saying what to do, when even that fails)."""
    try:
        return estimate_noise(y)
    except ValueError:
        return estimate_noise(y, bins=2, min_windows=8)


def estimate_noise_model(y: torch.Tensor) -> PoissonGaussian:
    """The noise of every image of y (B, C, H, W), estimated per image (estimate_noise_robust)."""
    estimates = [estimate_noise_robust(image) for image in y]
    return PoissonGaussian(torch.tensor([e.sigma_r for e in estimates], device=y.device),
                           torch.tensor([e.sigma_s for e in estimates], device=y.device))
