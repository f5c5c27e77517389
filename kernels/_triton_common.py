"""What the SVNR Triton kernels share: the prepared schedule and its lookups, in-kernel normals, addressing.

Image kernels run one program per (tile of pixels, image) and walk the channels inside (the channel count
is a compile-time constant), so per-pixel work (table lookups, time maps) is done once per pixel, not
once per channel. An input with a dense or channels_last layout is addressed as `pixel * stride`,
any other as `h * stride_h + w * stride_w` (one integer division per pixel); offsets are int32 unless a
tensor spans 2**31 elements or more. Outputs are contiguous, as the fake kernels in svnr_fast/ops/
declare.

Arithmetic follows svnr_fast/reference.py operation by operation, bit for bit, where a result decides
which pixels are finished (the time lookups and gamma: no FMA contraction, launched with
`enable_fp_fusion=False`) or depends on the rounding without bound (the 1 - g / g* of the bridge and of
the reverse step, whose square root magnifies any difference where it nears 0). Elsewhere float32 uses
the GPU's approximate square root and reciprocal square root (about 1 ulp), which keeps results within
a few ulp of the reference; float64 stays IEEE throughout.

The schedule a kernel reads is `prepared_schedule(table)`: the table as 64-bit records and an index
that inverts gamma in O(1) (see `prepared_schedule`), built once per table and cached.
"""
import collections
import contextlib
import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from ._launch import launcher

BLOCK = 512           # pixels per program: 4 per thread, one 128-bit access per float32 tensor
NUM_WARPS = 4
LAUNCH = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}

TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}

# The interpreter runs the kernels with NumPy: no GPU intrinsics there, and its float -> bfloat16
# conversion truncates. Kernels take the portable path under it.
INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))

# Layouts of an image tensor's (H, W) plane
ROWS_PACKED = 0   # pixel hw = h * W + w sits at hw * stride_w (dense NCHW: stride_w = 1; channels_last: C)
GENERAL = 1       # anything else: h * stride_h + w * stride_w


# ---------------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------------

@triton.jit
def sqrt_(x):
    """Square root: IEEE in float64, the hardware approximation (about 1 ulp) in float32."""
    return tl.sqrt(x)


@triton.jit
def rsqrt_(x):
    """1 / sqrt(x): IEEE in float64, the hardware approximation (about 1 ulp) in float32."""
    if x.dtype == tl.float64:
        return 1.0 / tl.sqrt(x)
    else:
        return tl.rsqrt(x)


