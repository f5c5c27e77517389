"""Triton kernels of the schedule lookups (DESIGN.md §1.2-1.3): gamma, time_from_variance, time_map.

Same signatures and results as svnr_fast.reference._gamma / _time_from_variance / _time_map (checked
arguments: the table is already in the compute dtype of the data). Results are float32, or float64 for
float64 input.

Bytes per element (float32): gamma and time_from_variance read 4 and write 4, 8 B in all; time_map reads
4 per element and writes 4 per pixel, 4 + 4/C B per element. Roofline for a 16x3x512x512 input
(12.6 M elements; H100 ~3.0 TB/s, H200 ~4.3 TB/s measured copy bandwidth): gamma 101 MB -> 34 us (H100)
/ 23 us (H200); time_map 67 MB -> 22 us / 16 us. The lookups read the table (a few KB) from L1.
"""
import torch
import triton
import triton.language as tl

from ._triton_common import (BLOCK, TL_DTYPE, channel_max, compute_dtype, dense_plane, gamma_lookup, image_strides,
                             plane_offsets, run, table_args, tiles, time_lookup)


@triton.jit
def _gamma_kernel(tau_ptr, out_ptr, table_ptr, n, T, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    tau = tl.load(tau_ptr + i, mask=mask, other=0).to(COMPUTE)
    tl.store(out_ptr + i, gamma_lookup(tau, table_ptr, T), mask=mask)


@triton.jit
def _time_from_variance_kernel(v_ptr, out_ptr, table_ptr, n, T, search_top, n_search, COMPUTE: tl.constexpr,
                               BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    v = tl.load(v_ptr + i, mask=mask, other=0).to(COMPUTE)
    tl.store(out_ptr + i, time_lookup(v, table_ptr, T, search_top, n_search), mask=mask)


@triton.jit
def _time_map_kernel(v_ptr, out_ptr, table_ptr, C, HW, W, n_tiles, v_sb, v_sc, v_sh, v_sw, T, search_top, n_search,
                     COMPUTE: tl.constexpr, DENSE_PLANE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_tiles).to(tl.int64)
    hw = (pid % n_tiles) * BLOCK + tl.arange(0, BLOCK)
    mask = hw < HW
    v_max = channel_max(v_ptr, b * v_sb, v_sc, plane_offsets(hw, W, v_sh, v_sw, DENSE_PLANE), mask, C, COMPUTE)
    v_max = tl.where(mask, v_max, 0)
    tl.store(out_ptr + b * HW + hw, time_lookup(v_max, table_ptr, T, search_top, n_search), mask=mask)


def _flat(values: torch.Tensor, table: torch.Tensor, kernel, *lookup_args):
    """Run an elementwise lookup kernel over `values` (any shape; non-contiguous input is copied first)."""
    out = torch.empty_like(values, dtype=compute_dtype(values.dtype), memory_format=torch.contiguous_format)
    n = values.numel()
    if n:
        run(kernel, (tiles(n),), values, values.reshape(-1), out, table, n, *lookup_args,
            COMPUTE=TL_DTYPE[out.dtype], BLOCK=BLOCK)
    return out


def gamma(tau: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return _flat(tau, table, _gamma_kernel, table.numel() - 1)


def time_from_variance(v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return _flat(v, table, _time_from_variance_kernel, *table_args(table))


def time_map(variance: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    B, C, H, W = variance.shape
    out = variance.new_empty((B, 1, H, W), dtype=compute_dtype(variance.dtype))
    if out.numel():
        n_tiles = tiles(H * W)
        run(_time_map_kernel, (B * n_tiles,), variance, variance, out, table, C, H * W, W, n_tiles,
            *image_strides(variance), *table_args(table), COMPUTE=TL_DTYPE[out.dtype],
            DENSE_PLANE=dense_plane(variance), BLOCK=BLOCK)
    return out
