"""Triton kernel of the SVNR training sample (DESIGN.md §1.4).

Same signature and results as svnr_fast.reference._training_sample. x_t needs t0 = u * max_p tau*(b, p),
a per-image maximum, before any pixel can be finished, so each tile of pixels is visited twice:

- max phase: read x0, reduce max(x0) over the tile and atomic_max it into the image's slot. Because
  V = sigma_r^2 + sigma_s^2 * max(x0, 0) and tau(V) are non-decreasing (in floating point too),
  max_p tau*(b, p) = tau(sigma_r^2 + sigma_s^2 * max(max x0, 0)): no time map has to be stored.
- sample phase: read x0 again, per pixel tau* = tau(max_c V), tau, gamma(tau*), gamma(tau) and the
  bridge coefficients, then per channel y', x_t and the target; noise from the tensors given or drawn
  in the kernel, one Philox call per four pixels for each of eps_T and eps'.

Two-pass launch (the default): the two phases as two launches, each reading all of x0. On an H200
(2026-11-27, benchmarks/results/nvidia-h200.csv) it took 0.165 ms at 16x3x512x512 float32 against 0.181 ms
for the ordered launch below, which is kept behind `launch(..., ordered=True)` for the GPU suite.

Ordered launch: one launch whose programs take tickets from an atomic counter; the ticket
names the phase, image and tile in the order max(0), max(1), sample(0), max(2), sample(1), ...,
sample(B-1). A sample tile waits (spins) until every max tile of its image is done; those hold
smaller tickets, so they are already running and never wait themselves: no deadlock whatever order
the GPU starts programs in. An image's x0 is re-read about one image of traffic after the max phase
read it, so the second read can come from L2 rather than DRAM; the spin-waits and the ticket counter
cost more than that saved on the H200.

Bytes per element, float32, C = 3, noise drawn in the kernel: x0 4 read; y', x_t, target 12 + tau 4/3
written = 17.33 B (bfloat16 data: 9.33 B; +2 x itemsize with explicit eps_T, eps' tensors). The
two-pass launch moves 4 B more (x0 read twice from DRAM): 21.33 B.
Roofline at 16x3x512x512 (12.6 M elements), float32: 218.1 MB -> 72.7 us on an H100 (~3.0 TB/s
measured copy bandwidth), 50.7 us on an H200 (~4.3 TB/s); bfloat16: 117.4 MB -> 39.1 us / 27.3 us.
Two-pass float32: 268.4 MB of DRAM traffic -> 89.5 us / 62.4 us, at most 81% of copy bandwidth when
counted against the 218.1 MB minimum.
"""
import functools

import torch
import triton
import triton.language as tl

from ._triton_common import (BLOCK, TL_DTYPE, channel_max, compute_dtype, dense_strides, div_rn, gamma_lookup,
                             load_channel, normals, plane_offsets, run, split_offset, sqrt_rn, store, table_size_args,
                             tiles, time_lookup)

ORDERED, MAX_PHASE, SAMPLE_PHASE = 0, 1, 2   # values of the kernel's PHASE


@triton.jit
def _float_bits(value, COMPUTE: tl.constexpr):
    """A non-negative float as an int64 whose integer order is the float order."""
    if COMPUTE == tl.float64:
        return value.to(tl.int64, bitcast=True)
    else:
        return value.to(tl.int32, bitcast=True).to(tl.int64)


@triton.jit
def _bits_float(bits, COMPUTE: tl.constexpr):
    if COMPUTE == tl.float64:
        return bits.to(tl.float64, bitcast=True)
    else:
        return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _load_channel(c, x0_ptr, eps_t_ptr, eps_p_ptr, b, mask, C, x_plane, a_plane, p_plane, x_sb, x_sc, a_sb, a_sc,
                  p_sb, p_sc, COMPUTE: tl.constexpr, EPS_T_TENSOR: tl.constexpr, EPS_PRIME_TENSOR: tl.constexpr):
    """x0 of channel c of one tile, and its eps_T and eps' where they are given."""
    x = load_channel(x0_ptr, b * x_sb, x_sc, x_plane, mask, c, C, 0, COMPUTE)
    eps_t = x   # placeholders, replaced by the drawn noise
    eps_p = x
    if EPS_T_TENSOR:
        eps_t = load_channel(eps_t_ptr, b * a_sb, a_sc, a_plane, mask, c, C, 0, COMPUTE)
    if EPS_PRIME_TENSOR:
        eps_p = load_channel(eps_p_ptr, b * p_sb, p_sc, p_plane, mask, c, C, 0, COMPUTE)
    return x, eps_t, eps_p


