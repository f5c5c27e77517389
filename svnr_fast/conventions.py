"""Other SVNR codebases' conventions, as small functions around `svnr_fast.ops` (DESIGN.md §1.7).

Each convention is either an option of the ops or a function here; all of them compute svnr's math
(DESIGN.md §1) in another codebase's coordinates, so a codebase keeps its data, tables and models and
swaps its hot paths for the fused ops.

Schedules and index time
    `Schedule.from_betas`, `Schedule.from_alphas_cumprod` and `Schedule.from_table` take what a codebase
    stores. A codebase with T entries and no zero entry (`lam * (1 - alphas_cumprod)`) indexes them
    k = 0..T-1; svnr prepends the zero of the clean image, so index k is svnr time k + 1
    (`schedule.index_offset`). `schedule.time_from_index(k)` and `schedule.index_from_time(tau, rounding)`
    convert; `index_from_time(time_from_variance(v), rounding=None)` is the codebase's own inverse lookup
    (times below its first entry are index 0).

Data in [-1, 1] with the noise model in [0, 1]
    `to_unit` / `from_unit` map data in `data_range = (low, high)` to [0, 1] and back. The noise is
    applied in [0, 1], so in data units every variance is `(high - low)^2` times larger:
    `table_in_data_units(table, data_range)`. The network's epsilon is the unit-variance noise in either
    range: `x_t = x0 + (high - low) * sqrt(gamma(tau)) * eps` in data units. `training_sample` and
    `reverse_step` below take and return data in `data_range`.

Per-channel time maps, one t0 per batch, a floor on the noise std
    Options of the ops: `ops.training_sample(..., per_channel=True)` gives every channel its own time map
    `tau*_c = tau(V_c)` (tau comes back (B, C, H, W)); `t0_per="batch"` steps every image back by the same
    `t0 = u * max tau*` of the whole batch (u is one value); `min_std=s` floors the noise std that sets
    tau*: `V = max(V, s^2)` (s in [0, 1] units). `ops.reverse_step` and the lookups take (B, C, H, W) time
    maps beside (B, 1, H, W).

Integer-index ancestral steps
    `index_time_plan` snaps a time map down to the integer grid and `sample_index_time` runs ancestral
    steps of delta = 1 from there: every pixel moves one index per step, and the step out of index 0
    (svnr time 1 when index_offset is 1) returns x0_hat, as DDPM's last step does. (A loop that returns
    x0_hat already from index 1 skips that last level: its result differs by that one step.) The
    continuous few-step plan (`svnr_fast.sampling.sample`, N equal per-image steps) is the alternative.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import ops
from .ops import _checks
from .reference import TrainingSample
from .sampling import sample


def check_data_range(data_range) -> tuple[float, float]:
    """`data_range` as a pair of floats (low, high), low < high, e.g. (-1, 1)."""
    return _checks.ordered_pair("data_range", data_range)


def to_unit(x: Tensor, data_range) -> Tensor:
    """Data in `data_range` -> [0, 1], where the noise model applies."""
    low, high = check_data_range(data_range)
    return (x - low) / (high - low)


def from_unit(x: Tensor, data_range) -> Tensor:
    """[0, 1] -> data in `data_range`."""
    low, high = check_data_range(data_range)
    return low + (high - low) * x


def table_in_data_units(table: Tensor, data_range) -> Tensor:
    """The variance table of data in `data_range` whose noise is applied in [0, 1]: `(high - low)^2 * table`
    (exact for (-1, 1): a power of two)."""
    low, high = check_data_range(data_range)
    return table * (high - low) ** 2


def training_sample(x0: Tensor, sigma_r, sigma_s, u, table: Tensor, *, data_range, **options) -> TrainingSample:
    """`ops.training_sample` for clean data x0 in `data_range`, the noise model applied in [0, 1].

    y' and x_t come back in `data_range`; tau and the target (the unit-variance epsilon) are the same in
    both ranges. `options` are those of `ops.training_sample` (per_channel, t0_per, min_std in [0, 1]
    units, correlated, noise tensors or seed/offset).
    """
    sample = ops.training_sample(to_unit(x0, data_range), sigma_r, sigma_s, u, table, **options)
    return TrainingSample(from_unit(sample.y, data_range), from_unit(sample.x_t, data_range), sample.tau,
                          sample.target)


def reverse_step(x: Tensor, eps_hat: Tensor, tau: Tensor, delta, table: Tensor, *, data_range, **options):
    """`ops.reverse_step` for x in `data_range`: the step of `to_unit(x)`, mapped back, at no extra cost.

    The step is affine in x, so it runs in data units on `table_in_data_units(table, data_range)`;
    `clamp` (in `options`) is given in data units. Returns what `ops.reverse_step` returns.
    """
    return ops.reverse_step(x, eps_hat, tau, delta, table_in_data_units(table, data_range), **options)


class IndexPlan(NamedTuple):
    tau: Tensor   # the time map on the integer grid: svnr times 1, 2, ... (0 where a pixel is clean)
    steps: int    # ancestral steps of delta = 1 that bring every pixel of the batch to time 0


_ROUNDING = {"floor": torch.floor, "round": torch.round, "ceil": torch.ceil}


def index_time_plan(tau_star: Tensor, rounding: str = "floor") -> IndexPlan:
    """Snaps a time map to the integer grid for ancestral steps of delta = 1.

    rounding "floor" (an integer-index loop's `t.floor()`: a pixel is denoised from the index whose
    variance it has at least), "round" or "ceil"; a pixel with any noise (tau > 0) starts at time >= 1,
    a clean one (tau = 0) stays at 0. The integer svnr times are the codebase's integer indices shifted by
    its (integer) index offset, so the plan does not depend on it. One host sync (the step count).
    """
    _checks.tensor("tau_star", tau_star, ndim=4, dtypes=(torch.float32, torch.float64))
    round_ = _ROUNDING.get(rounding)
    if round_ is None:
        raise ValueError(f"rounding must be 'floor', 'round' or 'ceil', got {rounding!r}")
    tau = torch.where(tau_star > 0, round_(tau_star).clamp_min(1), torch.zeros_like(tau_star))
    return IndexPlan(tau, max(1, int(tau.max())))


def sample_index_time(denoiser, condition: Tensor, x: Tensor, tau_star: Tensor, table: Tensor, *,
                      rounding: str = "floor", **options) -> Tensor:
    """Integer-index ancestral sampling: `index_time_plan`, then delta = 1 steps until every pixel is at 0.

    `denoiser(condition, x, tau)` receives svnr times (integers here); a model trained on a codebase's index
    time takes `schedule.index_from_time(tau, rounding=None)`. `options` are those of
    `svnr_fast.sampling.sample` (eta, clamp, seed, callback, cuda_graph); the default eta = 1 is the
    ancestral (posterior) step.
    """
    plan = index_time_plan(tau_star, rounding)
    # every image plans its steps from the batch's largest time, so every delta is exactly steps / steps = 1
    tau_max = torch.full((x.shape[0],), float(plan.steps), dtype=plan.tau.dtype, device=plan.tau.device)
    return sample(denoiser, condition, x, plan.tau, table, steps=plan.steps, tau_max=tau_max, **options)
