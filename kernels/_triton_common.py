"""What the SVNR Triton kernels share: the schedule-table lookups, in-kernel normals, image addressing.

Image kernels run one program per (image b, tile of BLOCK pixels) and loop over the channels inside,
so per-pixel work (table lookups, time maps) is done once per pixel, not once per channel. Inputs keep
their own strides (channels_last and sliced tensors are read in place, never copied); outputs are
contiguous, as the fake kernels in svnr_fast/ops.py declare. A tensor whose (H, W) plane is dense
(stride_w = 1, stride_h = W) is read with plain `hw` offsets, which lets Triton vectorise; any other
layout pays one integer division per pixel to find (h, w).

Arithmetic follows svnr_fast/reference.py operation by operation (IEEE division and square root, no
FMA contraction: launch with `enable_fp_fusion=False`), so a kernel agrees with the eager reference to
a few ulp and both agree on which pixels are exactly finished (gamma = 0).
"""
import torch
import triton
import triton.language as tl

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
def normals4(seed, c0, c1, offset_lo, offset_hi):
    """Four independent N(0, 1) float32 blocks from one Philox-4x32-10 call.

    Key = seed (64 bits); counter = (c0, c1, offset_lo, offset_hi): c0, c1 name the element group,
    the offset is a counter word of its own, so distinct offsets give independent streams rather than
    shifted copies of one stream. Box-Muller turns each pair of uniforms into two normals.
    """
    c0 = c0.to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, zero + c1.to(tl.uint32), zero + offset_lo.to(tl.uint32),
                               zero + offset_hi.to(tl.uint32))
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return n0, n1, n2, n3


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
    T = table.numel() - 1
    n_search = (T - 1).bit_length()
    return T, (1 << (n_search - 1)) if n_search else 0, n_search


def dense_plane(t: torch.Tensor) -> bool:
    """Whether pixel (h, w) of every (b, c) plane of `t` sits at offset h * W + w."""
    H, W = t.shape[-2:]
    return (W == 1 or t.stride(-1) == 1) and (H == 1 or t.stride(-2) == W)


def image_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def time_map_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(stride_b, stride_h, stride_w) of a (B, 1, H, W) time map."""
    sb, _, sh, sw = t.stride()
    return sb, sh, sw


def split_offset(offset: int) -> tuple[int, int]:
    """The 64-bit RNG offset as two 32-bit counter words."""
    return offset & 0xFFFFFFFF, offset >> 32


def tiles(HW: int) -> int:
    return triton.cdiv(HW, BLOCK)
