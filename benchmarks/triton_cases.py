"""What bench_reverse_step.py and bench_training_sample.py share: sizes, the compiled reference, pytest-benchmark runs.

The eager and compiled baselines run the reference math with the noise drawn by `torch.randn` inside the
timed function (no torch.Generator: its creation is a graph break), so torch.compile can fuse the draw
into its own kernel, as Inductor does with Philox. The fused ops draw their noise in-kernel.
"""
from __future__ import annotations

import math

import torch

from svnr_fast.ops import backends

# 16x3x512x512 first: it is the size of the targets, and its compiled baseline is the static-shape one
# (later sizes may reuse a dynamic-shape compile)
GPU_SIZES = [(16, 3, 512, 512), (16, 3, 256, 256), (128, 3, 32, 32), (1, 3, 64, 64)]
GPU_DTYPES = (torch.float32, torch.bfloat16)
CPU_DRY_RUN_SIZES = [(2, 3, 16, 24)]
BENCHMARK_SHAPE = {"cuda": (16, 3, 512, 512), "cpu": (2, 3, 128, 128)}


def sizes(device: str):
    return GPU_SIZES if device.startswith("cuda") else CPU_DRY_RUN_SIZES


def shape_name(shape) -> str:
    return "x".join(map(str, shape))


def elements(shape) -> tuple[int, int]:
    """(elements, pixels) of a (B, C, H, W) shape."""
    B, C, H, W = shape
    return math.prod(shape), B * H * W


def compile_reference(fn):
    """torch.compile(fn) with room for one compiled graph per benchmarked shape and dtype."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    return torch.compile(fn)


def require_triton(op: str, device: str) -> None:
    """The fused column must time the Triton kernel, not a fallback."""
    if device.startswith("cuda"):
        choice = backends.choose(op, "cuda")
        if choice.backend != "triton":
            raise RuntimeError(f"{op} on CUDA dispatches to {choice.backend} ({choice.reason}), not Triton; "
                               "unset SVNR_FAST_BACKEND")


def benchmark_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(benchmark, fn, device: str, case) -> None:
    """pytest-benchmark one callable, compiled/warmed up outside the timed rounds, synchronised on CUDA."""
    benchmark.group = f"{case.op} {case.shape} {case.dtype}"
    benchmark.extra_info["bytes_moved"] = case.bytes_moved
    fn()
    if device == "cuda":
        benchmark(lambda: (fn(), torch.cuda.synchronize()))
    else:
        benchmark(fn)