@triton.jit
def _sample_channel(c, x, eps_t, eps_p, y_ptr, x_t_ptr, target_ptr, b, tile_start, hw, mask, C, HW, y_scale, r,
                    noise_scale, has_target, target_scale, seed, offset_lo, offset_hi, COMPUTE: tl.constexpr,
                    EPS_T_TENSOR: tl.constexpr, EPS_PRIME_TENSOR: tl.constexpr, CORRELATED: tl.constexpr,
                    BLOCK: tl.constexpr):
    """y', x_t and the target of channel c of one tile; eps_T and eps' are drawn here unless given."""
    if c < C:
        channel = tl.cast(c, tl.int64)
        stream = 2 * (b * C + channel)   # eps_T, eps' of channel c: streams 2 (b C + c) and 2 (b C + c) + 1
        if not EPS_T_TENSOR:
            eps_t = normals(seed, tile_start, stream, offset_lo, offset_hi, BLOCK).to(COMPUTE)
        if not EPS_PRIME_TENSOR:
            eps_p = normals(seed, tile_start, stream + 1, offset_lo, offset_hi, BLOCK).to(COMPUTE)
        y = x + y_scale * eps_t
        if CORRELATED:
            x_t = x + r * (y - x) + noise_scale * eps_p
        else:
            x_t = x + noise_scale * eps_p
        target = tl.where(has_target, div_rn(x_t - x, target_scale), 0.0)
        out = (b * C + channel) * HW + hw
        store(y_ptr + out, y, mask)
        store(x_t_ptr + out, x_t, mask)
        store(target_ptr + out, target, mask)


