"""The one conditioning path of the application (DESIGN.md §1.3): a noisy photo y and its Poisson-Gaussian
noise -> the working observation y' and its time map tau*, on the ops (the time map runs in its kernel).

`svnr_fast.denoise`, `svnr eval` and training with observed time maps all build the network's input here:
- `observe(y, noise, table, seed)` for a photo: checked once, then the ops;
- `observed_input(x0, ...)` for a training batch: a synthetic observation of x0 and its y', tau*, unchecked
  (the training step must not synchronise with the GPU; it draws valid parameters itself).
The noise variance comes from the observation, V = sigma_r^2 + sigma_s^2 clip(y, 0, 1): the clean image is
unknown at inference, and training sees exactly what inference computes.
"""
from __future__ import annotations

from torch import Tensor

from .. import ops
from ..ops.lookup import lookup_table, topped_up
from ..schedule import (
    PoissonGaussian,
    poisson_gaussian_sample,
    poisson_gaussian_variance,
)

TOP_UP_OFFSET = 2**40     # the top-up's noise stream, far from the sampler's step offsets 0..N-1


def observe(y: Tensor, noise: PoissonGaussian, table: Tensor, *, seed: int) -> tuple[Tensor, Tensor]:
    """(y', tau*) of the photos y (B, C, H, W) with noise `noise`; the top-up noise comes from `seed`."""
    return ops.top_up(y, noise.variance(y.clamp(0, 1)), table, seed=seed, offset=TOP_UP_OFFSET)


def observed_input(x0: Tensor, sigma_r: Tensor, sigma_s: Tensor, table: Tensor, noise: Tensor,
                   top_up: Tensor) -> tuple[Tensor, Tensor]:
    """(y', tau*) as inference builds them from the observation y = x0 + sqrt(V(x0)) noise of a clean batch,
    with (B,) parameters and the top-up noise `top_up`."""
    y = poisson_gaussian_sample(x0, sigma_r, sigma_s, noise)
    variance = poisson_gaussian_variance(y.clamp(0, 1), sigma_r, sigma_s)
    return topped_up(y, variance, lookup_table(table, y.dtype), top_up)
