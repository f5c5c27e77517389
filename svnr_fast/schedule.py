"""The variance-exploding schedule of SVNR (DESIGN.md §1.2) and the Poisson-Gaussian noise model (§1.1)."""
from __future__ import annotations

import torch

from .ops import _checks


class Schedule:
    """The variance table `g[0..T]` of SVNR's variance-exploding process and its lookups.

    `Schedule(T, beta_start, beta_end, lam)`: `T` steps, `beta_k` linear in [beta_start, beta_end],
    `g[k] = lam * (1 - abar_k)`, `g[0] = 0`. Other codebases' schedules come from what they store:
    `Schedule.from_betas`, `Schedule.from_alphas_cumprod`, `Schedule.from_table`.
    The table is computed in float64 (`table64`) and stored in float32 (`table`); `gamma(tau)`
    interpolates it linearly and `time_from_variance(v)` is that interpolation's exact inverse (T above `g[T]`).

    Index time: a codebase that stores T values, one per integer time index k = 0..T-1, without the zero
    entry of the clean image (a DDPM-style `alphas_cumprod[k]`, or a table `lam (1 - abar)` of T entries),
    has its index k at svnr time k + 1: `index_offset` is 1. A table given with its leading zero is indexed
    as svnr time itself (`index_offset` 0). `time_from_index` and `index_from_time` convert.
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
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        self._set_table(_table_from_alphas_cumprod(torch.cumprod(1.0 - betas, dim=0), lam), index_offset=1)
        self.beta_start, self.beta_end, self.lam = float(beta_start), float(beta_end), float(lam)
        self._config = {"T": T, "beta_start": self.beta_start, "beta_end": self.beta_end, "lam": self.lam}

    def _set_table(self, table64: torch.Tensor, index_offset: int) -> None:
        self.table64 = table64
        self.table = table64.to(torch.float32)
        self.T = table64.numel() - 1
        self.index_offset = index_offset
        steps = self.table[1:] - self.table[:-1]
        if not bool((steps > 0).all()):
            k = int(torch.nonzero(steps <= 0)[0]) + 1
            raise ValueError(f"this schedule saturates: in float32, g[{k}] = g[{k - 1}] = {self.table[k].item()}, "
                             "so its times cannot be told apart; use a smaller T or beta_end")

    @classmethod
    def _from_table64(cls, table64: torch.Tensor, index_offset: int, lam: float | None) -> "Schedule":
        schedule = cls.__new__(cls)
        schedule._set_table(table64, index_offset)
        schedule.beta_start = schedule.beta_end = None
        schedule.lam = lam
        schedule._config = {"table": table64.tolist(), "index_offset": index_offset}
        return schedule

    @classmethod
    def from_betas(cls, betas, lam: float = 5.0) -> "Schedule":
        """`g[k] = lam * (1 - prod_{i<=k} (1 - betas[i-1]))` for the T given betas, `g[0] = 0`; index k is
        svnr time k + 1. Linear betas (`torch.linspace(beta_start, beta_end, T, dtype=torch.float64)`) give
        exactly the table of `Schedule(T, beta_start, beta_end, lam)`."""
        lam = _lam(lam)
        betas = _vector("betas", betas)
        if bool(((betas <= 0) | (betas >= 1)).any()):
            bad = betas[(betas <= 0) | (betas >= 1)][0].item()
            raise ValueError(f"betas must lie in (0, 1) (a zero beta repeats a variance, so its times cannot be "
                             f"told apart), got {bad:g}")
        return cls._from_table64(_table_from_alphas_cumprod(torch.cumprod(1.0 - betas, dim=0), lam), 1, lam)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, lam: float = 5.0) -> "Schedule":
        """`g = lam * (1 - alphas_cumprod)`. Without an entry 1 in front (the DDPM layout, `alphas_cumprod[k]`
        at index k) the zero is prepended and index k is svnr time k + 1; with it, index k is svnr time k."""
        lam = _lam(lam)
        alphas_cumprod = _vector("alphas_cumprod", alphas_cumprod)
        if bool(((alphas_cumprod <= 0) | (alphas_cumprod > 1)).any()):
            bad = alphas_cumprod[(alphas_cumprod <= 0) | (alphas_cumprod > 1)][0].item()
            raise ValueError(f"alphas_cumprod must lie in (0, 1], got {bad:g}")
        _strictly_monotone("alphas_cumprod", -alphas_cumprod, "decreasing")
        if alphas_cumprod[0] == 1:
            return cls._from_table64(lam * (1.0 - alphas_cumprod), 0, lam)
        return cls._from_table64(_table_from_alphas_cumprod(alphas_cumprod, lam), 1, lam)

    @classmethod
    def from_table(cls, table, *, index_offset: int | None = None) -> "Schedule":
        """A variance table as another codebase stores it: strictly increasing, >= 0.

        With its leading zero (`table[0] == 0`) it is used as is and index k is svnr time k. Without it
        (`table[0] > 0`, e.g. `lam * (1 - alphas_cumprod)` with T entries) a zero is prepended, so that svnr
        time 0 is the clean image, and the codebase's index k is svnr time k + 1. `index_offset` overrides
        that index-to-time shift (the table itself is unaffected).
        """
        table = _vector("table", table)
        if bool((table < 0).any()):
            raise ValueError(f"table must be >= 0 (variances), got {table[table < 0][0].item():g}")
        _strictly_monotone("table", table, "increasing")
        has_zero = bool(table[0] == 0)
        if has_zero and table.numel() < 2:
            raise ValueError("table must have at least one entry besides its leading zero")
        table64 = table if has_zero else torch.cat([torch.zeros(1, dtype=torch.float64), table])
        if index_offset is None:
            index_offset = 0 if has_zero else 1
        if isinstance(index_offset, bool) or not isinstance(index_offset, int) or index_offset < 0:
            raise ValueError(f"index_offset must be an int >= 0, got {index_offset!r}")
        return cls._from_table64(table64, index_offset, None)

    @classmethod
    def from_config(cls, config: dict) -> "Schedule":
        """The inverse of `config()`."""
        if "table" in config:
            return cls.from_table(config["table"], index_offset=config.get("index_offset"))
        return cls(**config)

    def config(self) -> dict:
        """A JSON-serialisable description: the linear parameters, or the whole table of a table-built schedule."""
        return dict(self._config)

    def __repr__(self) -> str:
        if "table" in self._config:
            return (f"Schedule.from_table(<{self.T + 1} entries: g[1]={self.table64[1].item():.6g}, "
                    f"g[{self.T}]={self.table64[-1].item():.6g}>, index_offset={self.index_offset})")
        return "Schedule(" + ", ".join(f"{k}={v}" for k, v in self._config.items()) + ")"

    def table_on(self, device) -> torch.Tensor:
        return self.table.to(device)

    def gamma(self, tau: torch.Tensor) -> torch.Tensor:
        from . import ops
        return ops.gamma(tau, self.table_on(tau.device))

    def time_from_variance(self, variance: torch.Tensor) -> torch.Tensor:
        from . import ops
        return ops.time_from_variance(variance, self.table_on(variance.device))

    # -- index time: the integer (or fractional) time index of codebases that store T entries -----------
    def time_from_index(self, index) -> torch.Tensor:
        """svnr's continuous time of a codebase's time index: `index + index_offset` (float32; float64 for
        float64 input)."""
        index = torch.as_tensor(index)
        dtype = torch.float64 if index.dtype == torch.float64 else torch.float32
        return index.to(dtype) + self.index_offset

    def index_from_time(self, tau, rounding: str | None = "floor") -> torch.Tensor:
        """A codebase's time index of svnr time tau: `tau - index_offset`, clamped to its indices
        `[0, T - index_offset]`.

        rounding: "floor" (the index whose variance a pixel has at least: what an integer-index sampler
        uses), "round" (nearest; halves to even) or "ceil", giving int64; None keeps the continuous index
        (the inverse lookup of a codebase that interpolates its own table: times below its first entry are 0).
        """
        tau = torch.as_tensor(tau)
        if not tau.is_floating_point():
            tau = tau.to(torch.float32)
        shifted = tau - self.index_offset
        last = self.T - self.index_offset
        if rounding is None:
            return shifted.clamp(0, last)
        round_ = {"floor": torch.floor, "round": torch.round, "ceil": torch.ceil}.get(rounding)
        if round_ is None:
            raise ValueError(f"rounding must be 'floor', 'round', 'ceil' or None (continuous), got {rounding!r}")
        return round_(shifted).clamp(0, last).long()


def _table_from_alphas_cumprod(alphas_cumprod: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.float64), lam * (1.0 - alphas_cumprod)])


def _lam(lam) -> float:
    lam = _checks.scalar("lam", lam, low=0.0)
    if lam <= 0:
        raise ValueError(f"lam must be > 0 (it scales the variance table), got {lam}")
    return lam


def _vector(name: str, values) -> torch.Tensor:
    """A schedule given as a list, numpy array or tensor: 1-D, finite, non-empty, as float64 on the CPU."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    try:
        values = torch.as_tensor(values, dtype=torch.float64).clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a 1-D sequence of numbers (list, numpy array or tensor): {err}") from None
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"{name} must be 1-D with one value per time step, got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return values


def _strictly_monotone(name: str, values: torch.Tensor, direction: str) -> None:
    """values (negated for 'decreasing') must be strictly increasing."""
    bad = torch.nonzero(values[1:] <= values[:-1])
    if bad.numel():
        k = int(bad[0]) + 1
        sign = -1 if direction == "decreasing" else 1
        raise ValueError(f"{name} must be strictly {direction}; {name}[{k}] = {sign * values[k].item():g} "
                         f"{'>=' if sign < 0 else '<='} {name}[{k - 1}] = {sign * values[k - 1].item():g}")


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
