"""Triton kernel of the SVNR reverse step (DESIGN.md §1.5), one launch, one pass over the data.

Same signature and results as svnr_fast.reference._reverse_step. One program handles a tile of pixels of
one image. It issues every independent DRAM load first (tau, then x, eps_hat and z of each channel), and
only then the table lookups that need tau, so a program waits for one DRAM round trip, not two. With a
shared time map (B, 1, H, W) both lookups (gamma(tau), gamma(s)) and the step's coefficients are worked
out once per pixel; with one time map per channel (B, C, H, W) once per element. When z is not given
each channel draws it in the kernel, one Philox call per four pixels (eta = 0 needs no z at all and
neither reads nor draws it).

Bytes per element (x, eps_hat read and x_new written in the data dtype, tau read and s written in float32
per pixel, or per element with per-channel maps, z read when given) and the static roofline at
16x3x512x512 (`python benchmarks/roofline.py`: sm_90 SASS, instructions executed per thread per element;
H200 model, 132 SMs x 4 schedulers x 1.98 GHz issue, 4,248 GB/s):

    variant                dtype   B/elem  instr/elem  issue us  DRAM us  issue/DRAM  regs  spills
    z drawn (eta = 1)      fp32    14.67   40.9        15.4      43.4     0.35        64    0
                           bf16     8.67   45.7        17.2      25.7     0.67        62    0
    z given                fp32    18.67   26.1         9.8      55.3     0.18        72    0
                           bf16    10.67   33.0        12.4      31.6     0.39        56    0
    eta = 0                fp32    14.67   22.8         8.6      43.4     0.20        64    0
                           bf16     8.67   28.2        10.6      25.7     0.41        48    0
    per-channel, z drawn   fp32    20.00   71.4        26.9      59.2     0.45        72    0
                           bf16    14.00   76.6        28.8      41.5     0.69        64    0
"""
import functools

import torch
import triton
import triton.language as tl

from ._triton_common import (BLOCK, TL_DTYPE, compute_dtype, div_rn, gamma_lookup, grid, like_strides, load, normals,
                             plane_layout, plane_offsets, prepared_schedule, run, split_offset, sqrt_, store, tile,
                             wide_offsets)

NO_Z, Z_TENSOR, Z_DRAWN = 0, 1, 2   # values of the kernel's Z


@triton.jit
def _coefficients(tau, delta, sched_ptr, eta2, T: tl.constexpr):
    """s and the step's coefficients at time tau: (s, sqrt(gt), eps_hat's and z's scales, finished).

    gt, gs and gs / gt are the reference's bit for bit: the first two decide the finished pixels, and
    sqrt(sig2) depends on the rounding of gs / gt without bound where it nears 1 (small steps late in the
    schedule, times past its end)."""
    s = tl.maximum(tau - delta, 0.0)
    gt = gamma_lookup(tau, sched_ptr, T)
    gs = gamma_lookup(s, sched_ptr, T)
    finished = gt == 0
    sig2 = eta2 * gs * (1 - div_rn(gs, tl.where(finished, 1.0, gt)))
    return s, sqrt_(gt), sqrt_(tl.maximum(gs - sig2, 0.0)), sqrt_(tl.maximum(sig2, 0.0)), finished


@triton.jit
def _step(x, eps, z, coefficients, clamp_min, clamp_max, Z: tl.constexpr, CLAMP: tl.constexpr):
    """(x_new, x0_hat) of one channel (z is not read when Z is NO_Z)."""
    s, sqrt_gt, eps_scale, z_scale, finished = coefficients
    x0_hat = x - sqrt_gt * eps
    if CLAMP:
        x0_hat = tl.minimum(tl.maximum(x0_hat, clamp_min), clamp_max)
    x_new = x0_hat + eps_scale * eps
    if Z != 0:   # NO_Z
        x_new = x_new + z_scale * z
    return tl.where(finished, x, x_new), tl.where(finished, x, x0_hat)


