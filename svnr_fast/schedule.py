"""The variance-exploding schedule of SVNR (DESIGN.md §1.2) and the Poisson-Gaussian noise model (§1.1)."""
from __future__ import annotations

import torch

from .ops import _checks


class Schedule:
    """`T` steps, `beta_k` linear in [beta_start, beta_end], `g[k] = lam * (1 - abar_k)`, `g[0] = 0`.

    The table is computed in float64 and stored in float32; `gamma(tau)` interpolates it linearly and
    `time_from_variance(v)` is that interpolation's exact inverse (T above `g[T]`).
    """

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, lam: float = 5.0):
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive int, got {T!r}")
        _checks.scalar("beta_start", beta_start, low=0.0, high=1.0)
        _checks.scalar("beta_end", beta_end, low=0.0, high=1.0)
        _checks.scalar("lam", lam, low=0.0)
        if not 0 < beta_start <= beta_end < 1 or lam <= 0:
            raise ValueError("the schedule needs 0 < beta_start <= beta_end < 1 and lam > 0, got "
                             f"beta_start={beta_start}, beta_end={beta_end}, lam={lam}")
        self.T, self.beta_start, self.beta_end, self.lam = T, float(beta_start), float(beta_end), float(lam)
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        table64 = torch.cat([torch.zeros(1, dtype=torch.float64), lam * (1.0 - alphas_cumprod)])
        self.table64 = table64
        self.table = table64.to(torch.float32)
        steps = self.table[1:] - self.table[:-1]
        if not bool((steps > 0).all()):
            k = int(torch.nonzero(steps <= 0)[0]) + 1
            raise ValueError(f"this schedule saturates: in float32, g[{k}] = g[{k - 1}] = {self.table[k].item()}, "
                             "so its times cannot be told apart; use a smaller T or beta_end")

    def config(self) -> dict:
        return {"T": self.T, "beta_start": self.beta_start, "beta_end": self.beta_end, "lam": self.lam}

    def __repr__(self) -> str:
        return "Schedule(" + ", ".join(f"{k}={v}" for k, v in self.config().items()) + ")"

    def table_on(self, device) -> torch.Tensor:
        return self.table.to(device)

    def gamma(self, tau: torch.Tensor) -> torch.Tensor:
        from . import ops
        return ops.gamma(tau, self.table_on(tau.device))

    def time_from_variance(self, variance: torch.Tensor) -> torch.Tensor:
        from . import ops
        return ops.time_from_variance(variance, self.table_on(variance.device))


def poisson_gaussian_variance(x: torch.Tensor, sigma_r: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """sigma_r^2 + sigma_s^2 * max(x, 0) for x (B, ...) and per-image (B,) parameters, unchecked: loops that must
    not synchronise with the GPU call this; PoissonGaussian checks its parameters first."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return sigma_r.view(shape) ** 2 + sigma_s.view(shape) ** 2 * x.clamp_min(0)


def poisson_gaussian_sample(x: torch.Tensor, sigma_r: torch.Tensor, sigma_s: torch.Tensor,
                            eps: torch.Tensor) -> torch.Tensor:
    """y = x + sqrt(var(x)) * eps (DESIGN.md §1.1), unchecked, computed in the dtype of the parameters."""
    variance = poisson_gaussian_variance(x.to(sigma_r.dtype), sigma_r, sigma_s)
    return (x.to(variance.dtype) + variance.sqrt() * eps.to(variance.dtype)).to(x.dtype)


class PoissonGaussian:
    """`var(x) = sigma_r^2 + sigma_s^2 * max(x, 0)`; `y = x + sqrt(var(x)) * eps` (not clipped).

    `sigma_r` (read noise) and `sigma_s` (shot noise) are floats or per-image `(B,)` tensors.
    """

    def __init__(self, sigma_r, sigma_s):
        for name, value in (("sigma_r", sigma_r), ("sigma_s", sigma_s)):
            if isinstance(value, torch.Tensor):
                _checks.finite(name, value)
                if bool((value < 0).any()):
                    raise ValueError(f"{name} must be >= 0 (a noise standard deviation), got {value.min().item():g}")
            else:
                _checks.scalar(name, value, low=0.0)
        self.sigma_r, self.sigma_s = sigma_r, sigma_s

    def __repr__(self) -> str:
        return f"PoissonGaussian(sigma_r={self.sigma_r}, sigma_s={self.sigma_s})"

    def per_image(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma_r, sigma_s) as checked (B,) tensors in the compute dtype of x (B, ...)."""
        _checks.tensor("x", x)
        if x.dim() < 1:
            raise ValueError("x must have a batch dimension")
        B, dtype = x.shape[0], _checks.compute_dtype(x.dtype)
        return (_checks.per_image("sigma_r", self.sigma_r, B, x.device, dtype=dtype, low=0.0),
                _checks.per_image("sigma_s", self.sigma_s, B, x.device, dtype=dtype, low=0.0))

    def variance(self, x: torch.Tensor) -> torch.Tensor:
        sigma_r, sigma_s = self.per_image(x)
        return poisson_gaussian_variance(x.to(sigma_r.dtype), sigma_r, sigma_s)

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        sigma_r, sigma_s = self.per_image(x)
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=sigma_r.dtype)
        return poisson_gaussian_sample(x, sigma_r, sigma_s, eps)