@triton.jit(do_not_specialize=["seed", "offset_lo", "offset_hi"])
def _training_sample_kernel(x0_ptr, eps_t_ptr, eps_p_ptr, sigma_r_ptr, sigma_s_ptr, u_ptr, table_ptr,
                            y_ptr, x_t_ptr, tau_ptr, target_ptr, sync_ptr,
                            B, C, HW, W, n_tiles, T, search_top, n_search,
                            x_sb, x_sc, x_sh, x_sw, a_sb, a_sc, a_sh, a_sw, p_sb, p_sc, p_sh, p_sw,
                            seed, offset_lo, offset_hi,
                            COMPUTE: tl.constexpr, DENSE_PLANE: tl.constexpr, EPS_T_TENSOR: tl.constexpr,
                            EPS_PRIME_TENSOR: tl.constexpr, CORRELATED: tl.constexpr, PHASE: tl.constexpr,
                            BLOCK: tl.constexpr):
    # sync_ptr (int64): [ticket counter | per-image max(x0) as float bits (B) | finished max tiles (B)]
    image_max_ptr = sync_ptr + 1
    max_done_ptr = sync_ptr + 1 + B
    if PHASE == 0:
        ticket = tl.atomic_add(sync_ptr, 1)
        group = ticket // n_tiles
        tile = ticket % n_tiles
        last = group == 2 * B - 1
        odd = group % 2 == 1
        max_phase = (group == 0) | (odd & (group < 2 * B - 1))
        b = tl.where(group == 0, 0, tl.where(last, B - 1, tl.where(odd, (group + 1) // 2, group // 2 - 1)))
    else:
        pid = tl.program_id(0)
        max_phase = PHASE == 1
        b = pid // n_tiles
        tile = pid % n_tiles
    b = tl.cast(b, tl.int64)
    tile_start = (tile * BLOCK).to(tl.int32)
    hw = tile_start + tl.arange(0, BLOCK)
    mask = hw < HW
    x_plane = plane_offsets(hw, W, x_sh, x_sw, DENSE_PLANE)
    # max over channels, clamped at 0: V = sigma_r^2 + sigma_s^2 * max(x0, 0) is largest there
    x_max = tl.maximum(channel_max(x0_ptr, b * x_sb, x_sc, x_plane, mask, C, COMPUTE), 0.0)

    if max_phase:
        tl.atomic_max(image_max_ptr + b, _float_bits(tl.max(x_max, axis=0), COMPUTE))
        if PHASE == 0:
            tl.atomic_add(max_done_ptr + b, 1, sem="release")
    else:
        # per pixel: 1. the time map (before waiting: it needs no other tile)
        sigma_r = tl.load(sigma_r_ptr + b).to(COMPUTE)
        sigma_s = tl.load(sigma_s_ptr + b).to(COMPUTE)
        sigma_r2 = sigma_r * sigma_r
        sigma_s2 = sigma_s * sigma_s
        tau_star = time_lookup(sigma_r2 + sigma_s2 * x_max, table_ptr, T, search_top, n_search)
        g_star = gamma_lookup(tau_star, table_ptr, T)
        if PHASE == 0:
            while tl.atomic_add(max_done_ptr + b, 0, sem="acquire") < n_tiles:
                pass
        # read through the atomic unit (L2): this SM's L1 may hold the slot from before it was final
        image_max = _bits_float(tl.atomic_add(image_max_ptr + b, 0), COMPUTE)
        # and the step back t0 shared by the image
        tau_star_max = time_lookup(sigma_r2 + sigma_s2 * image_max, table_ptr, T, search_top, n_search)
        t0 = tl.load(u_ptr + b).to(COMPUTE) * tau_star_max
        # 2.-3. every pixel steps back by t0; the bridge (or independent-noise) coefficients
        tau = tl.maximum(tau_star - t0, 0.0)
        g = gamma_lookup(tau, table_ptr, T)
        y_scale = sqrt_rn(g_star)
        if CORRELATED:
            r = tl.where(g_star > 0, div_rn(g, tl.where(g_star > 0, g_star, 1.0)), 0.0)
            noise_scale = sqrt_rn(tl.maximum(g * (1 - r), 0.0))
        else:
            r = g   # unused
            noise_scale = sqrt_rn(g)
        has_target = g > 0
        target_scale = sqrt_rn(tl.where(has_target, g, 1.0))

        # 4.-5. four channels at a time, loads before stores (x0 again, which channel_max just brought into L1,
        # and the given noise)
        a_plane = plane_offsets(hw, W, a_sh, a_sw, DENSE_PLANE)
        p_plane = plane_offsets(hw, W, p_sh, p_sw, DENSE_PLANE)
        for c in range(0, C, 4):
            x0, eps_t0, eps_p0 = _load_channel(c, x0_ptr, eps_t_ptr, eps_p_ptr, b, mask, C, x_plane, a_plane,
                                               p_plane, x_sb, x_sc, a_sb, a_sc, p_sb, p_sc, COMPUTE, EPS_T_TENSOR,
                                               EPS_PRIME_TENSOR)
            x1, eps_t1, eps_p1 = _load_channel(c + 1, x0_ptr, eps_t_ptr, eps_p_ptr, b, mask, C, x_plane, a_plane,
                                               p_plane, x_sb, x_sc, a_sb, a_sc, p_sb, p_sc, COMPUTE, EPS_T_TENSOR,
                                               EPS_PRIME_TENSOR)
            x2, eps_t2, eps_p2 = _load_channel(c + 2, x0_ptr, eps_t_ptr, eps_p_ptr, b, mask, C, x_plane, a_plane,
                                               p_plane, x_sb, x_sc, a_sb, a_sc, p_sb, p_sc, COMPUTE, EPS_T_TENSOR,
                                               EPS_PRIME_TENSOR)
            x3, eps_t3, eps_p3 = _load_channel(c + 3, x0_ptr, eps_t_ptr, eps_p_ptr, b, mask, C, x_plane, a_plane,
                                               p_plane, x_sb, x_sc, a_sb, a_sc, p_sb, p_sc, COMPUTE, EPS_T_TENSOR,
                                               EPS_PRIME_TENSOR)
            _sample_channel(c, x0, eps_t0, eps_p0, y_ptr, x_t_ptr, target_ptr, b, tile_start, hw, mask, C, HW,
                            y_scale, r, noise_scale, has_target, target_scale, seed, offset_lo, offset_hi, COMPUTE,
                            EPS_T_TENSOR, EPS_PRIME_TENSOR, CORRELATED, BLOCK)
            _sample_channel(c + 1, x1, eps_t1, eps_p1, y_ptr, x_t_ptr, target_ptr, b, tile_start, hw, mask, C, HW,
                            y_scale, r, noise_scale, has_target, target_scale, seed, offset_lo, offset_hi, COMPUTE,
                            EPS_T_TENSOR, EPS_PRIME_TENSOR, CORRELATED, BLOCK)
            _sample_channel(c + 2, x2, eps_t2, eps_p2, y_ptr, x_t_ptr, target_ptr, b, tile_start, hw, mask, C, HW,
                            y_scale, r, noise_scale, has_target, target_scale, seed, offset_lo, offset_hi, COMPUTE,
                            EPS_T_TENSOR, EPS_PRIME_TENSOR, CORRELATED, BLOCK)
            _sample_channel(c + 3, x3, eps_t3, eps_p3, y_ptr, x_t_ptr, target_ptr, b, tile_start, hw, mask, C, HW,
                            y_scale, r, noise_scale, has_target, target_scale, seed, offset_lo, offset_hi, COMPUTE,
                            EPS_T_TENSOR, EPS_PRIME_TENSOR, CORRELATED, BLOCK)
        tl.store(tau_ptr + b * HW + hw, tau, mask=mask)


@functools.lru_cache(maxsize=64)
def _plan(shape, x_strides, a_strides, p_strides, dtype, table_size, eps_t_tensor, eps_prime_tensor, correlated):
    """(tiles per image, the integer arguments, the constexprs) of launches on tensors of these shapes, strides
    and flags."""
    B, C, H, W = shape
    n_tiles = tiles(H * W)
    ints = (B, C, H * W, W, n_tiles, *table_size_args(table_size), *x_strides, *a_strides, *p_strides)
    dense = all(dense_strides(shape, strides) for strides in (x_strides, a_strides, p_strides))
    return n_tiles, ints, dict(COMPUTE=TL_DTYPE[compute_dtype(dtype)], DENSE_PLANE=dense, EPS_T_TENSOR=eps_t_tensor,
                               EPS_PRIME_TENSOR=eps_prime_tensor, CORRELATED=correlated, BLOCK=BLOCK)


def launch(x0, sigma_r, sigma_s, u, table, correlated, eps_T, eps_prime, seed, offset, *, ordered: bool = False):
    """training_sample on checked arguments, in two passes or in one ordered launch (`ordered=True`)."""
    B, C, H, W = x0.shape
    y = torch.empty_like(x0, memory_format=torch.contiguous_format)
    x_t = torch.empty_like(y)
    target = torch.empty_like(y)
    tau = y.new_empty((B, 1, H, W), dtype=compute_dtype(x0.dtype))
    if x0.numel() == 0:
        return y, x_t, tau, target
    sync = y.new_zeros(1 + 2 * B, dtype=torch.int64)
    eps_t_arg = eps_T if eps_T is not None else x0
    eps_p_arg = eps_prime if eps_prime is not None else x0
    n_tiles, ints, constants = _plan(x0.shape, x0.stride(), eps_t_arg.stride(), eps_p_arg.stride(), x0.dtype,
                                     table.numel(), eps_T is not None, eps_prime is not None, bool(correlated))
    args = (x0, eps_t_arg, eps_p_arg, sigma_r.contiguous(), sigma_s.contiguous(), u.contiguous(), table,
            y, x_t, tau, target, sync, *ints, seed, *split_offset(offset))
    if ordered:
        run(_training_sample_kernel, (2 * B * n_tiles,), x0, *args, PHASE=ORDERED, **constants)
    else:
        run(_training_sample_kernel, (B * n_tiles,), x0, *args, PHASE=MAX_PHASE, **constants)
        run(_training_sample_kernel, (B * n_tiles,), x0, *args, PHASE=SAMPLE_PHASE, **constants)
    return y, x_t, tau, target


def training_sample(x0, sigma_r, sigma_s, u, table, correlated, eps_T, eps_prime, seed, offset, per_channel, batch_t0,
                    min_std):
    """training_sample on checked arguments (see svnr_fast.reference._training_sample)."""
    if per_channel or batch_t0 or min_std > 0:
        # TODO(triton): the other codebases' conventions are not in the kernel yet; the reference serves them
        from svnr_fast import reference
        return reference._training_sample(x0, sigma_r, sigma_s, u, table, correlated, eps_T, eps_prime, seed, offset,
                                          per_channel, batch_t0, min_std)
    return launch(x0, sigma_r, sigma_s, u, table, correlated, eps_T, eps_prime, seed, offset)
