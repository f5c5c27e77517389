"""Triton kernels of the schedule lookups (DESIGN.md §1.2-1.3): gamma, time_from_variance, time_map.

Same signatures and results as svnr_fast.reference._gamma / _time_from_variance / _time_map (checked
arguments: the table is already in the compute dtype of the data). Results are float32, or float64 for
float64 input. Both directions are O(1) per value: gamma reads one 64-bit record of the prepared
schedule, its inverse four (kernels/_triton_common.py), all from L1.

Bytes per element (gamma and time_from_variance read the data and write float32; time_map writes one
float32 per pixel) and the static roofline on 16x3x512x512 elements (`python benchmarks/roofline.py`:
sm_90 SASS, instructions executed per thread per element; H200 model, 132 SMs x 4 schedulers x 1.98 GHz
issue, 4,248 GB/s):

    kernel               dtype   B/elem  instr/elem  issue us  DRAM us  issue/DRAM  regs  spills
    gamma                fp32    8.00    14.8         5.6      23.7     0.23        22    0
                         bf16    6.00    16.3         6.1      17.8     0.34        22    0
    time_from_variance   fp32    8.00    37.3        14.0      23.7     0.59        32    0
                         bf16    6.00    38.8        14.6      17.8     0.82        32    0
    time_map             fp32    5.33    14.3         5.4      15.8     0.34        32    0
                         bf16    3.33    14.3         5.4       9.9     0.55        32    0
"""
import functools

import torch
import triton
import triton.language as tl

from ._triton_common import (BLOCK, TL_DTYPE, compute_dtype, gamma_lookup, grid, load,
                             plane_layout, plane_offsets, prepared_schedule, run, tile, time_lookup, wide_offsets)


@triton.jit
def _flat_tile(BLOCK: tl.constexpr, WIDE: tl.constexpr):
    start = tl.program_id(0)
    if WIDE:
        start = start.to(tl.int64)
    return start * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _gamma_kernel(tau_ptr, out_ptr, sched_ptr, n, T: tl.constexpr, COMPUTE: tl.constexpr, WIDE: tl.constexpr,
                  EVEN: tl.constexpr, BLOCK: tl.constexpr):
    i = _flat_tile(BLOCK, WIDE)
    mask = None if EVEN else i < n
    tl.store(out_ptr + i, gamma_lookup(load(tau_ptr + i, mask, COMPUTE), sched_ptr, T), mask=mask)


@triton.jit
def _time_from_variance_kernel(v_ptr, out_ptr, sched_ptr, n, T: tl.constexpr, COMPUTE: tl.constexpr,
                               WIDE: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr):
    i = _flat_tile(BLOCK, WIDE)
    mask = None if EVEN else i < n
    tl.store(out_ptr + i, time_lookup(load(v_ptr + i, mask, COMPUTE), sched_ptr, T)[0], mask=mask)


@triton.jit
def _time_map_kernel(v_ptr, out_ptr, sched_ptr, HW, W, v_sb, v_sc, v_sh, v_sw, C: tl.constexpr, T: tl.constexpr,
                     COMPUTE: tl.constexpr, LAYOUT: tl.constexpr, WIDE: tl.constexpr, EVEN: tl.constexpr,
                     BLOCK: tl.constexpr):
    b, start, hw = tile(BLOCK, WIDE)
    mask = None if EVEN else hw < HW
    v_ptr += b * v_sb + plane_offsets(hw, W, v_sh, v_sw, LAYOUT)
    v_max = load(v_ptr, mask, COMPUTE)
    for c in tl.static_range(1, C):
        v_max = tl.maximum(v_max, load(v_ptr + c * v_sc, mask, COMPUTE))
    tl.store(out_ptr + b * HW + hw, time_lookup(v_max, sched_ptr, T)[0], mask=mask)


def _flat(values: torch.Tensor, table: torch.Tensor, kernel):
    """Run an elementwise lookup kernel over `values` (any shape; non-contiguous input is copied first)."""
    out = torch.empty_like(values, dtype=compute_dtype(values.dtype), memory_format=torch.contiguous_format)
    n = values.numel()
    if n:
        run(kernel, (-(-n // BLOCK),), values, values.reshape(-1), out, prepared_schedule(table), n,
            T=table.numel() - 1, COMPUTE=TL_DTYPE[out.dtype], WIDE=n >= 2**31, EVEN=n % BLOCK == 0, BLOCK=BLOCK)
    return out


def gamma(tau: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return _flat(tau, table, _gamma_kernel)


def time_from_variance(v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return _flat(v, table, _time_from_variance_kernel)


@functools.lru_cache(maxsize=64)
def _time_map_plan(shape, strides, dtype, T):
    B, C, H, W = shape
    return grid(H * W, B), dict(C=C, T=T, COMPUTE=TL_DTYPE[dtype], LAYOUT=plane_layout(shape, strides),
                                WIDE=wide_offsets(shape, strides), EVEN=H * W % BLOCK == 0, BLOCK=BLOCK)


def time_map(variance: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    B, C, H, W = variance.shape
    out = variance.new_empty((B, 1, H, W), dtype=compute_dtype(variance.dtype))
    if out.numel():
        grid_, constants = _time_map_plan(variance.shape, variance.stride(), out.dtype, table.numel() - 1)
        run(_time_map_kernel, grid_, variance, variance, out, prepared_schedule(table), H * W, W, *variance.stride(),
            **constants)
    return out