@triton.jit(do_not_specialize=["seed", "offset_lo", "offset_hi"])
def _reverse_step_kernel(x_ptr, eps_ptr, z_ptr, tau_ptr, delta_ptr, sched_ptr, x_new_ptr, tau_new_ptr, x0_hat_ptr,
                         HW, W, sb, sc, sh, sw, eta2: tl.float64, clamp_min: tl.float64, clamp_max: tl.float64,
                         seed, offset_lo, offset_hi,
                         C: tl.constexpr, T: tl.constexpr, COMPUTE: tl.constexpr, LAYOUT: tl.constexpr,
                         WIDE: tl.constexpr, EVEN: tl.constexpr, PER_CHANNEL: tl.constexpr, Z: tl.constexpr,
                         CLAMP: tl.constexpr, WRITE_X0_HAT: tl.constexpr, BLOCK: tl.constexpr):
    b, start, hw = tile(BLOCK, WIDE)
    mask = None if EVEN else hw < HW
    # x, eps_hat, z share strides (the wrapper sees to it); tau, s and the outputs are contiguous
    image = b * sb + plane_offsets(hw, W, sh, sw, LAYOUT)
    out = b * C * HW + hw
    time = out if PER_CHANNEL else b * HW + hw

    # 1. every independent DRAM load, the time map first: its lookups are the first to need data
    if PER_CHANNEL:
        taus = ()
        for c in tl.static_range(C):
            taus = taus + (load(tau_ptr + time + c * HW, mask, COMPUTE),)
    else:
        tau = load(tau_ptr + time, mask, COMPUTE)
    xs = ()
    epss = ()
    zs = ()
    for c in tl.static_range(C):
        xs = xs + (load(x_ptr + image + c * sc, mask, COMPUTE),)
        epss = epss + (load(eps_ptr + image + c * sc, mask, COMPUTE),)
        if Z == 1:   # Z_TENSOR
            zs = zs + (load(z_ptr + image + c * sc, mask, COMPUTE),)
    delta = tl.load(delta_ptr + b).to(COMPUTE)
    # scalars arrive as float64 and are rounded to the compute dtype, as torch rounds Python floats
    eta2 = tl.full([], eta2, COMPUTE)
    clamp_min = tl.full([], clamp_min, COMPUTE)
    clamp_max = tl.full([], clamp_max, COMPUTE)

    # 2. the lookups, then each channel's step; the compiler would hoist the lookups' gathers above the
    # loads (they are first to be used), and an instruction stream issues in order: the barrier keeps them
    # behind
    tl.debug_barrier()
    if not PER_CHANNEL:
        coefficients = _coefficients(tau, delta, sched_ptr, eta2, T)
        tl.store(tau_new_ptr + time, coefficients[0], mask=mask)
    for c in tl.static_range(C):
        if PER_CHANNEL:
            coefficients = _coefficients(taus[c], delta, sched_ptr, eta2, T)
            tl.store(tau_new_ptr + time + c * HW, coefficients[0], mask=mask)
        if Z == 1:   # Z_TENSOR
            z = zs[c]
        elif Z == 2:   # Z_DRAWN
            z = normals(seed, start, b * C + c, offset_lo, offset_hi, BLOCK).to(COMPUTE)
        else:
            z = xs[c]   # not read
        x_new, x0_hat = _step(xs[c], epss[c], z, coefficients, clamp_min, clamp_max, Z, CLAMP)
        store(x_new_ptr + out + c * HW, x_new, mask)
        if WRITE_X0_HAT:
            store(x0_hat_ptr + out + c * HW, x0_hat, mask)


@functools.lru_cache(maxsize=64)
def _plan(shape, strides, per_channel, dtype, T, z_mode, clamp, write_x0_hat):
    """(grid, the integer arguments, the constexprs) of a launch on x of this shape and these strides (eps_hat
    and z take them too)."""
    B, C, H, W = shape
    return grid(H * W, B), (H * W, W, *strides), dict(
        C=C, T=T, COMPUTE=TL_DTYPE[compute_dtype(dtype)], LAYOUT=plane_layout(shape, strides),
        WIDE=wide_offsets(shape, strides), EVEN=H * W % BLOCK == 0, PER_CHANNEL=per_channel, Z=z_mode, CLAMP=clamp,
        WRITE_X0_HAT=write_x0_hat, BLOCK=BLOCK)


def reverse_step(x, eps_hat, tau, delta, table, eta, z, clamp_min, clamp_max, seed, offset, return_x0_hat):
    """reverse_step on checked arguments (see svnr_fast.reference._reverse_step)."""
    x_new = torch.empty_like(x, memory_format=torch.contiguous_format)
    tau_new = torch.empty_like(tau, memory_format=torch.contiguous_format)
    x0_hat = torch.empty_like(x_new) if return_x0_hat else x.new_empty(0)
    if x.numel() == 0:
        return x_new, tau_new, x0_hat
    eta2 = float(eta) ** 2
    # eta = 0 gives z a zero weight: it is neither read nor drawn
    z_mode = NO_Z if eta2 == 0 else Z_TENSOR if z is not None else Z_DRAWN
    clamp = clamp_min is not None
    grid_, ints, constants = _plan(x.shape, x.stride(), tau.shape[1] != 1, x.dtype, table.numel() - 1, z_mode, clamp,
                                   bool(return_x0_hat))
    run(_reverse_step_kernel, grid_, x, x, like_strides(eps_hat, x), like_strides(z, x) if z_mode == Z_TENSOR else x,
        tau.contiguous(), delta, prepared_schedule(table), x_new, tau_new, x0_hat, *ints, eta2,
        float(clamp_min) if clamp else 0.0, float(clamp_max) if clamp else 0.0, seed, *split_offset(offset),
        **constants)
    return x_new, tau_new, x0_hat
