"""What the SVNR Triton kernels share: the schedule-table lookups, in-kernel normals, image addressing.

Image kernels run one program per (image b, tile of BLOCK pixels) and loop over the channels inside,
so per-pixel work (table lookups, time maps) is done once per pixel, not once per channel. Inputs keep
their own strides (channels_last and sliced tensors are read in place, never copied); outputs are
contiguous, as the fake kernels in svnr_fast/ops/ declare. A tensor whose (H, W) plane is dense
(stride_w = 1, stride_h = W) is read with plain `hw` offsets, which lets Triton vectorise; any other
layout pays one integer division per pixel to find (h, w).

Arithmetic follows svnr_fast/reference.py operation by operation (IEEE division and square root, no
FMA contraction: launch with `enable_fp_fusion=False`), so a kernel agrees with the eager reference to
a few ulp and both agree on which pixels are exactly finished (gamma = 0).
"""
import contextlib

import torch
import triton
import triton.language as tl

from ._launch import launcher

BLOCK = 512           # pixels per program: 4 per thread, one 128-bit access per float32 tensor
NUM_WARPS = 4
LAUNCH = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}

TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


# ---------------------------------------------------------------------------------------------------
# In-kernel helpers
# ---------------------------------------------------------------------------------------------------

@triton.jit
def sqrt_rn(x):
    """IEEE square root (tl.sqrt is the fast approximate one in float32)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def div_rn(x, y):
    """IEEE division in float32 (and float64)."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def gamma_lookup(tau, table_ptr, T):
    """gamma(tau): the piecewise-linear table at tau, clamped to [0, T]; as reference._gamma."""
    tau = tl.minimum(tl.maximum(tau, 0.0), T)
    k = tl.minimum(tl.floor(tau), T - 1)
    frac = tau - k
    k = k.to(tl.int32)
    g_lo = tl.load(table_ptr + k).to(tau.dtype)
    g_hi = tl.load(table_ptr + k + 1).to(tau.dtype)
    return g_lo + frac * (g_hi - g_lo)


@triton.jit
def time_lookup(v, table_ptr, T, search_top, n_search):
    """tau(v), the exact inverse of gamma_lookup; as reference._time_from_variance.

    Binary search for the last k in [0, T - 1] with table[k] <= v (k = 0 when none is): n_search =
    bit_length(T - 1) steps of sizes search_top, search_top / 2, ..., 1. The table is a few KB and
    stays in L1, so the steps cost cache hits, not DRAM traffic.
    """
    k = tl.zeros_like(v).to(tl.int32)
    for i in range(n_search):
        candidate = k + (search_top >> i)
        g = tl.load(table_ptr + candidate, mask=candidate <= T - 1, other=float("inf")).to(v.dtype)
        k = tl.where(g <= v, candidate, k)
    g_lo = tl.load(table_ptr + k).to(v.dtype)
    g_hi = tl.load(table_ptr + k + 1).to(v.dtype)
    tau = k.to(v.dtype) + div_rn(v - g_lo, g_hi - g_lo)
    return tl.minimum(tl.maximum(tau, 0.0), T)


@triton.jit
def sincos_2pi(u):
    """(sin 2 pi u, cos 2 pi u) for u in [0, 1]: reduction to [-pi/4, pi/4] and the float32 minimax
    polynomials of Cephes' sinf/cosf (about 1 ulp), a third of the instructions of libdevice's sinf + cosf,
    whose range reduction handles arguments this never sees."""
    q = tl.floor(u * 4 + 0.5)
    x = (u - q * 0.25) * 6.283185307179586
    x2 = x * x
    sin = x + x * x2 * tl.fma(tl.fma(x2, -1.9515295891e-4, 8.3321608736e-3), x2, -1.6666654611e-1)
    cos = 1 - 0.5 * x2 + x2 * x2 * tl.fma(tl.fma(x2, 2.443315711809948e-5, -1.388731625493765e-3), x2,
                                          4.166664568298827e-2)
    quadrant = q.to(tl.int32) & 3   # 2 pi u = quadrant * pi / 2 + x
    return (tl.where(quadrant == 0, sin, tl.where(quadrant == 1, cos, tl.where(quadrant == 2, -sin, -cos))),
            tl.where(quadrant == 0, cos, tl.where(quadrant == 1, -sin, tl.where(quadrant == 2, -cos, sin))))


@triton.jit
def box_muller(bits_a, bits_b):
    """Two independent N(0, 1) draws from two random uint32 (|z| < 5.7: u is kept >= 1e-7 as in tl.randn)."""
    radius = tl.sqrt(-2.0 * tl.log(tl.maximum(tl.uint_to_uniform_float(bits_a), 1.0e-7)))
    sin, cos = sincos_2pi(tl.uint_to_uniform_float(bits_b))
    return radius * cos, radius * sin


