"""Static roofline of every GPU kernel (DESIGN.md §6), built on a machine without a GPU.

    python benchmarks/roofline.py                    # sm_90: a readable table (H100 and H200 models)
    python benchmarks/roofline.py --json             # the same rows as JSON
    python benchmarks/roofline.py --arch 80          # sm_80 (A100 model)
    python benchmarks/roofline.py --out benchmarks/results   # writes roofline-sm90.md and roofline-sm90.json

Each op variant is compiled as a real launch at the GPU benchmark shape compiles it, for one architecture:
- Triton kernels (kernels/lookup.py, training_sample.py, reverse_step.py): the op's own launch function is
  called with meta tensors while `JITFunction.run` is intercepted, so the kernel, grid, arguments and
  compile options are exactly the launch's; they are specialised by Triton's own binder (pointers aligned as
  fresh allocations are) and compiled by `triton.compile` for GPUTarget("cuda", arch, 32).
- CUDA kernels (csrc/groupnorm_film_cuda.cu): nvcc -cubin with the flags CMakeLists.txt builds with; which
  template instances run, and their grid, block and dynamic shared memory, mirror the host code
  (groupnorm_film_forward_cuda / groupnorm_film_backward_cuda) at the UNet shapes.

Per kernel: registers, local memory (spills), shared memory and blocks per SM come from the cubin as built
(cuobjdump -res-usage, ptxas -v) and the SM's limits. Instructions executed come from the SASS, with source
lines (nvdisasm -gi), of the same PTX assembled again with every loop kept rolled (`.pragma "nounroll"`):
ptxas unrolls loops of unknown trip count into an unrolled loop plus remainder code, whose executions the
SASS alone cannot tell. Rolled, a source loop is one SASS loop; the count is then an upper bound of the
built code's by the loop overhead unrolling saves. Counted per thread:
- the control-flow graph is walked from the entry; calls to the slow-path subroutines (IEEE division and
  square root for special operands, 64-bit integer division when an operand needs more than 32 bits, none
  of which the benchmark data reach) and the divergent-warp fallbacks (BRA.DIV) are not counted;
- a loop is a backward branch; its body is multiplied by a trip count taken from the per-kernel facts below,
  found by the source line of the branch (the loop header), e.g. the time lookup's extra refinement steps,
  which the prepared default schedule's header gives (none). A compare-and-swap retry loop counts one try
  (no contention). A loop with no trip count stops the tool: it never guesses;
- a forward branch's skipped code counts as executed (an upper bound), except the guards the facts give a
  share for, e.g. the tau*max lookup that only an image's last max program of training_sample makes.
Instructions per element = per-thread count x threads launched / elements. On a GPU model:
issue time = warp instructions / (SMs x 4 schedulers x clock) (a lower bound: MUFU and FP64 issue at less
than one warp instruction per cycle), DRAM time = minimal bytes / measured copy bandwidth. An op is
memory-bound by construction when issue time <= 0.7 x DRAM time in float32 (1.0 x in bfloat16).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# The kernels must be compiled, not interpreted (tests set TRITON_INTERPRET=1 for the CPU).
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CUDA_SOURCE = ROOT / "csrc" / "groupnorm_film_cuda.cu"


# ---------------------------------------------------------------------------------------------------
# Device models
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_ghz: float
    copy_gb_per_s: float     # device-to-device copy, bytes read + written per second
    bandwidth_source: str

    def issue_us(self, warp_instructions: float) -> float:
        return warp_instructions / (self.sms * 4 * self.clock_ghz * 1e3)

    def dram_us(self, nbytes: float) -> float:
        return nbytes / (self.copy_gb_per_s * 1e3)


GPUS = {
    90: (Gpu("H100", 132, 1.98, 3000.0, "assumed: the kernels' docstrings' figure, ~90% of the 3.35 TB/s HBM3 "
             "peak as the H200 measures 88.5% of its 4.8 TB/s; not measured in this project"),
         Gpu("H200", 132, 1.98, 4248.0, "measured: benchmarks/results/nvidia-h200-2026-11-27-session.log")),
    80: (Gpu("A100", 108, 1.41, 1800.0, "assumed: 88% of the A100-SXM4-80GB's 2.04 TB/s peak, as on the H200; "
             "not measured in this project"),),
}
BUDGET_GPU = "H200"
BUDGET = {"float32": 0.7, "bfloat16": 1.0}   # issue time / DRAM time


@dataclass(frozen=True)
class SmLimits:
    threads: int = 2048
    blocks: int = 32
    registers: int = 65536         # in 4 partitions; a warp's registers come from one, 256 at a time
    shared_bytes: int = 228 * 1024
    reserved_shared: int = 1024    # per block, by the runtime


SM_LIMITS = {90: SmLimits(), 80: SmLimits(shared_bytes=164 * 1024)}


def blocks_per_sm(arch: int, threads: int, registers: int, shared_bytes: int) -> int:
    """Resident blocks per SM, limited by threads, registers and shared memory (the occupancy calculator's rules)."""
    sm = SM_LIMITS[arch]
    warps = math.ceil(threads / 32)
    registers_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    warps_by_registers = 4 * ((sm.registers // 4) // registers_per_warp)
    shared_per_block = math.ceil(shared_bytes / 128) * 128 + sm.reserved_shared
    return min(sm.blocks, sm.threads // (warps * 32), warps_by_registers // warps, sm.shared_bytes // shared_per_block)


# ---------------------------------------------------------------------------------------------------
# Per-kernel facts: variants, shapes, bytes per element, loop trip counts
# ---------------------------------------------------------------------------------------------------

IMAGE_SHAPE = (16, 3, 512, 512)      # the image ops' GPU benchmark shape; the lookups run on as many elements
UNET_SHAPES = ((8, 64, 128, 128), (8, 128, 64, 64), (8, 256, 32, 32))   # groupnorm_film, first one budgeted
GROUPS, KNOTS = 32, 257              # groupnorm_film as benchmarks/bench_groupnorm_film.py runs it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def refinement_steps() -> int:
    """Refinement steps the time lookup takes beyond its first for the default schedule (its prepared
    schedule's header: kernels/_triton_common.py)."""
    from svnr_fast import Schedule
    from svnr_fast.kernels._triton_common import prepared_schedule
    extra = int(prepared_schedule(Schedule().table)[1]) & 0xFFFFFFFF
    return max(extra - 2**32 if extra >= 2**31 else extra, 0)


def triton_loops(shape) -> dict[str, float]:
    """Trip counts of the Triton kernels' loops, by the text of their header line (the channel and tile
    loops are unrolled at compile time)."""
    return {"for _ in range(extra_steps):": refinement_steps()}


def triton_guards(grid) -> dict[str, Callable[[tuple[str, ...]], float]]:
    """Shares of a launch's runtime branches: of the `groups` max programs of an image in training_sample's
    max phase, the last turns the image's maximum into tau*max."""
    from svnr_fast.kernels import training_sample
    groups = math.ceil(grid[0] / (training_sample.MAX_TILES // training_sample.SAMPLE_TILES))
    return {"== groups - 1:": lambda sites: 1 / groups}


@dataclass(frozen=True)
class Op:
    """One op variant: how its launches are made and the bytes it moves per element (s = data itemsize)."""
    name: str
    kind: str                                      # "triton" or "cuda"
    shapes: tuple
    launches: Callable                             # (shape, dtype, arch) -> [Launch]
    min_bytes: Callable[[tuple, int], float]       # each input read once, each output written once
    pass_bytes: Callable[[tuple, int], float]      # what the launches' loads and stores request
    budgeted: bool = True
    note: str = ""


@dataclass
class Launch:
    name: str
    cubin: "Cubin"               # as built: registers, local and shared memory
    counting: Callable[[], "Cubin"]   # the same PTX with loops kept rolled, for counting (built when asked)
    function: str
    threads: int                 # per block
    blocks: int
    dynamic_shared: int
    loops: dict[str, float]
    guards: dict[str, Callable] = field(default_factory=dict)


def _elements(shape) -> int:
    return math.prod(shape)


def _table_bytes(shape) -> float:
    """groupnorm_film's (K, 2C) float32 table, per element."""
    return KNOTS * 2 * shape[1] * 4 / _elements(shape)


def _ops() -> list[Op]:
    image = (IMAGE_SHAPE,)
    return [
        # lookups: read the data, write float32 (time_map: one value per pixel)
        Op("gamma", "triton", image, _lookup("gamma"), lambda sh, s: s + 4, lambda sh, s: s + 4),
        Op("time_from_variance", "triton", image, _lookup("time_from_variance"),
           lambda sh, s: s + 4, lambda sh, s: s + 4),
        Op("time_map", "triton", image, _lookup("time_map"), lambda sh, s: s + 4 / sh[1], lambda sh, s: s + 4 / sh[1]),
        # training_sample: x0 read; y', x_t, target written; tau (float32) per pixel. The max and the sample
        # phases both read x0; on a GPU the second read comes from L2 (chunks of images whose x0 fits in it)
        Op("training_sample", "triton", image, _training_sample(),
           lambda sh, s: 4 * s + 4 / sh[1], lambda sh, s: 5 * s + 4 / sh[1]),
        Op("training_sample[uncorrelated]", "triton", image, _training_sample(correlated=False),
           lambda sh, s: 4 * s + 4 / sh[1], lambda sh, s: 5 * s + 4 / sh[1]),
        Op("training_sample[given noise]", "triton", image, _training_sample(given_noise=True),
           lambda sh, s: 6 * s + 4 / sh[1], lambda sh, s: 7 * s + 4 / sh[1]),
        Op("training_sample[per-channel]", "triton", image, _training_sample(per_channel=True),
           lambda sh, s: 4 * s + 4, lambda sh, s: 5 * s + 4, budgeted=False,
           note="other codebases' convention: one time map per channel, the lookups per element (not budgeted)"),
        # reverse_step: x, eps_hat read, x_new written; tau read and tau_new written (float32 per pixel)
        Op("reverse_step", "triton", image, _reverse_step(eta=1.0),
           lambda sh, s: 3 * s + 8 / sh[1], lambda sh, s: 3 * s + 8 / sh[1]),
        Op("reverse_step[given z]", "triton", image, _reverse_step(eta=1.0, given_z=True),
           lambda sh, s: 4 * s + 8 / sh[1], lambda sh, s: 4 * s + 8 / sh[1]),
        Op("reverse_step[eta=0]", "triton", image, _reverse_step(eta=0.0),
           lambda sh, s: 3 * s + 8 / sh[1], lambda sh, s: 3 * s + 8 / sh[1]),
        Op("reverse_step[x0_hat, clamp]", "triton", image, _reverse_step(eta=1.0, clamp=True, x0_hat=True),
           lambda sh, s: 4 * s + 8 / sh[1], lambda sh, s: 4 * s + 8 / sh[1]),
        Op("reverse_step[per-channel]", "triton", image, _reverse_step(eta=1.0, per_channel=True),
           lambda sh, s: 3 * s + 8, lambda sh, s: 3 * s + 8, budgeted=False,
           note="other codebases' convention: one time map per channel, the lookups per element (not budgeted)"),
        # groupnorm_film (SiLU, NCHW): forward reads h and u (float32 per pixel), writes out, reads the table;
        # backward reads grad_out, h, u, writes grad_h, reads the table and writes its gradient. Requested
        # (one block per (image, group)): the forward reads h twice (the second time from L2), u once per
        # group and 4 table values per (channel, knot) per block; the backward writes grad_h's first term in
        # float (4 bytes: to grad_h in float32, else to the workspace), then reads it and h again (from L2) and
        # writes grad_h, reads each pixel's knot records once per group and
        # slice of two channels, writes per-image table partials that finalize_group_backward sums, and
        # knot_records reads u and writes 16 bytes of records per pixel (reading 8 back)
        Op("groupnorm_film_fwd", "cuda", UNET_SHAPES, _groupnorm_film_forward,
           lambda sh, s: 2 * s + 4 / sh[1] + _table_bytes(sh),
           lambda sh, s: 3 * s + 4 * GROUPS / sh[1] + 16 * KNOTS / (sh[2] * sh[3])),
        Op("groupnorm_film_bwd", "cuda", UNET_SHAPES, _groupnorm_film_backward,
           lambda sh, s: 3 * s + 4 / sh[1] + 2 * _table_bytes(sh),
           lambda sh, s: (4 * s + 8 + 28 / sh[1] + 16 * GROUPS / sh[1] * math.ceil(sh[1] // GROUPS / 2)
                          + 32 * KNOTS / (sh[2] * sh[3]))),
        # groupnorm_silu (NCHW): groupnorm_film's kernels without FiLM (no u, table, knot records or table
        # gradient); requested: the forward reads h twice, the backward writes grad_h's first term in float and
        # reads it and h back, as groupnorm_film's
        Op("groupnorm_silu_fwd", "cuda", UNET_SHAPES, _groupnorm_silu_forward,
           lambda sh, s: 2 * s, lambda sh, s: 3 * s, budgeted=False,
           note="groupnorm_film's forward without FiLM (not budgeted)"),
        Op("groupnorm_silu_bwd", "cuda", UNET_SHAPES, _groupnorm_silu_backward,
           lambda sh, s: 3 * s, lambda sh, s: 4 * s + 8, budgeted=False,
           note="groupnorm_film's backward without FiLM (not budgeted)"),
    ]


# Triton ops: each calls the op's launch function on meta tensors (coupling: these signatures, which are the
# reference functions' signatures)

def _meta(shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _meta_table():
    from svnr_fast import Schedule
    return Schedule().table.to("meta")


def _lookup(name: str):
    def launches(shape, dtype, arch):
        from svnr_fast.kernels import lookup
        fn = getattr(lookup, name)
        return triton_launches(lambda: fn(_meta(shape, dtype), _meta_table()), shape, arch)
    return launches


def _training_sample(*, correlated=True, given_noise=False, per_channel=False):
    def launches(shape, dtype, arch):
        from svnr_fast.kernels import training_sample
        B = shape[0]
        noise = (_meta(shape, dtype), _meta(shape, dtype)) if given_noise else (None, None)
        return triton_launches(lambda: training_sample.training_sample(
            _meta(shape, dtype), _meta(B), _meta(B), _meta(B), _meta_table(), correlated, *noise, 0, 0, per_channel,
            False, 0.0), shape, arch)
    return launches


def _reverse_step(*, eta, given_z=False, clamp=False, x0_hat=False, per_channel=False):
    def launches(shape, dtype, arch):
        from svnr_fast.kernels import reverse_step
        B, C, H, W = shape
        z = _meta(shape, dtype) if given_z else None
        low, high = (-1.0, 1.0) if clamp else (None, None)
        return triton_launches(lambda: reverse_step.reverse_step(
            _meta(shape, dtype), _meta(shape, dtype), _meta((B, C if per_channel else 1, H, W)), _meta(B),
            _meta_table(), eta, z, low, high, 0, 0, x0_hat), shape, arch)
    return launches


# CUDA ops: the host code's choices at NCHW, 16-byte aligned tensors (csrc/groupnorm_film_cuda.cu)

CUDA_STORAGE = {"float32": "float", "bfloat16": "__nv_bfloat16"}
K_THREADS, K_CHUNK_ELEMS, K_GROUP_THREADS = 256, 4096, 512


def _nchw_geometry(shape, itemsize):
    """(pixels per block, threads per block, packs of VEC elements per thread) of the NCHW chunked kernels."""
    pixels = shape[2] * shape[3]
    vec = 16 // itemsize
    chunk = min(K_CHUNK_ELEMS, pixels)
    threads = min(K_THREADS, math.ceil(math.ceil(chunk / vec) / 32) * 32)
    return chunk, threads, math.ceil(chunk / (threads * vec))


def cuda_launch(function: str, arch: int, threads: int, blocks: int, dynamic_shared: int, loops: dict[str, float],
                guards: dict[str, Callable] | None = None) -> Launch:
    """A launch of `function` (a short template name) from the CUDA file."""
    return Launch(function.split("<")[0], nvcc_cubin(arch), functools.partial(nvcc_rolled_cubin, arch, function),
                  function, threads, blocks, dynamic_shared, loops, guards or {})


def _round32(n: int) -> int:
    return math.ceil(n / 32) * 32


def _warp_zero_guards(threads: int) -> dict[str, Callable]:
    """Branches only warp 0 takes (thread 0's work, the second level of a block reduction): 1 of the block's
    threads / 32 warps issues them."""
    share = 32 / threads
    return {"if (warp == 0) {": lambda sites: share, "if (threadIdx.x == 0) {": lambda sites: share,
            "if (threadIdx.x < 32) {": lambda sites: share}


def _block_strided(n: int, threads: int) -> float:
    """Trips of `for (i = threadIdx.x; i < n; i += blockDim.x)` per warp, averaged over the block's warps: the
    warp-iterations ceil(n / 32) over threads / 32 warps (a warp issues an iteration when any lane takes it)."""
    return math.ceil(n / 32) / (threads / 32)


def _groupnorm_film_forward(shape, dtype, arch, film=True):
    """forward_group_nchw: one block per (image, group), two passes over the group (group_forward_shape);
    film=False: its groupnorm_silu instance (no FiLM segments, no u)."""
    B, C, H, W = shape
    vec, per_group, knots = 16 // dtype.itemsize, C // GROUPS, KNOTS if film else 0
    assert per_group * H * W * dtype.itemsize <= 128 * 1024 and B * GROUPS >= 132, "not the one-launch forward"
    threads = min(K_GROUP_THREADS, _round32(H * W // vec))
    storage = CUDA_STORAGE[_dtype_name(dtype)]
    return [cuda_launch(f"forward_group_nchw<{storage}, {vec}, true, {str(film).lower()}>", arch, threads, B * GROUPS,
                        per_group * knots * 16 + per_group * 8,
                        loops={"for (int c = 0; c < count; ++c) {": per_group,
                               "k < knots; k += blockDim.x": _block_strided(KNOTS, threads),
                               "pack < packs; pack += blockDim.x, in_pack += blockDim.x * VEC":
                                   _block_strided(per_group * H * W // vec, threads),
                               "c < per_group; c += blockDim.x": _block_strided(per_group, threads),
                               "pixel < pixels; pixel += blockDim.x * VEC": _block_strided(H * W // vec, threads),
                               "for (int c = 0; c < per_group; ++c, in += pixels / VEC": per_group},
                        guards=_warp_zero_guards(threads))]


K_BACK_CHUNK, K_BACK_THREADS, K_MIN_RUN, K_SORT_THREADS = 8192, 256, 16, 1024


def _backward_geometry(shape):
    """(pixels per sorted chunk, threads per block, sorted positions per thread) of backward_group_nchw."""
    pixels = shape[2] * shape[3]
    chunk = min(K_BACK_CHUNK, pixels)
    threads = max(128, min(K_BACK_THREADS, _round32(chunk // K_MIN_RUN)))
    return chunk, threads, math.ceil(chunk / (4 * threads)) * 4


@functools.lru_cache(maxsize=None)
def _sorted_run_shares(shape) -> tuple[float, float]:
    """backward_group_nchw's sorted loop on the time map of benchmarks/bench_groupnorm_film.py (avg-pooled
    noise): (share of the groups of four positions in which a run of one knot ends, share of the positions
    of such groups that start a new run: the guards of the code that flushes runs)."""
    import bench_groupnorm_film
    u = bench_groupnorm_film.inputs(shape, torch.float32, "cpu")[1]
    B, _, H, W = u.shape
    knots = u.clamp(0, KNOTS - 1).floor().view(B, H * W)
    chunk, threads, per_thread = _backward_geometry(shape)
    boundary_groups = groups = changes = 0
    for start in range(0, H * W, chunk):
        ranges = knots[:, start:start + chunk].sort(dim=1).values.reshape(B, -1, per_thread)
        # the run a group continues: the key before it (the range's first key for the first group)
        before = torch.cat([ranges[..., :1], ranges[..., :-1]], dim=-1).reshape(*ranges.shape[:2], -1, 4)
        four = ranges.reshape(*ranges.shape[:2], -1, 4)
        boundary = (four[..., 0] != before[..., 0]) | (four[..., 3] != before[..., 0])
        boundary_groups += int(boundary.sum())
        groups += boundary.numel()
        changes += int(((four != before) & boundary[..., None]).sum())
    return boundary_groups / groups, changes / (4 * boundary_groups)


def _groupnorm_silu_forward(shape, dtype, arch):
    return _groupnorm_film_forward(shape, dtype, arch, film=False)


def _groupnorm_silu_backward(shape, dtype, arch):
    """backward_group_nchw's groupnorm_silu instance (no knot records, tile or sorted pass: the channel sums per
    thread and over the block), finalize_group_backward."""
    B, C, H, W = shape
    vec, per_group = 16 // dtype.itemsize, C // GROUPS
    assert per_group * H * W * dtype.itemsize <= 128 * 1024 and B * GROUPS >= 132, "not the group backward"
    chunk, threads, _ = _backward_geometry(shape)
    storage = CUDA_STORAGE[_dtype_name(dtype)]
    return [
        cuda_launch(f"backward_group_nchw<{storage}, {vec}, true, false>", arch, threads, B * GROUPS, 2 * per_group * 8,
                    loops={"i < per_group * knots; i += blockDim.x": 0,   # K = 0
                           "c < per_group; c += blockDim.x": _block_strided(per_group, threads),
                           "c0 < per_group; c0 += CS": math.ceil(per_group / 2),
                           "chunk_begin < unsigned(pixels); chunk_begin += chunk_pixels": math.ceil(H * W / chunk),
                           "pixel < chunk_len; pixel += blockDim.x * VEC": _block_strided(chunk // vec, threads),
                           "k < knots; k += blockDim.x": 0,
                           "for (int c = 0; c < per_group; ++c) {": per_group,
                           "pack < unsigned(count / VEC); pack += blockDim.x":
                               _block_strided(per_group * H * W // vec, threads)},
                    guards=_warp_zero_guards(threads)),
        cuda_launch("finalize_group_backward", arch, K_THREADS, math.ceil(2 * C / K_THREADS), 0,
                    loops={"b < batch; ++b, value += row": B}),
    ]


def _groupnorm_film_backward(shape, dtype, arch):
    """knot_records, backward_group_nchw, finalize_group_backward (the one-block-per-group backward)."""
    B, C, H, W = shape
    vec, per_group = 16 // dtype.itemsize, C // GROUPS
    assert per_group * H * W * dtype.itemsize <= 128 * 1024 and B * GROUPS >= 132, "not the group backward"
    chunk, threads, per_thread = _backward_geometry(shape)
    chunks = math.ceil(H * W / chunk)
    sort_warps = min(K_SORT_THREADS // 32, 48 * 1024 // (4 * KNOTS) - 1)
    storage = CUDA_STORAGE[_dtype_name(dtype)]
    table_size = KNOTS * 2 * C
    return [
        cuda_launch("knot_records", arch, 32 * sort_warps, B * chunks, (sort_warps + 1) * KNOTS * 4,
                    loops={"i < warps * knots; i += blockDim.x": _block_strided(sort_warps * KNOTS, 32 * sort_warps),
                           "step < part_end; step += 32": math.ceil(chunk / sort_warps / 32),
                           "k < knots; k += blockDim.x": _block_strided(KNOTS, 32 * sort_warps),
                           "w < warps; ++w": sort_warps,
                           "k0 < knots; k0 += 32": math.ceil(KNOTS / 32)},
                    guards=_warp_zero_guards(32 * sort_warps)),
        cuda_launch(f"backward_group_nchw<{storage}, {vec}, true, true>", arch, threads, B * GROUPS,
                    2 * per_group * KNOTS * 16 + 2 * per_group * 8 + 2 * chunk * 8,
                    loops={"for (int c = 0; c < count; ++c) {": per_group,
                           "k < knots; k += blockDim.x": _block_strided(KNOTS, threads),
                           "i < per_group * knots; i += blockDim.x": _block_strided(per_group * KNOTS, threads),
                           "c < per_group; c += blockDim.x": _block_strided(per_group, threads),
                           "c0 < per_group; c0 += CS": math.ceil(per_group / 2),
                           "chunk_begin < unsigned(pixels); chunk_begin += chunk_pixels": chunks,
                           "pixel < chunk_len; pixel += blockDim.x * VEC": _block_strided(chunk // vec, threads),
                           "(unsigned i = begin; i < end; i += 4)": per_thread / 4,
                           "k < knots; k += 32": math.ceil(KNOTS / 32),
                           "for (int c = 0; c < per_group; ++c) {": per_group,
                           "pack < unsigned(count / VEC); pack += blockDim.x": _block_strided(per_group * H * W // vec, threads)},
                    guards={"four.x & kKnotMask) != run_k": lambda sites, share=_sorted_run_shares(shape)[0]: share,
                            "if (k != run_k) {": lambda sites, share=_sorted_run_shares(shape)[1]: share,
                            **_warp_zero_guards(threads)}),
        cuda_launch("finalize_group_backward", arch, K_THREADS, math.ceil((table_size + 2 * C) / K_THREADS), 0,
                    loops={"b < batch; ++b, value += row": B}),
    ]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------------

class MissingTool(RuntimeError):
    """A compiler or disassembler this machine lacks."""


def triton_tool(name: str) -> str:
    """Triton's bundled ptxas / cuobjdump / nvdisasm."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise MissingTool(f"{path} not found: install triton with its NVIDIA backend (pip install triton)")
    return str(path)


def nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        raise MissingTool("nvcc not found on PATH: install the CUDA toolkit to include the CUDA kernels")
    return path


def _run(args: list[str], **kwargs) -> str:
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} ... failed:\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


@dataclass(frozen=True)
class Cubin:
    path: Path
    ptxas_log: str = ""          # ptxas -v output, where the build kept it (nvcc)

    @functools.cached_property
    def functions(self) -> dict[str, str]:
        """Disassembly with source lines (nvdisasm -gi) of each function, by mangled name."""
        text = _run([triton_tool("nvdisasm"), "-gi", "-c", str(self.path)])
        parts = re.split(r"//-+ \.text\.(\S+)\s+-+\n", text)
        return dict(zip(parts[1::2], parts[2::2]))

    @functools.cached_property
    def resources(self) -> dict[str, dict[str, int]]:
        """Registers and local memory (bytes per thread: spills and stack) of each function (cuobjdump
        -res-usage), and its static shared memory from the ptxas log (cuobjdump's SHARED adds the 1 KB the
        runtime reserves per block on sm_80+ to nvcc's kernels; Triton allocates its shared memory
        dynamically)."""
        text = _run([triton_tool("cuobjdump"), "-res-usage", str(self.path)])
        found = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:\d+ SHARED:\d+ LOCAL:(\d+)", text)
        static_shared, function = {}, None
        for line in self.ptxas_log.splitlines():
            if m := re.search(r"Compiling entry function '(\S+)'", line):
                function = m.group(1)
            elif (m := re.search(r"Used \d+ registers.*?(\d+) bytes smem", line)) and function:
                static_shared[function] = int(m.group(1))
        return {name: {"registers": int(reg), "local": int(local), "shared": static_shared.get(name, 0)}
                for name, reg, local in found}

    @functools.cached_property
    def demangled(self) -> dict[str, str]:
        """Short template name (e.g. `forward_group_nchw<float, 4, true>`) -> mangled name."""
        names = list(self.resources)
        filt = shutil.which("c++filt")
        plain = _run([filt], input="\n".join(names)).splitlines() if filt else names
        short = {}
        for mangled, text in zip(names, plain):
            m = re.search(r"::(\w+(?:<.*?>)?)\(", text)
            short[m.group(1) if m else text] = mangled
        return short

    def find(self, function: str) -> str:
        """The mangled name of `function` (a mangled name or a short template name)."""
        if function in self.resources:
            return function
        if function in self.demangled:
            return self.demangled[function]
        raise KeyError(f"{function} is not in {self.path.name}; it has: {', '.join(sorted(self.demangled))}")


_WORK = Path(tempfile.mkdtemp(prefix="svnr_roofline_"))
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)


def rolled(ptx: str) -> str:
    """`ptx` with `.pragma "nounroll"` in every loop header (the target of a backward branch).

    ptxas unrolls loops whose trip count it does not know into a main loop and remainder code whose
    executions depend on the trip count in ways the SASS does not show; kept rolled, each source loop is one
    SASS loop whose body runs exactly its trip count. The executed count is then an upper bound of the
    unrolled code's by the loop overhead that unrolling saves (a few instructions per iteration).
    """
    lines = ptx.split("\n")
    defined = {}
    for i, line in enumerate(lines):
        if m := re.match(r"^(\$L__BB\w+):", line):
            defined[m.group(1)] = i
    headers = {m.group(1) for i, line in enumerate(lines)
               if (m := re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\w+);", line)) and defined.get(m.group(1), i) < i}
    out = []
    for line in lines:
        out.append(line)
        if (m := re.match(r"^(\$L__BB\w+):", line)) and m.group(1) in headers:
            out.append('\t.pragma "nounroll";')
    return "\n".join(out)


def ptxas(ptx: str, tool: str, flags: list[str], name: str) -> Cubin:
    source, out = _WORK / f"{name}.ptx", _WORK / f"{name}.cubin"
    source.write_text(ptx)
    _run([tool, *flags, str(source), "-o", str(out)])
    return Cubin(out)


_NVCC_LOCK = threading.Lock()


def nvcc_cubin(arch: int, source: Path = CUDA_SOURCE) -> Cubin:
    """The CUDA file compiled for sm_<arch> as CMakeLists.txt builds it (-O3, --use_fast_math, -lineinfo),
    with its ptxas -v log. Built once (thread-safe)."""
    with _NVCC_LOCK:
        return _nvcc_build(arch, source)[0]


@functools.lru_cache(maxsize=None)
def _nvcc_build(arch: int, source: Path) -> tuple[Cubin, str]:
    keep = _WORK / f"nvcc-{source.stem}-sm{arch}"
    keep.mkdir()
    out = keep / f"{source.stem}.cubin"
    log = _run([nvcc(), f"-arch=sm_{arch}", "-cubin", "-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                "-DSVNR_WITH_CUDA=1", f"-I{source.parent}", "-Xptxas", "-v", "-keep", f"-keep-dir={keep}",
                "-o", str(out), str(source)])
    return Cubin(out, log), next(keep.glob("*.ptx")).read_text()


@functools.lru_cache(maxsize=None)
def nvcc_rolled_cubin(arch: int, function: str, source: Path = CUDA_SOURCE) -> Cubin:
    """`function` alone, from the PTX of nvcc_cubin, assembled with loops kept rolled by nvcc's ptxas with the
    flags nvcc -cubin passes it (nvcc -dryrun)."""
    cubin = nvcc_cubin(arch, source)
    ptx = only_entry(_nvcc_build(arch, source)[1], cubin.find(function))
    tool = shutil.which("ptxas") or str(Path(nvcc()).parent / "ptxas")
    return ptxas(rolled(ptx), tool, [f"-arch=sm_{arch}", "-m64", "--generate-line-info"],
                 f"{source.stem}-sm{arch}-{abs(hash(function))}-rolled")


def only_entry(ptx: str, name: str) -> str:
    """`ptx` without the kernels (.entry) other than `name`."""
    out, skipping = [], False
    for line in ptx.split("\n"):
        if m := re.match(r"^(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$]+)\(", line):
            skipping = m.group(1) != name
        if not skipping:
            out.append(line)
        elif line == "}":
            skipping = False
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# Triton: capture a launch, compile it as the launch would
# ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def captured_launches():
    """Record `kernel[grid](*args, **kwargs)` calls instead of launching them."""
    from triton.runtime.jit import JITFunction
    calls = []

    def record(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, grid, kwargs))

    original = JITFunction.run
    JITFunction.run = record
    try:
        yield calls
    finally:
        JITFunction.run = original


def triton_compile(fn, args, kwargs, arch: int):
    """triton.compile of `fn` with the signature, specialisation and options a launch with these arguments
    gets (JITFunction.run's own binder and _pack_args); tensors stand in as 16-byte aligned pointers."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [MockTensor(a.dtype, list(a.shape)) if isinstance(a, torch.Tensor) else a for a in args]
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def triton_cubin(compiled) -> Cubin:
    path = _WORK / f"{compiled.hash}.cubin"
    path.write_bytes(compiled.asm["cubin"])
    return Cubin(path)


def triton_rolled_cubin(compiled) -> Cubin:
    """The compiled kernel's PTX assembled again with loops kept rolled, by the ptxas and with the flags
    Triton's NVIDIA backend uses (make_cubin)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    capability = compiled.metadata.target.arch
    flags = ["-lineinfo", *([] if compiled.metadata.enable_fp_fusion else ["--fmad=false"]),
             "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(capability)}"]
    return ptxas(rolled(compiled.asm["ptx"]), get_ptxas(capability).path, flags, f"{compiled.hash}-rolled")


def triton_launches(call: Callable[[], object], shape, arch: int) -> list[Launch]:
    """The launches `call()` makes, compiled for sm_<arch>."""
    with captured_launches() as calls:
        call()
    if not calls:
        raise RuntimeError("the op launched no Triton kernel")
    launches = []
    for fn, args, grid, kwargs in calls:
        if callable(grid):
            raise NotImplementedError(f"{fn.__name__}: grid functions are not supported")
        compiled = triton_compile(fn, args, kwargs, arch)
        phase = {0: " max phase", 1: " sample phase", 2: " ordered"}.get(kwargs.get("PHASE"), "")
        launches.append(Launch(fn.__name__ + phase, triton_cubin(compiled),
                               functools.partial(triton_rolled_cubin, compiled), compiled.metadata.name,
                               compiled.metadata.num_warps * 32, math.prod(grid), compiled.metadata.shared,
                               triton_loops(shape), triton_guards(grid)))
    return launches


# ---------------------------------------------------------------------------------------------------
# SASS: instructions, control flow, loops, counting
# ---------------------------------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_LOCATION = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^\s*([.$\w]+):\s*$")
# Subroutines reached only for operands the benchmark data never have: IEEE division / square root slow
# paths (denormals, huge exponents), 64-bit integer division when an operand needs more than 32 bits.
COLD_SUBROUTINES = re.compile(r"slowpath|mediumpath|div_rn_f64_full|_(div|rem)_[su]64")


@dataclass
class Instruction:
    address: int
    predicate: str
    opcode: str
    operands: str
    target: str | None
    source: tuple[tuple[str, int], ...]    # innermost (file, line) first, then the inlined-at call sites

    @property
    def is_jump(self) -> bool:
        """A direct jump within the function: BRA (not a divergent warp's BRA.DIV), or a CALL.REL.NOINC to a
        local label, which sm_80 code uses to leave a loop."""
        if self.opcode.startswith("BRA.DIV"):
            return False
        return self.opcode.split(".")[0] == "BRA" or (self.opcode.startswith("CALL") and
                                                      (self.target or "").startswith(".L"))

    @property
    def is_conditional(self) -> bool:
        return bool(self.predicate) or bool(re.match(r"!?U?P\d", self.operands))

    @property
    def ends_block(self) -> bool:
        return (self.is_jump or self.opcode.startswith("BRA.DIV")
                or self.opcode.split(".")[0] in ("EXIT", "RET", "BRX", "JMP", "JMX"))

    @property
    def calls_subroutine(self) -> bool:
        return self.opcode.startswith("CALL") and not self.is_jump

    def source_text(self, depth: int = 0) -> str:
        if depth >= len(self.source):
            return ""
        path, line = self.source[depth]
        return _source_line(path, line)


@functools.lru_cache(maxsize=None)
def _source_lines(path: str) -> tuple[str, ...]:
    try:
        return tuple(_local_source(Path(path)).read_text().splitlines())
    except OSError:
        return ()


def _local_source(path: Path) -> Path:
    """This checkout's copy of a project file named in line info. Triton's cache is keyed by the source text,
    so a kernel compiled from another checkout with the same source carries that checkout's paths."""
    for i in range(1, len(path.parts) - 1):
        candidate = ROOT.joinpath(*path.parts[i:])
        if candidate.is_file():
            return candidate
    return path


def _source_line(path: str, line: int) -> str:
    lines = _source_lines(path)
    return lines[line - 1].strip() if 0 < line <= len(lines) else ""


def parse_sass(text: str) -> tuple[list[Instruction], dict[str, int]]:
    """Instructions (with their source lines) and label addresses of one function's nvdisasm -gi output."""
    instructions, labels, pending, source, fresh = [], {}, [], [], True
    for line in text.splitlines():
        if m := _LOCATION.search(line):
            if fresh:                    # the first location line after an instruction starts a new chain
                source, fresh = [], False
            source.append((m.group(1), int(m.group(2))))
        elif m := _LABEL.match(line):
            pending.append(m.group(1))
        elif m := _INSTRUCTION.match(line):
            address = int(m.group(1), 16)
            labels.update({label: address for label in pending})
            pending, fresh = [], True
            target = re.search(r"`\(([^)]+)\)", m.group(4))
            instructions.append(Instruction(address, (m.group(2) or "").strip(), m.group(3), m.group(4).strip(),
                                            target.group(1) if target else None, tuple(source)))
    return instructions, labels


@dataclass
class Loop:
    header: int             # address of the first instruction of the body
    latch: int              # address of the backward branch
    source: str
    trips: float
    instructions: int = 0   # counted instructions in the body (once)


@dataclass
class Count:
    """Instructions one thread executes, with the loops and guards that weighed them."""
    per_thread: float
    static: int
    loops: list[Loop]
    guards: list[tuple[str, float, int]]    # (source, share, instructions)
    opcodes: Counter


def _blocks(instructions: list[Instruction], labels: dict[str, int]):
    """Basic blocks as (first index, last index) and each block's successors (first indices) on the warm
    path: a divergent warp's fallback (BRA.DIV) is not followed, nor are calls."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    leaders = {0}
    for i, ins in enumerate(instructions):
        if ins.is_jump:
            leaders.add(index[labels[ins.target]])
        if ins.ends_block:
            leaders.add(i + 1)
    starts = sorted(s for s in leaders if s < len(instructions))
    blocks = [(s, e - 1) for s, e in zip(starts, starts[1:] + [len(instructions)])]
    successors = []
    for first, last in blocks:
        ins = instructions[last]
        op = ins.opcode.split(".")[0]
        following = [last + 1] if last + 1 < len(instructions) else []
        if ins.is_jump:
            successors.append([index[labels[ins.target]]] + (following if ins.is_conditional else []))
        elif op in ("EXIT", "RET"):
            successors.append(following if ins.is_conditional else [])
        elif op in ("BRX", "JMP", "JMX"):
            raise NotImplementedError(f"indirect branch at {ins.address:#x}: {ins.opcode} {ins.operands}")
        else:
            successors.append(following)
    return blocks, successors


def count_instructions(text: str, loops: dict[str, float], guards: dict[str, Callable] | None = None) -> Count:
    """Instructions one thread executes in a function (nvdisasm -gi text), loops multiplied by their trip counts.

    loops: trip count by a snippet of the loop's header line (the backward branch's source line, or a
    line it is inlined at); guards: share of executions by a snippet of a forward branch's source line,
    given the branch's inlined-at call-site lines.
    """
    guards = guards or {}
    instructions, labels = parse_sass(text)
    blocks, successors = _blocks(instructions, labels)
    block_of = {first: b for b, (first, _) in enumerate(blocks)}

    # warm blocks: reached from the entry without calls to cold subroutines
    reached, stack = set(), [0]
    while stack:
        b = stack.pop()
        if b in reached:
            continue
        reached.add(b)
        stack.extend(block_of[s] for s in successors[b] if s in block_of)
    cold = set()
    for b in reached:
        first, last = blocks[b]
        for ins in instructions[first:last + 1]:
            if ins.calls_subroutine:
                if not COLD_SUBROUTINES.search(ins.target or ""):
                    raise NotImplementedError(f"call to {ins.target} at {ins.address:#x}: not a known slow path")
                cold.add(b)
    changed = True
    while changed:                       # code that leads only into cold code is cold
        changed = False
        for b in reached - cold:
            succ = [block_of[s] for s in successors[b] if s in block_of]
            if succ and all(s in cold for s in succ) and b != 0:
                cold.add(b)
                changed = True
    warm = sorted(reached - cold)
    weight = {i: 1.0 for b in warm for i in range(blocks[b][0], blocks[b][1] + 1)}

    index = {ins.address: i for i, ins in enumerate(instructions)}
    latches = {}                         # loop header -> its last backward branch (a `continue` adds others)
    found_loops, found_guards = [], []
    for b in warm:
        last = blocks[b][1]
        ins = instructions[last]
        if not ins.is_jump:
            continue
        target = index[labels[ins.target]]
        if target <= last:
            latches[target] = max(latches.get(target, last), last)
        elif ins.is_conditional:
            key = next((k for k in guards if k in ins.source_text()), None)
            if key is not None:
                share = guards[key](tuple(ins.source_text(d) for d in range(1, len(ins.source))))
                skipped = range(last + 1, target)
                found_guards.append((f"{ins.source_text()} <- {ins.source_text(1)[:48]}", share,
                                     sum(1 for i in skipped if i in weight)))
                for i in skipped:
                    if i in weight:
                        weight[i] *= share
    for header, latch in latches.items():
        body = range(header, latch + 1)
        branch = instructions[latch]
        trips = _trip_count(instructions, body, branch, loops)
        found_loops.append(Loop(instructions[header].address, branch.address,
                                _loop_source(branch, loops) or branch.source_text(), trips,
                                sum(1 for i in body if i in weight)))
        for i in body:
            if i in weight:
                weight[i] *= trips
    opcodes = Counter()
    for i, w in weight.items():
        opcodes[instructions[i].opcode.split(".")[0]] += w
    return Count(sum(weight.values()), len(weight), found_loops, found_guards, opcodes)


def _loop_source(branch: Instruction, loops: dict[str, float]) -> str | None:
    for depth in range(len(branch.source)):
        text = branch.source_text(depth)
        if any(key in text for key in loops):
            return text
    return None


def _trip_count(instructions, body, branch: Instruction, loops: dict[str, float]) -> float:
    text = _loop_source(branch, loops)
    if text is None and any("CAS" in instructions[i].opcode for i in body):
        return 1.0                        # compare-and-swap retry loop: one try when uncontended
    if text is None:
        where = " <- ".join(f"{Path(p).name}:{n} {_source_line(p, n)[:60]!r}" for p, n in branch.source)
        raise LookupError(f"no trip count for the loop ending at {branch.address:#x} ({where}); "
                          "add its header to the kernel's loop facts in benchmarks/roofline.py")
    return float(next(trips for key, trips in loops.items() if key in text))


# ---------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------

@dataclass
class LaunchFigures:
    launch: Launch
    count: Count
    registers: int
    local_bytes: int
    shared_bytes: int
    blocks_per_sm: int

    @property
    def threads_total(self) -> int:
        return self.launch.threads * self.launch.blocks

    @property
    def warp_instructions(self) -> float:
        return self.count.per_thread * math.ceil(self.launch.threads / 32) * self.launch.blocks


def launch_figures(launch: Launch, arch: int) -> LaunchFigures:
    res = launch.cubin.resources[launch.cubin.find(launch.function)]
    counting = launch.counting()
    count = count_instructions(counting.functions[counting.find(launch.function)], launch.loops, launch.guards)
    shared = res["shared"] + launch.dynamic_shared
    return LaunchFigures(launch, count, res["registers"], res["local"], shared,
                         blocks_per_sm(arch, launch.threads, res["registers"], shared))


def op_rows(op: Op, shape, dtype: str, arch: int, figures: list[LaunchFigures]) -> list[dict]:
    """One row per GPU model of `arch` for the op at `shape` and `dtype`, from its launches' figures."""
    n = _elements(shape)
    s = DTYPES[dtype].itemsize
    warp_instructions = sum(f.warp_instructions for f in figures)
    instr_per_elem = sum(f.count.per_thread * f.threads_total for f in figures) / n
    rows = []
    for gpu in GPUS[arch]:
        issue, dram = gpu.issue_us(warp_instructions), gpu.dram_us(op.min_bytes(shape, s) * n)
        rows.append({
            "kernel": op.name, "gpu": gpu.name, "dtype": dtype, "shape": "x".join(map(str, shape)),
            "arch": f"sm_{arch}",
            "instr_per_elem": round(instr_per_elem, 2), "bytes_per_elem": round(op.min_bytes(shape, s), 3),
            "pass_bytes_per_elem": round(op.pass_bytes(shape, s), 3),
            "issue_us": round(issue, 2), "dram_us": round(dram, 2),
            "dram_passes_us": round(gpu.dram_us(op.pass_bytes(shape, s) * n), 2),
            "ratio": round(issue / dram, 3),
            "budget": BUDGET[dtype] if op.budgeted and shape == op.shapes[0] else None,
            "spills": sum(f.local_bytes for f in figures),
            "regs": max(f.registers for f in figures),
            "blocks_per_sm": min(f.blocks_per_sm for f in figures),
            "note": op.note,
            "launches": [{
                "name": f.launch.name, "threads": f.launch.threads, "blocks": f.launch.blocks, "regs": f.registers,
                "spills": f.local_bytes, "shared": f.shared_bytes, "blocks_per_sm": f.blocks_per_sm,
                "instr_per_thread": round(f.count.per_thread, 1), "static_instr": f.count.static,
                "instr_per_elem": round(f.count.per_thread * f.threads_total / n, 2),
                "loops": [{"source": lp.source, "trips": lp.trips, "body": lp.instructions,
                           "at": f"{lp.header:#x}-{lp.latch:#x}"} for lp in f.count.loops],
                "guards": [{"source": src, "share": share, "body": body} for src, share, body in f.count.guards],
                "top_opcodes": [[op_, round(c, 1)] for op_, c in f.count.opcodes.most_common(8)],
            } for f in figures],
        })
    return rows


def build(arch: int = 90, *, kinds=("triton", "cuda"), names=None, all_shapes: bool = True) -> list[dict]:
    """Rows of every op (or those named) for every dtype and shape. CUDA ops need nvcc (MissingTool).

    The CUDA build and the disassembly and counting of each launch run in worker threads (subprocesses
    mostly) while this thread compiles the Triton kernels."""
    variants = [(op, shape, dtype) for op in _ops() if op.kind in kinds and (not names or op.name in names)
                for shape in (op.shapes if all_shapes else op.shapes[:1]) for dtype in DTYPES]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        if any(op.kind == "cuda" for op, _, _ in variants):
            pool.submit(nvcc_cubin, arch)
        pending = [(op, shape, dtype, [pool.submit(launch_figures, launch, arch)
                                       for launch in op.launches(shape, DTYPES[dtype], arch)])
                   for op, shape, dtype in variants]
        return [row for op, shape, dtype, futures in pending
                for row in op_rows(op, shape, dtype, arch, [f.result() for f in futures])]


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("kernel", "shape", "dtype", "instr_per_elem", "bytes_per_elem", "pass_bytes_per_elem", "issue_us",
                 "dram_us", "ratio", "budget", "spills", "regs", "blocks_per_sm")


def table(rows: list[dict], gpu: str) -> str:
    """A markdown table of the rows of one GPU model."""
    head = "| " + " | ".join(TABLE_COLUMNS) + " |\n|" + "---|" * len(TABLE_COLUMNS) + "\n"
    lines = []
    for r in rows:
        if r["gpu"] != gpu:
            continue
        cells = [("" if r[c] is None else str(r[c])) for c in TABLE_COLUMNS]
        if r["budget"] is not None and r["ratio"] > r["budget"]:
            cells[TABLE_COLUMNS.index("ratio")] += " (over)"
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def details(rows: list[dict]) -> str:
    """Per launch: resources, counts, loops with their trip counts, guards (from the first GPU's rows)."""
    first_gpu = rows[0]["gpu"]
    out = []
    for r in rows:
        if r["gpu"] != first_gpu:
            continue
        out.append(f"### {r['kernel']} {r['shape']} {r['dtype']}\n")
        if r["note"]:
            out.append(f"{r['note']}\n")
        for lp in r["launches"]:
            out.append(f"- `{lp['name']}`: {lp['blocks']} blocks x {lp['threads']} threads, {lp['regs']} registers, "
                       f"{lp['spills']} B local, {lp['shared']} B shared, {lp['blocks_per_sm']} blocks/SM; "
                       f"{lp['instr_per_thread']} instructions per thread ({lp['static_instr']} static), "
                       f"{lp['instr_per_elem']} per element")
            for loop in lp["loops"]:
                out.append(f"  - loop x{loop['trips']:g} ({loop['body']} instructions at {loop['at']}): "
                           f"`{loop['source'][:90]}`")
            for guard in lp["guards"]:
                out.append(f"  - guard x{guard['share']:g} ({guard['body']} instructions): `{guard['source'][:90]}`")
            out.append("  - most executed: " + ", ".join(f"{o} {c:g}" for o, c in lp["top_opcodes"]))
        out.append("")
    return "\n".join(out)


def markdown(rows: list[dict], arch: int) -> str:
    gpus = GPUS[arch]
    parts = [f"# Static roofline, sm_{arch}\n",
             f"`python benchmarks/roofline.py --arch {arch} --out benchmarks/results` (triton {triton.__version__}, "
             f"{_nvcc_version()}). Method and counting rules: the docstring of benchmarks/roofline.py; columns: "
             "benchmarks/results/README.md.\n"]
    for gpu in gpus:
        parts.append(f"## {gpu.name} model: {gpu.sms} SMs, {gpu.clock_ghz} GHz, {gpu.copy_gb_per_s:g} GB/s copy "
                     f"bandwidth ({gpu.bandwidth_source})\n")
        parts.append(table(rows, gpu.name))
    parts.append("## Launches\n")
    parts.append(details(rows))
    return "\n".join(parts)


def _nvcc_version() -> str:
    try:
        return re.search(r"release [\d.]+", _run([nvcc(), "--version"])).group(0).replace("release", "nvcc")
    except (MissingTool, AttributeError):
        return "no nvcc"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(GPUS))
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--out", type=Path, help="write roofline-sm<arch>.md and .json into this folder")
    parser.add_argument("--op", action="append", help="only these ops (repeatable)")
    parser.add_argument("--first-shape", action="store_true", help="only each op's first (budgeted) shape")
    args = parser.parse_args(argv)
    kinds = ("triton", "cuda")
    try:
        nvcc()
    except MissingTool as e:
        print(f"skipping the CUDA kernels: {e}", file=sys.stderr)
        kinds = ("triton",)
    rows = build(args.arch, kinds=kinds, names=args.op, all_shapes=not args.first_shape)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"roofline-sm{args.arch}.json").write_text(json.dumps(rows, indent=1) + "\n")
        (args.out / f"roofline-sm{args.arch}.md").write_text(markdown(rows, args.arch))
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not args.out:
        for gpu in GPUS[args.arch]:
            print(f"{gpu.name} ({gpu.copy_gb_per_s:g} GB/s)")
            print(table(rows, gpu.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
