"""The schedule lookups (DESIGN.md §1.2-1.3): svnr::gamma, svnr::time_from_variance, svnr::time_map.

Kernels: kernels/lookup.py (Triton, CUDA tensors), csrc/lookup_cpu.cpp (C++, CPU tensors; glue at the end of
this file). Reference: svnr_fast.reference (_gamma, _time_from_variance, _time_map). The raw ops take the table in the compute dtype of the data (float32,
or float64 for float64 data) and return time maps in that dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from . import _checks, _native, backends


def _time_like(x: Tensor, shape=None) -> Tensor:
    return x.new_empty(x.shape if shape is None else shape, dtype=_checks.compute_dtype(x.dtype))


def _in_compute_dtype(lookup):
    """The reference lookup on the data in its compute dtype, with the contiguous result the fake kernel declares."""
    def run(value: Tensor, table: Tensor) -> Tensor:
        return lookup(value.to(_checks.compute_dtype(value.dtype)), table).contiguous()
    return run


backends.define("gamma", "(Tensor tau, Tensor table) -> Tensor", fake=lambda tau, table: _time_like(tau),
                reference=_in_compute_dtype(reference._gamma), triton="svnr_fast.kernels.lookup:gamma",
                cpp="svnr_fast.ops.lookup:fused_gamma")
backends.define("time_from_variance", "(Tensor v, Tensor table) -> Tensor", fake=lambda v, table: _time_like(v),
                reference=_in_compute_dtype(reference._time_from_variance),
                triton="svnr_fast.kernels.lookup:time_from_variance", cpp="svnr_fast.ops.lookup:fused_time_from_variance")
backends.define("time_map", "(Tensor variance, Tensor table) -> Tensor",
                fake=lambda variance, table: _time_like(variance, (variance.shape[0], 1, *variance.shape[2:])),
                reference=_in_compute_dtype(reference._time_map), triton="svnr_fast.kernels.lookup:time_map",
                cpp="svnr_fast.ops.lookup:fused_time_map")


def lookup_table(table: Tensor, dtype: torch.dtype) -> Tensor:
    """The table in the compute dtype of data of `dtype`, as the raw ops take it."""
    return table.to(_checks.compute_dtype(dtype))


@_checks.one_read()
def _checked(name: str, value: Tensor, table: Tensor, ndim: int | None = None) -> Tensor:
    """Checks a lookup's input and table; returns the table in the input's compute dtype."""
    _checks.tensor(name, value, ndim=ndim)
    _checks.table(table, value.device)
    _checks.finite(name, value)
    return lookup_table(table, value.dtype)


def gamma(tau: Tensor, table: Tensor) -> Tensor:
    """gamma(tau): piecewise-linear interpolation of the variance table (any shape)."""
    return torch.ops.svnr.gamma(tau, _checked("tau", tau, table))


def time_from_variance(v: Tensor, table: Tensor) -> Tensor:
    """tau(v): the exact inverse of gamma (0 below table[0], T above table[-1]); any shape, so a per-channel
    variance map gives a per-channel time map."""
    return torch.ops.svnr.time_from_variance(v, _checked("v", v, table))


def time_map(variance: Tensor, table: Tensor) -> Tensor:
    """tau*(B, 1, H, W) = tau(max over channels of the variance map)."""
    return torch.ops.svnr.time_map(variance, _checked("variance", variance, table, ndim=4))


def topped_up(y: Tensor, variance: Tensor, table: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """(y', tau*) on checked arguments, the table in the compute dtype of y: the time map and gamma run on
    the ops' kernels. Loops that must not synchronise with the GPU call this directly."""
    variance = variance.to(table.dtype)
    tau_star = torch.ops.svnr.time_map(variance, table)
    missing = (torch.ops.svnr.gamma(tau_star, table) - variance).clamp_min(0)
    return (y.to(table.dtype) + missing.sqrt() * z.to(table.dtype)).to(y.dtype), tau_star


def top_up(y: Tensor, variance: Tensor, table: Tensor, *, z: Tensor | None = None, seed: int = 0,
           offset: int = 0) -> tuple[Tensor, Tensor]:
    """The working observation y' = y + sqrt(max(gamma(tau*) - V_c, 0)) z and its time map tau* (DESIGN.md §1.3):
    see svnr_fast.reference.top_up. z is drawn from (seed, offset) when not given."""
    table = _checks.top_up_args(y, variance, table, z, seed, offset)
    if z is None:
        z = torch.randn(y.shape, generator=reference.generator(y.device, seed, offset), device=y.device,
                        dtype=table.dtype)
    return topped_up(y, variance, table, z)


# ---------------------------------------------------------------------------------------------------
# Glue of the C++ kernels (raw signatures of the reference lookups; results contiguous in the compute dtype)
# ---------------------------------------------------------------------------------------------------

_GAMMA, _TIME_FROM_VARIANCE, _TIME_MAP = 0, 1, 2   # the extension's Lookup codes


def _fused(op: int, value: Tensor, table: Tensor, sizes: tuple, input_view, out: Tensor) -> Tensor:
    if out.numel():
        (view, _alive), (table_arg, _table) = input_view, _native.table_arg(table.to(out.dtype))
        _native.extension().lookup_cpu(op, sizes, _native.DTYPE_CODES[out.dtype], view, table_arg, out.data_ptr(),
                                       _native.threads())
    return out


def fused_gamma(tau: Tensor, table: Tensor) -> Tensor:
    out = _time_like(tau)
    return _fused(_GAMMA, tau, table, (1, 1, tau.numel()), _native.flat_view(tau), out)


def fused_time_from_variance(v: Tensor, table: Tensor) -> Tensor:
    out = _time_like(v)
    return _fused(_TIME_FROM_VARIANCE, v, table, (1, 1, v.numel()), _native.flat_view(v), out)


def fused_time_map(variance: Tensor, table: Tensor) -> Tensor:
    B, C, H, W = variance.shape
    out = _time_like(variance, (B, 1, H, W))
    return _fused(_TIME_MAP, variance, table, (B, C, H * W), _native.view(variance) if out.numel() else None, out)
