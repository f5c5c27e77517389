"""Triton kernel of the SVNR training sample (DESIGN.md §1.4), with other codebases' conventions.

Same signature and results as svnr_fast.reference._training_sample. x_t needs t0 = u * max_p tau*(b, p), a
per-image maximum, before any pixel can be finished, so every tile of pixels is visited twice:

- max programs: one reduces max(x0, 0) over MAX_TILES tiles and atomic_maxes it into the image's slot;
  the image's last max program (an acq_rel ticket counts them) turns the image's maximum into
  tau*max = tau(max(sigma_r^2 + sigma_s^2 * max x0, min_std^2)), once per image (V and tau are
  non-decreasing, in floating point too, so no time map is stored), and into the batch's slot when t0
  is one per batch.
- sample programs (SAMPLE_TILES tiles each): t0 = u * tau*max (one load), then per pixel (per element
  with per-channel time maps) tau* = tau(V), tau, gamma(tau*), gamma(tau), the bridge coefficients and
  1 / sqrt(gamma(tau)) (no division per element), then per element y', x_t and the target; noise from
  the tensors given or drawn in the kernel, one Philox call per four pixels for each of eps_T and eps'.

The batch goes in chunks of images whose x0 fits in half the L2 cache, two launches each (one constexpr
phase each, so neither carries the other's code): the max phase reads x0 from DRAM (asking L2 to keep
it), the sample phase right after reads it again from L2 (asking L2 to drop it and its outputs first).
One t0 per batch needs every maximum before any sample: one chunk, the whole batch, x0 read twice from
DRAM.

A batch whose two phases together take at most one program per SM runs as one ordered launch (the host
cost of a call is then one launch, not two, and no zero fill): each program takes a ticket, the max
programs' tickets come first, and a sample program waits (spins) until its image's tau*max is ready. It
waits only for max programs holding smaller tickets, which are running, so it cannot deadlock whatever
order the GPU starts programs in. The launch's last program sets its sync slots back to zero, so one
workspace per device and stream serves every launch on that stream (`_workspace`). Larger batches keep
the two launches (an earlier ordered design took 0.181 ms against their 0.165 ms at 16x3x512x512 float32 on
an H200), and the roofline below is theirs.

Bytes per element (x0 read, y', x_t, target written in the data dtype, tau written in float32 per pixel,
or per element with per-channel maps; +2 x itemsize with eps_T and eps' given; the second read of x0
comes from L2) and the static roofline at 16x3x512x512, correlated, both phases (`python
benchmarks/roofline.py`: sm_90 SASS, instructions executed per thread per element; H200 model, 132 SMs x
4 schedulers x 1.98 GHz issue, 4,248 GB/s):

    variant                dtype   B/elem  instr/elem  issue us  DRAM us  issue/DRAM  regs  spills
    noise drawn            fp32    17.33   68.9        25.9      51.3     0.50        56    0
                           bf16     9.33   71.4        26.8      27.7     0.97        64    0
    noise given            fp32    25.33   43.1        16.2      75.0     0.22        72    0
                           bf16    13.33   48.6        18.3      39.5     0.46        70    0
    uncorrelated, drawn    fp32    17.33   62.0        23.3      51.3     0.45        56    0
                           bf16     9.33   64.5        24.3      27.7     0.88        62    0
    per-channel, drawn     fp32    20.00  120.8        45.4      59.2     0.77        56    0
                           bf16    12.00  123.5        46.4      35.5     1.31        56    0
The max phase is 3.4 of the 68.9 (fp32) instructions per element, with 32 registers.
"""
import functools
import math

import torch
import triton
import triton.language as tl
from triton.runtime.driver import driver

from ._triton_common import (BLOCK, TL_DTYPE, compute_dtype, div_rn, gamma_lookup, grid, launch, like_strides, load,
                             normals, plane_layout, plane_offsets, prepared_schedule, rsqrt_, split_offset, sqrt_,
                             store, time_lookup, wide_offsets)

