"""The C++ CPU kernels (csrc/*_cpu.cpp) vs the eager reference vs torch.compile(reference), on CPU tensors.

Ops: gamma, time_from_variance, time_map, reverse_step (eta = 1, z drawn in the kernel; the baselines draw it
with torch.randn, as bench_reverse_step.py does; and eta = 0), training_sample (correlated, eps_T and eps'
drawn). Shapes 4x3x256x256 (fits this machine's L3) and 16x3x512x512, float32. The `copy` row is
`y.copy_(x)` of one float32 image tensor of the same shape: the ceiling the kernels are measured against.

bytes_moved (each input read once, each output written once; float32, C = 3, per element): gamma and
time_from_variance 8; time_map 4 + 4/3; reverse_step 12 + 8/3 (x, eps_hat read, x_new written, tau read and
written per pixel); training_sample 16 + 4/3 (x0 read; y', x_t, target written; tau per pixel).

`python benchmarks/bench_cpu_kernels.py` prints a table of ms, GB/s and percent of the copy's bandwidth: wall
time with torch's threads, best of repeated calls over a second. `--cpu-time` measures instead the CPU time of
one call on one torch thread (best of 7), which other processes on a shared machine disturb much less.
"""
from __future__ import annotations

import sys
import time

import pytest
import torch
from bench_reverse_step import reference_drawing_z
from bench_training_sample import reference_drawing_noise
from triton_cases import compile_reference

from svnr_fast import Schedule, reference
from svnr_fast.ops import backends

SHAPES = [(4, 3, 256, 256), (16, 3, 512, 512)]
OPS = ("gamma", "time_from_variance", "time_map", "reverse_step", "reverse_step_eta0", "training_sample")


def _inputs(shape):
    gen = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    x = torch.rand(shape, generator=gen)
    return {
        "x": x,
        "noise": torch.randn(shape, generator=gen),
        "tau_image": torch.rand(shape, generator=gen) * 1000,
        "variance": 0.01 + 0.04 * x,
        "tau": torch.rand((B, 1, H, W), generator=gen) * 100,
        "delta": torch.full((B,), 2.0),
        "sigma_r": torch.rand(B, generator=gen) * 0.05,
        "sigma_s": torch.rand(B, generator=gen) * 0.2,
        "u": torch.rand(B, generator=gen),
        "table": Schedule().table,
    }


def _reverse_step_eta0(x, eps_hat, tau, delta, table):
    return reference._reverse_step(x, eps_hat, tau, delta, table, 0.0, None, None, None, 0, 0, False)


def calls(op: str, shape) -> dict:
    """{impl: callable} for one op and shape, and its bytes_moved under "bytes"."""
    a = _inputs(shape)
    n, pixels = a["x"].numel(), shape[0] * shape[2] * shape[3]
    table = a["table"]
    if op in ("gamma", "time_from_variance"):
        value = a["tau_image"] if op == "gamma" else a["variance"]
        args, fn, nbytes = (value, table), getattr(reference, "_" + op), 8 * n
        fused = lambda: getattr(torch.ops.svnr, op)(*args)  # noqa: E731
    elif op == "time_map":
        args, fn, nbytes = (a["variance"], table), reference._time_map, 4 * n + 4 * pixels
        fused = lambda: torch.ops.svnr.time_map(*args)  # noqa: E731
    elif op.startswith("reverse_step"):
        args = (a["x"], a["noise"], a["tau"], a["delta"], table)
        eta = 0.0 if op == "reverse_step_eta0" else 1.0
        fn = _reverse_step_eta0 if eta == 0 else reference_drawing_z
        nbytes = 12 * n + 8 * pixels
        fused = lambda: torch.ops.svnr.reverse_step(*args, eta, None, None, None, 0, 0, False)  # noqa: E731
    else:
        args = (a["x"], a["sigma_r"], a["sigma_s"], a["u"], table)
        fn, nbytes = reference_drawing_noise, 16 * n + 4 * pixels
        fused = lambda: torch.ops.svnr.training_sample(*args, True, None, None, 0, 0, False, False, 0.0)  # noqa: E731
    compiled = compile_reference(fn)
    copy_source, copy_target = a["x"], torch.empty_like(a["x"])
    return {"cpp": fused, "eager": lambda: fn(*args), "compiled": lambda: compiled(*args),
            "copy": lambda: copy_target.copy_(copy_source), "bytes": nbytes, "copy_bytes": 8 * n}


def _require_cpp(op: str) -> None:
    name = "reverse_step" if op.startswith("reverse_step") else op
    choice = backends.choose(name, "cpu")
    if choice.backend != "cpp":
        pytest.skip(f"{name} on CPU dispatches to {choice.backend} ({choice.reason}), not the C++ kernel")


@pytest.mark.parametrize("impl", ["eager", "compiled", "cpp", "copy"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernel(benchmark, shape, op, impl):
    if impl == "cpp":
        _require_cpp(op)
    fns = calls(op, shape)
    benchmark.group = f"{op} {'x'.join(map(str, shape))} float32 (cpu)"
    benchmark.extra_info["bytes_moved"] = fns["copy_bytes" if impl == "copy" else "bytes"]
    fns[impl]()   # compile / warm up outside the timed rounds
    benchmark.pedantic(fns[impl], rounds=10, warmup_rounds=1)


def _best_ms(fn, seconds: float = 1.0) -> float:
    fn()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _best_cpu_ms(fn, repeats: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best * 1e3


def main(cpu_time: bool) -> None:
    ext = backends.extension()[0]
    if cpu_time:
        torch.set_num_threads(1)
    measure = _best_cpu_ms if cpu_time else _best_ms
    what = "CPU time of one call, one thread, best of 7" if cpu_time else "wall time, best of repeated calls over 1 s"
    print(f"torch threads {torch.get_num_threads()}; C++ kernels: {ext.cpu_isa() if ext else 'not built'}; {what}")
    print(f"{'op':20s} {'shape':14s} {'cpp ms':>8s} {'eager ms':>9s} {'compiled':>9s} {'copy ms':>8s} "
          f"{'GB/s':>6s} {'% copy':>7s} {'vs eager':>8s}")
    for shape in SHAPES:
        for op in OPS:
            fns = calls(op, shape)
            ms = {impl: measure(fns[impl]) for impl in ("cpp", "eager", "compiled", "copy")}
            gb_s = fns["bytes"] / ms["cpp"] / 1e6
            copy_gb_s = fns["copy_bytes"] / ms["copy"] / 1e6
            print(f"{op:20s} {'x'.join(map(str, shape)):14s} {ms['cpp']:8.3f} {ms['eager']:9.3f} "
                  f"{ms['compiled']:9.3f} {ms['copy']:8.3f} {gb_s:6.1f} {100 * gb_s / copy_gb_s:6.1f}% "
                  f"{ms['eager'] / ms['cpp']:7.1f}x")
            sys.stdout.flush()


if __name__ == "__main__":
    main(cpu_time="--cpu-time" in sys.argv[1:])