@triton.jit
def normals(seed, tile_start, stream, offset_lo, offset_hi, BLOCK: tl.constexpr):
    """N(0, 1) float32 draws for the pixels tile_start + [0, BLOCK) of one stream (e.g. one image channel).

    One Philox-4x32-10 call per four consecutive pixels: key = seed (64 bits), counter = (pixel // 4,
    stream, offset_lo, offset_hi). The offset has counter words of its own, so distinct offsets give
    independent streams, not shifted copies of one stream; a draw depends on (seed, offset, stream,
    pixel) only, not on BLOCK or on the memory layout. tile_start is a multiple of 4.
    """
    quad = (tile_start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    zero = quad * 0
    r0, r1, r2, r3 = tl.philox(seed, quad, zero + tl.cast(stream, tl.uint32), zero + offset_lo.to(tl.uint32),
                               zero + offset_hi.to(tl.uint32))
    n0, n1 = box_muller(r0, r1)
    n2, n3 = box_muller(r2, r3)
    # pixel 4 q + j takes n_j of quad q: each thread's four consecutive pixels, no data movement
    return tl.reshape(tl.join(tl.join(n0, n1), tl.join(n2, n3)), [BLOCK])


@triton.jit
def store(ptr, value, mask):
    """tl.store with float32 -> bfloat16 rounding to nearest-even done by hand: the GPU rounds so, the
    interpreter's conversion truncates. Values are finite (the ops reject NaN/inf inputs)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        value = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(ptr, value, mask=mask)


@triton.jit
def plane_offsets(hw, W, stride_h, stride_w, DENSE_PLANE: tl.constexpr):
    """Element offsets of pixels hw = h * W + w inside one (H, W) plane of a strided tensor."""
    if DENSE_PLANE:
        return hw
    else:
        h = hw // W
        return h * stride_h + (hw - h * W) * stride_w


@triton.jit
def load_channel(ptr, image_base, stride_c, plane, mask, c, C, other, COMPUTE: tl.constexpr):
    """Channel c of one tile of pixels (`other` where masked or c >= C)."""
    mask = tl.where(c < C, mask, False)   # not `mask & (c < C)`: the interpreter turns that into int32
    c = tl.cast(c, tl.int64)
    return tl.load(ptr + image_base + c * stride_c + plane, mask=mask, other=other).to(COMPUTE)


@triton.jit
def channel_max(ptr, image_base, stride_c, plane, mask, C, COMPUTE: tl.constexpr):
    """max over the C channels of each pixel (masked pixels give -inf); four channels' loads in flight at once."""
    result = tl.full(plane.shape, float("-inf"), COMPUTE)
    for c in range(0, C, 4):
        v0 = load_channel(ptr, image_base, stride_c, plane, mask, c, C, float("-inf"), COMPUTE)
        v1 = load_channel(ptr, image_base, stride_c, plane, mask, c + 1, C, float("-inf"), COMPUTE)
        v2 = load_channel(ptr, image_base, stride_c, plane, mask, c + 2, C, float("-inf"), COMPUTE)
        v3 = load_channel(ptr, image_base, stride_c, plane, mask, c + 3, C, float("-inf"), COMPUTE)
        result = tl.maximum(tl.maximum(result, tl.maximum(v0, v1)), tl.maximum(v2, v3))
    return result


# ---------------------------------------------------------------------------------------------------
# Host-side helpers
# ---------------------------------------------------------------------------------------------------

def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def table_args(table: torch.Tensor) -> tuple[int, int, int]:
    """(T, search_top, n_search) for time_lookup on a table of T + 1 entries."""
    return table_size_args(table.numel())


def table_size_args(size: int) -> tuple[int, int, int]:
    """table_args of a table of `size` entries."""
    T = size - 1
    n_search = (T - 1).bit_length()
    return T, (1 << (n_search - 1)) if n_search else 0, n_search


def dense_plane(t: torch.Tensor) -> bool:
    """Whether pixel (h, w) of every (b, c) plane of `t` sits at offset h * W + w."""
    return dense_strides(t.shape, t.stride())


def dense_strides(shape: tuple, strides: tuple) -> bool:
    """dense_plane of a tensor with this shape and these strides."""
    H, W = shape[-2:]
    return (W == 1 or strides[-1] == 1) and (H == 1 or strides[-2] == W)


def image_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def split_offset(offset: int) -> tuple[int, int]:
    """The 64-bit RNG offset as two 32-bit counter words."""
    return offset & 0xFFFFFFFF, offset >> 32


def run(kernel, grid: tuple, data: torch.Tensor, *args, **constants) -> None:
    """kernel[grid](*args) on the device of `data`: Triton launches on the current CUDA device, which
    need not be the data's (a custom op gets no device guard). Compiled kernels go through
    kernels/_launch.py (a few microseconds of Python where kernel[grid] takes ~20)."""
    fast = launcher(kernel, LAUNCH)
    if fast is not None:
        fast(grid, data.get_device(), args, constants)
        return
    guard = torch.cuda.device(data.device) if data.is_cuda else contextlib.nullcontext()
    with guard:
        kernel[grid](*args, **constants, **LAUNCH)


def tiles(HW: int) -> int:
    return -(-HW // BLOCK)   # triton.cdiv, without its constexpr unwrapping (a microsecond a call)