L2_SHARE = 0.5   # of the L2 cache, for one chunk of x0
# Tiles of BLOCK pixels a program samples, and a max program reduces: their fixed costs (program ids,
# per-image loads, Philox keys; the reduction and atomics) shared by more pixels
SAMPLE_TILES = 2
MAX_TILES = 8     # a multiple of SAMPLE_TILES
_SAMPLE_TILES = tl.constexpr(SAMPLE_TILES)
_MAX_TILES = tl.constexpr(MAX_TILES)
# a launch's PHASE: two-pass, the max then the sample launch (each chunk); ordered, both phases in one launch
MAX_PHASE, SAMPLE_PHASE, ORDERED = 0, 1, 2
_MAX_PHASE, _SAMPLE_PHASE = tl.constexpr(MAX_PHASE), tl.constexpr(SAMPLE_PHASE)
_WORKSPACES: dict = {}    # (device index, stream) or a device -> _workspace's int64 zeros


@triton.jit
def _bits(value):
    """A non-negative float as an int64 whose integer order is the float order."""
    if value.dtype == tl.float64:
        return value.to(tl.int64, bitcast=True)
    else:
        return value.to(tl.int32, bitcast=True).to(tl.int64)


@triton.jit
def _float(bits, COMPUTE: tl.constexpr):
    if COMPUTE == tl.float64:
        return bits.to(tl.float64, bitcast=True)
    else:
        return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _variance(x, sigma_r2, sigma_s2, min_var, MIN_VAR: tl.constexpr):
    """V = max(sigma_r^2 + sigma_s^2 * max(x, 0), min_std^2), as the reference rounds it."""
    v = sigma_r2 + sigma_s2 * tl.maximum(x, 0.0)
    if MIN_VAR:
        v = tl.maximum(v, min_var)
    return v


@triton.jit
def _bridge(v, t0, sched_ptr, T: tl.constexpr, CORRELATED: tl.constexpr):
    """Steps 1-3 at variance v: (tau, y' noise scale, x_t's eps_T and eps' scales, the target's factor
    1 / sqrt(gamma(tau)) or 0).

    tau*, the gammas and r = g / g* are the reference's bit for bit: the first decide which pixels land on 0,
    and sqrt(g (1 - r)) depends on the rounding of r without bound where r nears 1. x_t = x0 + r (y' - x0)
    + ... of the reference is x0 + (r sqrt(g*)) eps_T + ..., equal up to the rounding of y', which the
    factor r makes negligible."""
    tau_star, _ = time_lookup(v, sched_ptr, T)
    g_star = gamma_lookup(tau_star, sched_ptr, T, IN_RANGE=True)
    tau = tl.maximum(tau_star - t0, 0.0)
    g = gamma_lookup(tau, sched_ptr, T, IN_RANGE=True)
    y_scale = sqrt_(g_star)
    if CORRELATED:
        r = tl.where(g_star > 0, div_rn(g, tl.where(g_star > 0, g_star, 1.0)), 0.0)
        eps_t_scale = r * y_scale
        eps_p_scale = sqrt_(tl.maximum(g * (1 - r), 0.0))
    else:
        eps_t_scale = y_scale   # unused
        eps_p_scale = sqrt_(g)
    has_target = g > 0
    # the target is 0 (and carries no loss) where g = 0: a zero factor
    return tau, y_scale, eps_t_scale, eps_p_scale, tl.where(has_target, rsqrt_(tl.where(has_target, g, 1.0)), 0.0)


@triton.jit
def _sigmas2(sigma_r_ptr, sigma_s_ptr, b, COMPUTE: tl.constexpr):
    sigma_r = tl.load(sigma_r_ptr + b).to(COMPUTE)
    sigma_s = tl.load(sigma_s_ptr + b).to(COMPUTE)
    return sigma_r * sigma_r, sigma_s * sigma_s


