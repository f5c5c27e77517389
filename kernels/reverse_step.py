"""Triton kernel of the SVNR reverse step (DESIGN.md §1.5), one launch, one pass over the data.

Same signature and results as svnr_fast.reference._reverse_step. One program handles a tile of pixels of
one image: it reads tau once per pixel, does both table lookups (gamma(tau), gamma(s)) once per pixel,
writes s, and walks the channels in groups of four; when z is not given each channel draws it in the
kernel, one Philox call per four pixels (eta = 0 needs no z at all and neither reads nor draws it).

Bytes per element, float32, C = 3, z drawn in the kernel: x 4 + eps_hat 4 + tau 4/3 read, x_new 4 +
s 4/3 written = 14.67 B (+4 with a z tensor, +4 with return_x0_hat; bfloat16 data: 8.67 B).
Roofline at 16x3x512x512 (12.6 M elements): float32 184.5 MB -> 61.5 us on an H100 (~3.0 TB/s measured
copy bandwidth), 42.9 us on an H200 (~4.3 TB/s); bfloat16 109.1 MB -> 36.4 us / 25.4 us.
"""
import functools

import torch
import triton
import triton.language as tl

from ._triton_common import (BLOCK, TL_DTYPE, compute_dtype, dense_strides, div_rn, gamma_lookup, load_channel, normals,
                             plane_offsets, run, split_offset, sqrt_rn, store, tiles)


@triton.jit
def _load_channel(c, x_ptr, eps_ptr, z_ptr, b, mask, C, x_plane, e_plane, z_plane, x_sb, x_sc, e_sb, e_sc, z_sb, z_sc,
                  COMPUTE: tl.constexpr, Z_TENSOR: tl.constexpr):
    """x, eps_hat and z (when given) of channel c of one tile."""
    x = load_channel(x_ptr, b * x_sb, x_sc, x_plane, mask, c, C, 0, COMPUTE)
    eps = load_channel(eps_ptr, b * e_sb, e_sc, e_plane, mask, c, C, 0, COMPUTE)
    z = x   # placeholder, not read
    if Z_TENSOR:
        z = load_channel(z_ptr, b * z_sb, z_sc, z_plane, mask, c, C, 0, COMPUTE)
    return x, eps, z


@triton.jit
def _step_channel(c, x, eps, z, x_new_ptr, x0_hat_ptr, b, tile_start, hw, mask, C, HW, sqrt_gt, eps_scale, z_scale,
                  finished, clamp_min, clamp_max, seed, offset_lo, offset_hi, COMPUTE: tl.constexpr,
                  Z_TENSOR: tl.constexpr, Z_DRAWN: tl.constexpr, CLAMP: tl.constexpr, WRITE_X0_HAT: tl.constexpr,
                  BLOCK: tl.constexpr):
    """x_new (and x0_hat) of channel c of one tile; z is this channel's z when Z_TENSOR."""
    if c < C:
        channel = tl.cast(c, tl.int64)
        x0_hat = x - sqrt_gt * eps
        if CLAMP:
            x0_hat = tl.minimum(tl.maximum(x0_hat, clamp_min), clamp_max)
        x_new = x0_hat + eps_scale * eps
        if Z_TENSOR:
            x_new = x_new + z_scale * z
        if Z_DRAWN:
            drawn = normals(seed, tile_start, b * C + channel, offset_lo, offset_hi, BLOCK)
            x_new = x_new + z_scale * drawn.to(COMPUTE)
        out = (b * C + channel) * HW + hw
        store(x_new_ptr + out, tl.where(finished, x, x_new), mask)
        if WRITE_X0_HAT:
            store(x0_hat_ptr + out, tl.where(finished, x, x0_hat), mask)