@triton.jit
def div_rn(x, y):
    """x / y, IEEE (the rounding of r = g / g* in the bridge and the reverse step is not negligible: see
    their 1 - r)."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


# ---------------------------------------------------------------------------------------------------
# The prepared schedule: 64-bit records read by the lookups
# ---------------------------------------------------------------------------------------------------
#
# Record i is two numbers a, b: in float32 one int64 (a in the low word, b in the high word: one 64-bit
# load), in float64 two int64. Sections, in records (T = len(table) - 1, M = T + 1, S = 4 (T + 1)):
#   header    2      (g[0], M / (g[T] - g[0])), (refinement steps beyond the first, g[T])
#   segments  T      (g[k], g[k + 1] - g[k])               gamma: g[k] + frac * (g[k + 1] - g[k])
#   inverse   T      (1 / (s (g[k + 1] - g[k])), s (g[k + 1] - g[k]))   tau: k + (v - g[k]) / (g[k + 1] - g[k])
#                    with s = _QUOTIENT_SCALE (see time_lookup)
#   coarse    M      (first sub-bin of bin j, sub-bins of bin j as a float)
#   sub-bins  S + 1  (k0, g[k0 + 1] or +inf when k0 = T - 1)

# float32 tables with steps in [2**-149, 2**63] (float64: [2**-1074, 2**511]) invert exactly
QUOTIENT_SCALE = (2.0**64, 2.0**512)
_QUOTIENT_SCALE = tl.constexpr(QUOTIENT_SCALE)


@triton.jit
def _record(ptr, i, COMPUTE: tl.constexpr):
    """Record i as (a, b), both as COMPUTE bit patterns (bitcast them to what they hold)."""
    if COMPUTE == tl.float64:
        return tl.load(ptr + 2 * i), tl.load(ptr + 2 * i + 1)
    else:
        e = tl.load(ptr + i)
        return e.to(tl.int32), (e >> 32).to(tl.int32)


@triton.jit
def _section(ptr, first_record, COMPUTE: tl.constexpr):
    """Pointer to record `first_record` (a uniform base the per-value record index is then added to)."""
    if COMPUTE == tl.float64:
        return ptr + 2 * first_record
    else:
        return ptr + first_record


@triton.jit
def _float_record(ptr, i, COMPUTE: tl.constexpr):
    a, b = _record(ptr, i, COMPUTE)
    return a.to(COMPUTE, bitcast=True), b.to(COMPUTE, bitcast=True)


@triton.jit
def _sections(T: tl.constexpr):
    """Record offsets of (segments, inverse, coarse, sub-bins) and the coarse bin count M."""
    SEGMENTS: tl.constexpr = 2
    INVERSE: tl.constexpr = SEGMENTS + T
    COARSE: tl.constexpr = INVERSE + T
    M: tl.constexpr = T + 1
    SUB: tl.constexpr = COARSE + M
    return SEGMENTS, INVERSE, COARSE, SUB, M


@triton.jit
def gamma_lookup(tau, sched_ptr, T: tl.constexpr, IN_RANGE: tl.constexpr = False):
    """gamma(tau): the piecewise-linear table at tau, clamped to [0, T] (IN_RANGE: tau is known to lie
    there); as reference._gamma, bit for bit."""
    SEGMENTS, INVERSE, COARSE, SUB, M = _sections(T)
    if not IN_RANGE:
        tau = tl.minimum(tl.maximum(tau, 0.0), T)
    k = tl.minimum(tl.floor(tau), T - 1)
    frac = tau - k
    g_lo, g_step = _float_record(_section(sched_ptr, SEGMENTS, tau.dtype), k.to(tl.int32), tau.dtype)
    return g_lo + frac * g_step


@triton.jit
def time_lookup(v, sched_ptr, T: tl.constexpr):
    """tau(v), the exact inverse of gamma_lookup: k + (v - g[k]) / (g[k + 1] - g[k]) with k the last index in
    [0, T - 1] with g[k] <= v (k = 0 when none is), clamped to [0, T]; as reference._time_from_variance.
    Returns (tau, v clamped to [g[0], g[T]]): the second is gamma(tau) up to rounding, for free.

    O(1): v picks a coarse bin (M equal bins over [g[0], g[T]]), then one of that bin's equal sub-bins, whose
    record holds k0, the smallest k of any v in it, and g[k0 + 1]; one comparison gives k. Tables whose
    knots crowd closer than the sub-bins resolve take more steps (a loop whose count the header holds;
    none for the default schedule). Every step reads a few KB that stay in L1.
    """
    COMPUTE: tl.constexpr = v.dtype
    SEGMENTS, INVERSE, COARSE, SUB, M = _sections(T)
    g0, inv_bin = _float_record(sched_ptr, 0, COMPUTE)
    extra_steps, g_last = _record(sched_ptr, 1, COMPUTE)
    # below g[0] tau is 0 and above g[T] it is T: v clamped to [g[0], g[T]] gives both
    v = tl.minimum(tl.maximum(v, g0), g_last.to(COMPUTE, bitcast=True))
    # the index arithmetic, exactly as prepared_schedule simulates it for the knots
    x = (v - g0) * inv_bin
    bin_ = tl.minimum(tl.floor(x), M - 1)
    first_sub, n_sub = _record(_section(sched_ptr, COARSE, COMPUTE), bin_.to(tl.int32), COMPUTE)
    sub = first_sub.to(tl.int32) + ((x - bin_) * n_sub.to(COMPUTE, bitcast=True)).to(tl.int32)
    k0, g_next = _record(_section(sched_ptr, SUB, COMPUTE), sub, COMPUTE)
    k = k0.to(tl.int32) + (g_next.to(COMPUTE, bitcast=True) <= v).to(tl.int32)
    for _ in range(extra_steps):
        g_after, _step = _float_record(_section(sched_ptr, SEGMENTS, COMPUTE), tl.minimum(k + 1, T - 1), COMPUTE)
        k += ((g_after <= v) & (k < T - 1)).to(tl.int32)
    g_k, _step = _float_record(_section(sched_ptr, SEGMENTS, COMPUTE), k, COMPUTE)
    inv_step, step = _float_record(_section(sched_ptr, INVERSE, COMPUTE), k, COMPUTE)
    # the IEEE quotient (v - g[k]) / (g[k + 1] - g[k]) without a division (Markstein): q = a * RN(1 / step)
    # is within an ulp, one FMA residual step rounds it correctly, so tau (and which pixels land on 0) is
    # the reference's bit for bit. a and step are scaled by a power of two that keeps the residual out of
    # the subnormal range; 0 <= a <= step, so nothing overflows.
    a = (v - g_k) * _QUOTIENT_SCALE[COMPUTE == tl.float64]
    q = a * inv_step
    return k.to(COMPUTE) + tl.fma(tl.fma(-q, step, a), inv_step, q), v


# ---------------------------------------------------------------------------------------------------
# Normals
# ---------------------------------------------------------------------------------------------------

# Philox rounds of the in-kernel noise. Salmon et al. (SC 2011, "Parallel random numbers: as easy as
# 1, 2, 3") find 7 rounds of Philox-4x32 the fewest that pass TestU01's BigCrush and recommend 10 as a
# safety margin; 7 takes 12 instructions per four normals off the drawn-noise paths (about 0.2 warp-
# instructions per element of training_sample), which keeps them memory-bound in bfloat16. The normality
# and stream-independence tests pass with either.
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def philox(c0, c1, c2, c3, k0, k1, ROUNDS: tl.constexpr = PHILOX_ROUNDS):
    """Philox-4x32-ROUNDS (the same function as tl.philox with n_rounds=ROUNDS): each round's two
    32 x 32 -> 64-bit products as one wide multiply each (tl.philox spends a mul and a mulhi on each)."""
    for _ in tl.static_range(ROUNDS):
        p0 = c0.to(tl.uint64) * 0xD2511F53
        p2 = c2.to(tl.uint64) * 0xCD9E8D57
        c0, c1, c2, c3 = ((p2 >> 32).to(tl.uint32) ^ c1 ^ k0, p2.to(tl.uint32),
                          (p0 >> 32).to(tl.uint32) ^ c3 ^ k1, p0.to(tl.uint32))
        k0 += 0x9E3779B9
        k1 += 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def box_muller(bits_a, bits_b):
    """Two independent N(0, 1) draws from two random uint32: radius sqrt(-2 ln u), u = (a + 1/2) / 2**32 in
    (0, 1) (so |z| < 6.7), angle 2 pi (b / 2**32 - 1/2 for b read as int32), in [-pi, pi). On the GPU the
    log, sine and cosine are the hardware approximations (absolute error < 4e-6 in the draws)."""
    u = tl.fma(bits_a.to(tl.float32), 2.3283064365386963e-10, 1.1641532182693481e-10)
    angle = bits_b.to(tl.int32, bitcast=True).to(tl.float32) * 1.4629180792671596e-09
    if INTERPRETED:
        radius = tl.sqrt(-1.3862943611198906 * tl.log2(u))
        return radius * tl.cos(angle), radius * tl.sin(angle)
    else:
        radius = tl.sqrt(-1.3862943611198906 * libdevice.fast_log2f(u))
        return radius * libdevice.fast_cosf(angle), radius * libdevice.fast_sinf(angle)


@triton.jit
def normals(seed, tile_start, stream, offset_lo, offset_hi, BLOCK: tl.constexpr):
    """N(0, 1) float32 draws for the pixels tile_start + [0, BLOCK) of one stream (e.g. one image channel).

    One Philox call per four consecutive pixels: key = seed (64 bits), counter = (pixel // 4, stream,
    offset_lo, offset_hi). The offset has counter words of its own, so distinct offsets give independent
    streams, not shifted copies of one stream; a draw depends on (seed, offset, stream, pixel) only, not
    on BLOCK or on the memory layout. tile_start is a multiple of 4.
    """
    quad = (tile_start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    zero = quad * 0
    seed = seed.to(tl.uint64)
    r0, r1, r2, r3 = philox(quad, zero + tl.cast(stream, tl.uint32), zero + offset_lo.to(tl.uint32),
                            zero + offset_hi.to(tl.uint32), (seed & 0xFFFFFFFF).to(tl.uint32),
                            (seed >> 32).to(tl.uint32))
    n0, n1 = box_muller(r0, r1)
    n2, n3 = box_muller(r2, r3)
    # pixel 4 q + j takes n_j of quad q: each thread's four consecutive pixels, no data movement
    return tl.reshape(tl.join(tl.join(n0, n1), tl.join(n2, n3)), [BLOCK])


# ---------------------------------------------------------------------------------------------------
# Addressing, loads and stores
# ---------------------------------------------------------------------------------------------------

@triton.jit
def tile(BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """(image b, first pixel, pixels hw) of this program: grid (tiles, images); int64 when WIDE. Its mask is
    `None if EVEN else hw < HW`, EVEN when BLOCK divides H * W (a jit function cannot return None)."""
    b = tl.program_id(1)
    start = tl.program_id(0) * BLOCK
    if WIDE:
        b = b.to(tl.int64)
    return b, start, start + tl.arange(0, BLOCK)


@triton.jit
def plane_offsets(hw, W, stride_h, stride_w, LAYOUT: tl.constexpr):
    """Element offsets of pixels hw = h * W + w inside one (H, W) plane of a strided tensor."""
    if LAYOUT == 0:   # ROWS_PACKED
        return hw * stride_w
    else:
        h = hw // W
        return h * stride_h + (hw - h * W) * stride_w


@triton.jit
def load(ptr, mask, COMPUTE: tl.constexpr, EVICT: tl.constexpr = ""):
    """tl.load in the compute dtype; masked lanes read 0. mask None: every lane reads."""
    if mask is None:
        return tl.load(ptr, eviction_policy=EVICT).to(COMPUTE)
    else:
        return tl.load(ptr, mask=mask, other=0.0, eviction_policy=EVICT).to(COMPUTE)


@triton.jit
def store(ptr, value, mask, EVICT: tl.constexpr = ""):
    """tl.store with rounding to nearest-even into bfloat16: the GPU's conversion rounds so, the
    interpreter's truncates, so there it is done by hand. Values are finite (the ops reject NaN/inf)."""
    if INTERPRETED and ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        value = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask, eviction_policy=EVICT)