@triton.jit
def _small_div(a, b):
    """a // b for 0 <= a < 2**21 and b > 0, through float32: (a + 1/2) / b lies at least 1 / (2 b) from an
    integer, far more than the rounding of a division (a few instructions; integer division takes 25)."""
    return ((a.to(tl.float32) + 0.5) / b.to(tl.float32)).to(tl.int32)


@triton.jit
def _max_tiles(x0_ptr, sigma_r_ptr, sigma_s_ptr, sched_ptr, sync_ptr, program, programs, row, first_image, end_image,
               HW, W, sb, sc, sh, sw, min_var, C: tl.constexpr, T: tl.constexpr, COMPUTE: tl.constexpr,
               LAYOUT: tl.constexpr, WIDE: tl.constexpr, EVEN: tl.constexpr, BATCH_T0: tl.constexpr,
               MIN_VAR: tl.constexpr, ORDERED: tl.constexpr, BLOCK: tl.constexpr):
    """Max programs: a program reduces max(x0, 0) over MAX_TILES consecutive tiles of one image into the
    image's slot, and the image's last max program turns the image's maximum into tau*max. A row of the
    grid (`programs` programs, one per SAMPLE_TILES tiles) serves several images: `groups` programs each,
    as many images as fit. ORDERED: the last program then tells the sample programs waiting for tau*max."""
    groups = tl.cdiv(programs, _MAX_TILES // _SAMPLE_TILES)
    per_row = _small_div(programs, groups)
    in_row = _small_div(program, groups)
    b = first_image + row * per_row + in_row
    if (in_row < per_row) & (b < end_image):
        if WIDE:
            b = b.to(tl.int64)
        image_sync = sync_ptr + 1 + 3 * b
        first = (program - in_row * groups) * (_MAX_TILES * BLOCK)
        x_max = tl.zeros([BLOCK], COMPUTE)
        for t in tl.static_range(_MAX_TILES):
            pixels = first + t * BLOCK + tl.arange(0, BLOCK)
            here = b * sb + plane_offsets(pixels, W, sh, sw, LAYOUT)
            for c in tl.static_range(C):
                x_max = tl.maximum(x_max, load(x0_ptr + here + c * sc, None if EVEN else pixels < HW, COMPUTE,
                                               "evict_last"))
        tl.atomic_max(image_sync, _bits(tl.max(x_max, axis=0)), sem="relaxed")
        if tl.atomic_add(image_sync + 1, 1, sem="acq_rel") == groups - 1:
            # read the maximum through L2, where the atomics went
            image_max = _float(tl.atomic_max(image_sync, 0, sem="relaxed"), COMPUTE)
            sigma_r2, sigma_s2 = _sigmas2(sigma_r_ptr, sigma_s_ptr, b, COMPUTE)
            tau_star_max = time_lookup(_variance(image_max, sigma_r2, sigma_s2, min_var, MIN_VAR), sched_ptr, T)[0]
            tl.store(image_sync + 2, _bits(tau_star_max))
            if BATCH_T0:
                tl.atomic_max(sync_ptr, _bits(tau_star_max), sem="relaxed")
            if ORDERED:
                # the image's count past groups; with one t0 per batch, one more image ready
                tl.atomic_add(_ordered_slots(sync_ptr, end_image) + 1 if BATCH_T0 else image_sync + 1, 1,
                              sem="release")


@triton.jit
def _sample_tile(start, b, sigma_r2, sigma_s2, min_var, t0, x0_ptr, eps_t_ptr, eps_p_ptr, sched_ptr, y_ptr, x_t_ptr,
                 tau_ptr, target_ptr, HW, W, sb, sc, sh, sw, seed, offset_lo, offset_hi, C: tl.constexpr,
                 T: tl.constexpr, COMPUTE: tl.constexpr, LAYOUT: tl.constexpr, EVEN: tl.constexpr,
                 EPS_T_TENSOR: tl.constexpr, EPS_PRIME_TENSOR: tl.constexpr, CORRELATED: tl.constexpr,
                 PER_CHANNEL: tl.constexpr, MIN_VAR: tl.constexpr, BLOCK: tl.constexpr):
    """y', x_t, tau and the target of the pixels start ... start + BLOCK - 1 of image b."""
    hw = start + tl.arange(0, BLOCK)
    mask = None if EVEN else hw < HW
    image = b * sb + plane_offsets(hw, W, sh, sw, LAYOUT)
    # x0 (from L2: this image's max tiles read it one launch ago) and the noise given
    xs = ()
    eps_ts = ()
    eps_ps = ()
    for c in tl.static_range(C):
        xs = xs + (load(x0_ptr + image + c * sc, mask, COMPUTE, "evict_first"),)
        if EPS_T_TENSOR:
            eps_ts = eps_ts + (load(eps_t_ptr + image + c * sc, mask, COMPUTE, "evict_first"),)
        if EPS_PRIME_TENSOR:
            eps_ps = eps_ps + (load(eps_p_ptr + image + c * sc, mask, COMPUTE, "evict_first"),)
    out = b * C * HW + hw
    if not PER_CHANNEL:
        x_max = xs[0]
        for c in tl.static_range(1, C):
            x_max = tl.maximum(x_max, xs[c])
        coefficients = _bridge(_variance(x_max, sigma_r2, sigma_s2, min_var, MIN_VAR), t0, sched_ptr, T,
                               CORRELATED)
        tl.store(tau_ptr + b * HW + hw, coefficients[0], mask=mask, eviction_policy="evict_first")
    for c in tl.static_range(C):
        x = xs[c]
        if PER_CHANNEL:
            coefficients = _bridge(_variance(x, sigma_r2, sigma_s2, min_var, MIN_VAR), t0, sched_ptr, T,
                                   CORRELATED)
            tl.store(tau_ptr + out + c * HW, coefficients[0], mask=mask, eviction_policy="evict_first")
        tau, y_scale, eps_t_scale, eps_p_scale, inv_sqrt_g = coefficients
        # eps_T, eps' of channel c: streams 2 (b C + c) and 2 (b C + c) + 1
        if EPS_T_TENSOR:
            eps_t = eps_ts[c]
        else:
            eps_t = normals(seed, start, 2 * (b * C + c), offset_lo, offset_hi, BLOCK).to(COMPUTE)
        if EPS_PRIME_TENSOR:
            eps_p = eps_ps[c]
        else:
            eps_p = normals(seed, start, 2 * (b * C + c) + 1, offset_lo, offset_hi, BLOCK).to(COMPUTE)
        y = tl.fma(y_scale, eps_t, x)
        if CORRELATED:
            x_t = tl.fma(eps_p_scale, eps_p, tl.fma(eps_t_scale, eps_t, x))
        else:
            x_t = tl.fma(eps_p_scale, eps_p, x)
        store(y_ptr + out + c * HW, y, mask, "evict_first")
        store(x_t_ptr + out + c * HW, x_t, mask, "evict_first")
        store(target_ptr + out + c * HW, (x_t - x) * inv_sqrt_g, mask, "evict_first")


@triton.jit
def _sample_tiles(program, b, sigma_r2, sigma_s2, t0, min_var, x0_ptr, eps_t_ptr, eps_p_ptr, sched_ptr, y_ptr, x_t_ptr,
                  tau_ptr, target_ptr, HW, W, sb, sc, sh, sw, seed, offset_lo, offset_hi, C: tl.constexpr,
                  T: tl.constexpr, COMPUTE: tl.constexpr, LAYOUT: tl.constexpr, EVEN: tl.constexpr,
                  EPS_T_TENSOR: tl.constexpr, EPS_PRIME_TENSOR: tl.constexpr, CORRELATED: tl.constexpr,
                  PER_CHANNEL: tl.constexpr, MIN_VAR: tl.constexpr, BLOCK: tl.constexpr):
    """Sample programs: the SAMPLE_TILES tiles of sample program `program` of image b."""
    for t in tl.static_range(_SAMPLE_TILES):
        _sample_tile((program * _SAMPLE_TILES + t) * BLOCK, b, sigma_r2, sigma_s2, min_var, t0, x0_ptr, eps_t_ptr,
                     eps_p_ptr, sched_ptr, y_ptr, x_t_ptr, tau_ptr, target_ptr, HW, W, sb, sc, sh, sw, seed, offset_lo,
                     offset_hi, C, T, COMPUTE, LAYOUT, EVEN, EPS_T_TENSOR, EPS_PRIME_TENSOR, CORRELATED, PER_CHANNEL,
                     MIN_VAR, BLOCK)


@triton.jit
def _ordered_slots(sync_ptr, end_image):
    """The ordered launch's slots after the two-pass ones: ticket counter, images whose tau*max is ready (one
    t0 per batch), images finished, then per image its finished sample programs."""
    return sync_ptr + 1 + 3 * end_image


@triton.jit(do_not_specialize=["seed", "offset_lo", "offset_hi"])
def _training_sample_kernel(x0_ptr, eps_t_ptr, eps_p_ptr, sigma_r_ptr, sigma_s_ptr, u_ptr, sched_ptr, y_ptr, x_t_ptr,
                            tau_ptr, target_ptr, sync_ptr, HW, W, sb, sc, sh, sw, first_image, end_image,
                            min_var: tl.float64, seed, offset_lo, offset_hi,
                            C: tl.constexpr, T: tl.constexpr, COMPUTE: tl.constexpr, LAYOUT: tl.constexpr,
                            WIDE: tl.constexpr, EVEN: tl.constexpr, EPS_T_TENSOR: tl.constexpr,
                            EPS_PRIME_TENSOR: tl.constexpr, CORRELATED: tl.constexpr, PER_CHANNEL: tl.constexpr,
                            BATCH_T0: tl.constexpr, MIN_VAR: tl.constexpr, PHASE: tl.constexpr,
                            BLOCK: tl.constexpr):
    # images first_image ... end_image - 1. Two-pass, grid (tiles / SAMPLE_TILES, rows): the sample phase one
    # image per row, the max phase as many as fit (_max_tiles). sync (int64): [batch tau*max | per image: max
    # x0, finished max programs, tau*max], floats as _bits; the ordered launch's slots follow
    # (_ordered_slots). EVEN: MAX_TILES * BLOCK divides H * W.
    min_var = tl.full([], min_var, COMPUTE)
    if PHASE == _MAX_PHASE:
        _max_tiles(x0_ptr, sigma_r_ptr, sigma_s_ptr, sched_ptr, sync_ptr, tl.program_id(0), tl.num_programs(0),
                   tl.program_id(1), first_image, end_image, HW, W, sb, sc, sh, sw, min_var, C, T, COMPUTE, LAYOUT,
                   WIDE, EVEN, BATCH_T0, MIN_VAR, False, BLOCK)
    elif PHASE == _SAMPLE_PHASE:
        b = first_image + tl.program_id(1)
        if WIDE:
            b = b.to(tl.int64)
        sigma_r2, sigma_s2 = _sigmas2(sigma_r_ptr, sigma_s_ptr, b, COMPUTE)
        tau_star_max = _float(tl.load(sync_ptr if BATCH_T0 else sync_ptr + 3 + 3 * b), COMPUTE)
        t0 = tl.load(u_ptr + b).to(COMPUTE) * tau_star_max
        _sample_tiles(tl.program_id(0), b, sigma_r2, sigma_s2, t0, min_var, x0_ptr, eps_t_ptr, eps_p_ptr, sched_ptr,
                      y_ptr, x_t_ptr, tau_ptr, target_ptr, HW, W, sb, sc, sh, sw, seed, offset_lo, offset_hi, C, T,
                      COMPUTE, LAYOUT, EVEN, EPS_T_TENSOR, EPS_PRIME_TENSOR, CORRELATED, PER_CHANNEL, MIN_VAR, BLOCK)
    else:
        # both phases, grid (tiles / SAMPLE_TILES, max rows + images): a program's part is the ticket it takes,
        # the max rows' first, so a sample program waits only for max programs already running, whatever
        # order the GPU starts programs in
        slots = _ordered_slots(sync_ptr, end_image)
        images = end_image - first_image
        programs = tl.num_programs(0)
        ticket = tl.atomic_add(slots, 1, sem="relaxed").to(tl.int32)
        row = _small_div(ticket, programs)
        program = ticket - row * programs
        max_rows = tl.num_programs(1) - images
        if row < max_rows:
            _max_tiles(x0_ptr, sigma_r_ptr, sigma_s_ptr, sched_ptr, sync_ptr, program, programs, row, first_image,
                       end_image, HW, W, sb, sc, sh, sw, min_var, C, T, COMPUTE, LAYOUT, WIDE, EVEN, BATCH_T0,
                       MIN_VAR, True, BLOCK)
        else:
            b = first_image + row - max_rows
            if WIDE:
                b = b.to(tl.int64)
            image_sync = sync_ptr + 1 + 3 * b
            sigma_r2, sigma_s2 = _sigmas2(sigma_r_ptr, sigma_s_ptr, b, COMPUTE)
            # wait for tau*max, then read it through L2, where the atomics went
            if BATCH_T0:
                while tl.atomic_add(slots + 1, 0, sem="acquire") < images:
                    pass
                tau_star_max = tl.atomic_max(sync_ptr, 0, sem="relaxed")
            else:
                groups = tl.cdiv(programs, _MAX_TILES // _SAMPLE_TILES)
                while tl.atomic_add(image_sync + 1, 0, sem="acquire") <= groups:   # groups + 1 once ready
                    pass
                tau_star_max = tl.atomic_max(image_sync + 2, 0, sem="relaxed")
            t0 = tl.load(u_ptr + b).to(COMPUTE) * _float(tau_star_max, COMPUTE)
            _sample_tiles(program, b, sigma_r2, sigma_s2, t0, min_var, x0_ptr, eps_t_ptr, eps_p_ptr, sched_ptr, y_ptr,
                          x_t_ptr, tau_ptr, target_ptr, HW, W, sb, sc, sh, sw, seed, offset_lo, offset_hi, C, T,
                          COMPUTE, LAYOUT, EVEN, EPS_T_TENSOR, EPS_PRIME_TENSOR, CORRELATED, PER_CHANNEL, MIN_VAR,
                          BLOCK)
            # the last program to finish leaves every slot zero for the next launch (_workspace)
            if tl.atomic_add(slots + 3 + b, 1, sem="acq_rel") == programs - 1:
                tl.store(image_sync, 0)
                tl.store(image_sync + 1, 0)
                tl.store(image_sync + 2, 0)
                tl.store(slots + 3 + b, 0)
                if tl.atomic_add(slots + 2, 1, sem="acq_rel") == images - 1:
                    tl.store(sync_ptr, 0)
                    tl.store(slots, 0)
                    tl.store(slots + 1, 0)
                    tl.store(slots + 2, 0)


def _launch_limits(shape: tuple, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(images per chunk: those whose x0 fits in L2_SHARE of the L2 cache, the most programs an ordered launch
    has: one per SM) on `device`; off the GPU the whole batch and an H100's 132 SMs."""
    if device.type != "cuda":
        return shape[0], 132
    properties = torch.cuda.get_device_properties(device)
    image_bytes = math.prod(shape[1:]) * dtype.itemsize
    return max(1, int(properties.L2_cache_size * L2_SHARE) // max(1, image_bytes)), properties.multi_processor_count


@functools.lru_cache(maxsize=64)
def _plan(shape, strides, dtype, device, T, eps_t_tensor, eps_prime_tensor, correlated, per_channel, batch_t0, min_var):
    """(the launches as (grid, integer arguments, constexprs), the sync's size, whether the launch is an ordered
    one) on x0 of this shape, strides and dtype on `device` (eps_T and eps' take x0's strides too)."""
    B, C, H, W = shape
    chunk, ordered_programs = _launch_limits(shape, dtype, device)
    tiles, _ = grid(H * W, B)
    programs = -(-tiles // SAMPLE_TILES)
    images_per_max_row = programs // -(-programs // (MAX_TILES // SAMPLE_TILES))
    constants = dict(
        C=C, T=T, COMPUTE=TL_DTYPE[compute_dtype(dtype)], LAYOUT=plane_layout(shape, strides),
        WIDE=wide_offsets(shape, strides), EVEN=H * W % (MAX_TILES * BLOCK) == 0, EPS_T_TENSOR=eps_t_tensor,
        EPS_PRIME_TENSOR=eps_prime_tensor, CORRELATED=correlated, PER_CHANNEL=per_channel, BATCH_T0=batch_t0,
        MIN_VAR=min_var, BLOCK=BLOCK)
    sizes = (H * W, W, *strides)
    max_rows = -(-B // images_per_max_row)
    if (batch_t0 or chunk >= B) and programs * (max_rows + B) <= ordered_programs:
        return [((programs, max_rows + B), (*sizes, 0, B), {**constants, "PHASE": ORDERED})], 4 + 4 * B, True
    # per chunk (one t0 per batch: the whole batch), the max phase then the sample phase, which reads x0 again
    # from L2
    chunk = B if batch_t0 else chunk
    launches = []
    for first in range(0, B, chunk):
        end = min(first + chunk, B)
        launches += [((programs, -(-(end - first) // images_per_max_row)), (*sizes, first, end),
                      {**constants, "PHASE": MAX_PHASE}),
                     ((programs, end - first), (*sizes, first, end), {**constants, "PHASE": SAMPLE_PHASE})]
    return launches, 1 + 3 * B, False


def _workspace(x0: torch.Tensor, size: int) -> torch.Tensor:
    """`size` int64 zeros for an ordered launch's sync on x0's device. The launch leaves them zero, so one
    workspace per device and stream serves every launch that stream runs one after another (on the CPU the
    interpreter finishes a launch before the next). A launch being captured into a CUDA graph gets a workspace
    of its own: the graph may be replayed on another stream, beside launches on this one."""
    if x0.is_cuda:
        index = x0.get_device()
        if torch.cuda.is_current_stream_capturing():
            return x0.new_zeros(size, dtype=torch.int64)
        key = (index, driver.active.get_current_stream(index))
    else:
        key = x0.device
    found = _WORKSPACES.get(key)
    if found is None or found.numel() < size:
        found = _WORKSPACES[key] = x0.new_zeros(size, dtype=torch.int64)
    return found


def training_sample(x0, sigma_r, sigma_s, u, table, correlated, eps_T, eps_prime, seed, offset, per_channel, batch_t0,
                    min_std):
    """training_sample on checked arguments (see svnr_fast.reference._training_sample; the flags are bools)."""
    B, C, H, W = x0.shape
    y = torch.empty_like(x0, memory_format=torch.contiguous_format)
    x_t = torch.empty_like(y)
    target = torch.empty_like(y)
    tau = y.new_empty((B, C if per_channel else 1, H, W), dtype=compute_dtype(x0.dtype))
    if x0.numel() == 0:
        return y, x_t, tau, target
    launches, sync_size, ordered = _plan(x0.shape, x0.stride(), x0.dtype, x0.device, table.numel() - 1,
                                         eps_T is not None, eps_prime is not None, correlated, per_channel, batch_t0,
                                         min_std > 0)
    tensors = (x0, like_strides(eps_T, x0) if eps_T is not None else x0,
               like_strides(eps_prime, x0) if eps_prime is not None else x0, sigma_r, sigma_s, u,
               prepared_schedule(table), y, x_t, tau, target,
               _workspace(x0, sync_size) if ordered else x0.new_zeros(sync_size, dtype=torch.int64))
    scalars = (float(min_std) ** 2, seed, *split_offset(offset))
    for grid_, ints, constants in launches:
        launch(_training_sample_kernel, grid_, x0, (*tensors, *ints, *scalars), constants)
    return y, x_t, tau, target