@triton.jit(do_not_specialize=["seed", "offset_lo", "offset_hi"])
def _reverse_step_kernel(x_ptr, eps_ptr, z_ptr, tau_ptr, delta_ptr, table_ptr, x_new_ptr, tau_new_ptr, x0_hat_ptr,
                         C, HW, W, n_tiles, T,
                         x_sb, x_sc, x_sh, x_sw, e_sb, e_sc, e_sh, e_sw, z_sb, z_sc, z_sh, z_sw, t_sb, t_sh, t_sw,
                         eta2: tl.float64, clamp_min: tl.float64, clamp_max: tl.float64,
                         seed, offset_lo, offset_hi,
                         COMPUTE: tl.constexpr, DENSE_PLANE: tl.constexpr, Z_TENSOR: tl.constexpr,
                         Z_DRAWN: tl.constexpr, CLAMP: tl.constexpr, WRITE_X0_HAT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_tiles).to(tl.int64)
    tile_start = (pid % n_tiles) * BLOCK
    hw = tile_start + tl.arange(0, BLOCK)
    mask = hw < HW
    tau = tl.load(tau_ptr + b * t_sb + plane_offsets(hw, W, t_sh, t_sw, DENSE_PLANE), mask=mask, other=0)
    s = tl.maximum(tau.to(COMPUTE) - tl.load(delta_ptr + b).to(COMPUTE), 0.0)
    x_plane = plane_offsets(hw, W, x_sh, x_sw, DENSE_PLANE)
    e_plane = plane_offsets(hw, W, e_sh, e_sw, DENSE_PLANE)
    z_plane = plane_offsets(hw, W, z_sh, z_sw, DENSE_PLANE)
    # scalars arrive as float64 and are rounded to the compute dtype, as torch rounds Python floats
    clamp_min = tl.full([], clamp_min, COMPUTE)
    clamp_max = tl.full([], clamp_max, COMPUTE)
    eta2 = tl.full([], eta2, COMPUTE)

    # Four channels at a time, all their loads issued before any store (stores may alias later loads, so
    # the compiler keeps that order): one DRAM round trip per group, together with the tau load above.
    # The per-pixel coefficients are computed inside the loop, after the loads; C <= 4 computes them once.
    for c in range(0, C, 4):
        x0, eps0, z0 = _load_channel(c, x_ptr, eps_ptr, z_ptr, b, mask, C, x_plane, e_plane, z_plane, x_sb, x_sc,
                                     e_sb, e_sc, z_sb, z_sc, COMPUTE, Z_TENSOR)
        x1, eps1, z1 = _load_channel(c + 1, x_ptr, eps_ptr, z_ptr, b, mask, C, x_plane, e_plane, z_plane, x_sb, x_sc,
                                     e_sb, e_sc, z_sb, z_sc, COMPUTE, Z_TENSOR)
        x2, eps2, z2 = _load_channel(c + 2, x_ptr, eps_ptr, z_ptr, b, mask, C, x_plane, e_plane, z_plane, x_sb, x_sc,
                                     e_sb, e_sc, z_sb, z_sc, COMPUTE, Z_TENSOR)
        x3, eps3, z3 = _load_channel(c + 3, x_ptr, eps_ptr, z_ptr, b, mask, C, x_plane, e_plane, z_plane, x_sb, x_sc,
                                     e_sb, e_sc, z_sb, z_sc, COMPUTE, Z_TENSOR)

        # per pixel: both lookups and the coefficients of x_new
        gt = gamma_lookup(tau.to(COMPUTE), table_ptr, T)
        gs = gamma_lookup(s, table_ptr, T)
        sig2 = eta2 * gs * (1 - div_rn(gs, tl.where(gt > 0, gt, 1.0)))
        sqrt_gt = sqrt_rn(gt)
        eps_scale = sqrt_rn(tl.maximum(gs - sig2, 0.0))
        z_scale = sqrt_rn(tl.maximum(sig2, 0.0))
        finished = gt == 0

        _step_channel(c, x0, eps0, z0, x_new_ptr, x0_hat_ptr, b, tile_start, hw, mask, C, HW, sqrt_gt, eps_scale,
                      z_scale, finished, clamp_min, clamp_max, seed, offset_lo, offset_hi, COMPUTE, Z_TENSOR, Z_DRAWN,
                      CLAMP, WRITE_X0_HAT, BLOCK)
        _step_channel(c + 1, x1, eps1, z1, x_new_ptr, x0_hat_ptr, b, tile_start, hw, mask, C, HW, sqrt_gt, eps_scale,
                      z_scale, finished, clamp_min, clamp_max, seed, offset_lo, offset_hi, COMPUTE, Z_TENSOR, Z_DRAWN,
                      CLAMP, WRITE_X0_HAT, BLOCK)
        _step_channel(c + 2, x2, eps2, z2, x_new_ptr, x0_hat_ptr, b, tile_start, hw, mask, C, HW, sqrt_gt, eps_scale,
                      z_scale, finished, clamp_min, clamp_max, seed, offset_lo, offset_hi, COMPUTE, Z_TENSOR, Z_DRAWN,
                      CLAMP, WRITE_X0_HAT, BLOCK)
        _step_channel(c + 3, x3, eps3, z3, x_new_ptr, x0_hat_ptr, b, tile_start, hw, mask, C, HW, sqrt_gt, eps_scale,
                      z_scale, finished, clamp_min, clamp_max, seed, offset_lo, offset_hi, COMPUTE, Z_TENSOR, Z_DRAWN,
                      CLAMP, WRITE_X0_HAT, BLOCK)
    tl.store(tau_new_ptr + b * HW + hw, s, mask=mask)