# ---------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------

def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _words(values: torch.Tensor) -> torch.Tensor:
    """A float or int tensor's bit patterns as int64 (zero-extended 32-bit words in float32 mode)."""
    if values.element_size() == 8:
        return values.view(torch.int64) if values.is_floating_point() else values.to(torch.int64)
    words = values.view(torch.int32) if values.is_floating_point() else values.to(torch.int32)
    return words.to(torch.int64) & 0xFFFFFFFF


def _records(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Records (a, b) as _record reads them: (n,) int64 for 32-bit values, (n, 2) int64 for 64-bit ones."""
    if a.element_size() == 8 or b.element_size() == 8:
        return torch.stack([_words(a), _words(b)], dim=1)
    return _words(a) | (_words(b) << 32)


def _build_schedule(table: torch.Tensor) -> torch.Tensor:
    """The records of `prepared_schedule`, built on the table's device with no host synchronisation.

    The inverse's index: M = T + 1 equal coarse bins over [g[0], g[T]]; bin j gets n_j equal sub-bins,
    about twice as many as the narrowest table segment touching it needs to hold at most one knot, within
    a budget of S sub-bins in all. Where v lands is simulated for every knot g[1..T-1] with the kernel's
    own float arithmetic; a sub-bin's k0 is the number of knots landing in earlier sub-bins, which is the
    k of the smallest v that lands in it, and the most knots landing in one sub-bin is the number of
    refinement steps the kernel must take. So the kernel's k equals searchsorted's for every v, whatever
    the rounding, for any strictly increasing table (the tests check a table with a 1-ulp step).
    """
    dtype, T = table.dtype, table.numel() - 1
    M, S = T + 1, 4 * (T + 1)
    g = table
    g0 = g[0]
    inv_bin = M / (g[T] - g0)
    step = g[1:] - g[:-1]
    quotient_scale = QUOTIENT_SCALE[dtype == torch.float64]

    def coarse_position(v):   # v in [g[0], g[T]]
        x = (v - g0) * inv_bin
        return x, torch.clamp(x.floor(), max=M - 1)

    # sub-bins per coarse bin: 2 * bin width / the narrowest segment with an end in the bin, at least 1
    _, bins = coarse_position(g)
    bins = bins.long()
    narrowest = torch.full((M,), float("inf"), dtype=dtype, device=g.device)
    narrowest.scatter_reduce_(0, bins[:-1], step, "amin")
    narrowest.scatter_reduce_(0, bins[1:], step, "amin")
    wanted = (2 / (inv_bin * narrowest)).clamp(0, 2.0**24)
    scale = (S - M) / torch.clamp(wanted.sum(), min=S - M)
    n_sub = 1 + (wanted * scale).floor()          # sum(n_sub) <= S
    first_sub = torch.cumsum(n_sub, 0) - n_sub

    # where each knot lands, with the kernel's arithmetic; k0 of a sub-bin = knots landing before it
    x, bin_ = coarse_position(g[1:T])
    landing = (first_sub[bin_.long()] + ((x - bin_) * n_sub[bin_.long()]).to(torch.int32)).long()
    landed = torch.zeros(S + 1, dtype=torch.int64, device=g.device).index_add_(
        0, landing, torch.ones_like(landing))
    k0 = torch.cumsum(landed, 0) - landed
    g_next = torch.where(k0 + 1 <= T - 1, g[torch.clamp(k0 + 1, max=T)], float("inf"))
    extra_steps = (landed.max() - 1).to(torch.int32 if dtype == torch.float32 else torch.int64).reshape(1)

    int_type = torch.int32 if dtype == torch.float32 else torch.int64
    n_sub = n_sub.to(dtype)
    return torch.cat([
        _records(g0.reshape(1), inv_bin.reshape(1)),
        _records(extra_steps, g[T].reshape(1)),
        _records(g[:T], step),
        _records(1 / (step * quotient_scale), step * quotient_scale),
        _records(first_sub.to(int_type), n_sub),
        _records(k0.to(int_type), g_next),
    ])


_PREPARED: "collections.OrderedDict" = collections.OrderedDict()
_PREPARED_MAX = 8


def prepared_schedule(table: torch.Tensor) -> torch.Tensor:
    """The records the lookups read (layout above `_record`), cached per table.

    Keyed by the table's (data_ptr, version, numel, device, dtype); the entry holds the table, so its
    memory cannot be reused by another table while the entry exists. Inference tensors have no version
    counter: an in-place change to one inside inference mode is not seen. While a CUDA graph is being
    captured nothing is cached (the build's memory belongs to the graph): the build is captured with it.
    """
    key = (table.data_ptr(), -1 if table.is_inference() else table._version, table.numel(), table.device,
           table.dtype)
    entry = _PREPARED.get(key)
    if entry is not None:
        _PREPARED.move_to_end(key)
        return entry[1]
    records = _build_schedule(table)
    if not (table.is_cuda and torch.cuda.is_current_stream_capturing()):
        _PREPARED[key] = (table, records)
        if len(_PREPARED) > _PREPARED_MAX:
            _PREPARED.popitem(last=False)
    return records


def wide_offsets(shape: tuple, strides: tuple) -> bool:
    """Whether a tensor of this shape with these strides, or a contiguous one, reaches element 2**31 (then
    offsets are computed in int64)."""
    extent = max(sum((n - 1) * abs(s) for n, s in zip(shape, strides)), math.prod(shape) - 1)
    return extent >= 2**31 - 1


def plane_layout(shape: tuple, strides: tuple) -> int:
    """ROWS_PACKED when pixel (h, w) of every plane sits at (h * W + w) * stride_w, else GENERAL."""
    H, W = shape[-2:]
    return ROWS_PACKED if H == 1 or strides[-2] == W * strides[-1] else GENERAL


def like_strides(t: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """t with model's strides (a copy only when they differ), so that one set of strides addresses both."""
    if t.stride() == model.stride():
        return t
    return torch.empty_strided(model.shape, model.stride(), dtype=t.dtype, device=t.device).copy_(t)


def split_offset(offset: int) -> tuple[int, int]:
    """The 64-bit RNG offset as two 32-bit counter words."""
    return offset & 0xFFFFFFFF, offset >> 32


def grid(HW: int, images: int) -> tuple[int, int]:
    """(tiles, images): the grid of an image kernel."""
    if images > 65535:
        raise ValueError(f"at most 65535 images per call, got {images}; split the batch")
    if HW > 2**30:
        raise ValueError(f"at most 2**30 pixels per image, got {HW}; split the image into tiles")
    return -(-HW // BLOCK), images


def run(kernel, grid: tuple, data: torch.Tensor, *args, **constants) -> None:
    """kernel[grid](*args) on the device of `data`: Triton launches on the current CUDA device, which
    need not be the data's (a custom op gets no device guard). Compiled kernels go through
    kernels/_launch.py (a few microseconds of Python where kernel[grid] takes ~20)."""
    launch(kernel, grid, data, args, constants)


def launch(kernel, grid: tuple, data: torch.Tensor, args: tuple, constants: dict) -> None:
    """run(kernel, grid, data, *args, **constants) with the constexprs in a dict an op keeps from call to call
    (neither packed again here, nor unpacked)."""
    fast = launcher(kernel, LAUNCH)
    if fast is not None:
        fast(grid, data.get_device(), args, constants)
        return
    guard = torch.cuda.device(data.device) if data.is_cuda else contextlib.nullcontext()
    with guard:
        kernel[grid](*args, **constants, **LAUNCH)