@functools.lru_cache(maxsize=64)
def _plan(shape, x_strides, e_strides, z_strides, tau_strides, dtype, T, z_tensor, z_drawn, clamp, write_x0_hat):
    """(grid, the integer arguments, the constexprs) of a launch on tensors of these shapes, strides and flags."""
    B, C, H, W = shape
    n_tiles = tiles(H * W)
    ints = (C, H * W, W, n_tiles, T, *x_strides, *e_strides, *z_strides, tau_strides[0], *tau_strides[2:])
    dense = all(dense_strides(shape, strides) for strides in (x_strides, e_strides, z_strides, tau_strides))
    return (B * n_tiles,), ints, dict(COMPUTE=TL_DTYPE[compute_dtype(dtype)], DENSE_PLANE=dense, Z_TENSOR=z_tensor,
                                      Z_DRAWN=z_drawn, CLAMP=clamp, WRITE_X0_HAT=write_x0_hat, BLOCK=BLOCK)


def reverse_step(x, eps_hat, tau, delta, table, eta, z, clamp_min, clamp_max, seed, offset, return_x0_hat):
    """reverse_step on checked arguments (see svnr_fast.reference._reverse_step)."""
    if tau.shape[1] != 1:
        # TODO(triton): per-channel time maps are not in the kernel yet; the reference serves them
        from svnr_fast import reference
        return reference._reverse_step(x, eps_hat, tau, delta, table, eta, z, clamp_min, clamp_max, seed, offset,
                                       return_x0_hat)
    x_new = torch.empty_like(x, memory_format=torch.contiguous_format)
    tau_new = torch.empty_like(tau, memory_format=torch.contiguous_format)
    x0_hat = torch.empty_like(x_new) if return_x0_hat else x.new_empty(0)
    if x.numel() == 0:
        return x_new, tau_new, x0_hat
    eta2 = float(eta) ** 2
    # eta = 0 gives z a zero weight: it is neither read nor drawn
    z_tensor, z_drawn = eta2 > 0 and z is not None, eta2 > 0 and z is None
    z_arg = z if z_tensor else x
    clamp = clamp_min is not None
    grid, ints, constants = _plan(x.shape, x.stride(), eps_hat.stride(), z_arg.stride(), tau.stride(), x.dtype,
                                  table.numel() - 1, z_tensor, z_drawn, clamp, bool(return_x0_hat))
    run(_reverse_step_kernel, grid, x, x, eps_hat, z_arg, tau, delta.contiguous(), table, x_new, tau_new, x0_hat,
        *ints, eta2, float(clamp_min) if clamp else 0.0, float(clamp_max) if clamp else 0.0,
        seed, *split_offset(offset), **constants)
    return x_new, tau_new, x0_hat
