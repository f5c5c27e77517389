"""What every benchmark shares: the case description, GPU timing, the copy-bandwidth ceiling, CSV rows.

Each `benchmarks/bench_<op>.py` defines `gpu_cases(device) -> Iterable[Case]`, which
`benchmarks/gpu_suite.py` times on a GPU, and pytest-benchmark tests for `pytest benchmarks/ --benchmark-only`.

On a GPU the suite also times the fused column inside a CUDA graph (impl `fused-cudagraph`): the device
time of the kernels without the host side of a call (Python, op dispatch, argument handling, the Triton
launcher), which dominates small sizes. For the ops named in CUDA_GRAPH_OPS it captures CUDA_GRAPH_CALLS
back-to-back calls of `Case.fused` (cuda_graph_median_ms); a Case whose work is a whole pipeline gives its
own graph-replaying callable as `Case.fused_cudagraph` instead.
"""
from __future__ import annotations

import csv
import datetime
import os
import subprocess
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from svnr_fast.ops import backends

RESULTS = Path(__file__).resolve().parent / "results"
CSV_COLUMNS = ("op,impl,shape,dtype,device,ms_median,gb_per_s,pct_copy_bw,speedup_vs_eager,"
               "speedup_vs_compiled,torch,triton,git_sha,date").split(",")


class Case(NamedTuple):
    op: str                       # e.g. "reverse_step", "groupnorm_film_fwd"
    shape: str                    # e.g. "16x3x512x512"
    dtype: str                    # "float32", "bfloat16", ...
    bytes_moved: int              # the fewest bytes the op must move (each input read once, each output written once)
    fused: Callable[[], object]
    eager: Callable[[], object]
    compiled: Callable[[], object] | None   # torch.compile(reference); None where it does not apply
    # a whole run of `fused` replayed from a CUDA graph captured once (for pipelines such as denoising)
    fused_cudagraph: Callable[[], object] | None = None


# Cases (by op) whose `fused` call can be captured in a CUDA graph as it is: no host synchronisation, the
# Triton kernels take the RNG seed and offset as plain ints (baked into the graph, as a replay of fixed
# inputs wants), groupnorm_film's forward runs on torch's current stream. Named here, not in each Case,
# so that bench_groupnorm_film.py needs no change; its bwd passes (autograd.grad) are left out.
CUDA_GRAPH_OPS = frozenset({"reverse_step", "reverse_step_given_z", "training_sample", "training_sample_given_noise",
                            "groupnorm_film_fwd"})
CUDA_GRAPH_CALLS = 20


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def gpu_median_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 200) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def cuda_graph_median_ms(fn: Callable[[], object], calls: int = CUDA_GRAPH_CALLS) -> float:
    """Median time of one call of `fn` inside a CUDA graph of `calls` back-to-back calls on the same inputs.

    Replays are timed as gpu_median_ms times any function (L2 flushed before each replay, not between
    the calls inside it: at sizes much larger than L2 the streaming access order leaves nothing for the
    next call to hit; at sizes that fit in L2 the later calls do hit it). Warm-up on a side stream first,
    as torch.cuda.graph requires: lazy initialisation and kernel compilation must not happen in a capture.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return gpu_median_ms(graph.replay) / calls
    finally:
        graph.reset()   # give its memory pool back before the next case allocates


def copy_bandwidth_gb_per_s(device: str = "cuda", nbytes: int = 2 * 1024**3) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = gpu_median_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def git_sha() -> str:
    """SVNR_GIT_SHA when set (copies of the tree without .git, such as a lent GPU machine's), else git's."""
    if os.environ.get("SVNR_GIT_SHA"):
        return os.environ["SVNR_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {"torch": torch.__version__, "triton": triton_version, "git_sha": git_sha(),
            "date": datetime.date.today().isoformat()}


def append_rows(path: Path, rows: list[dict]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})


def with_backend(backend: str | None, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with `backend` forced (None: automatic choice), as SVNR_FAST_BACKEND does; restored afterwards."""
    def run():
        before = backends.forced()
        backends.set_backend(backend)
        try:
            return fn()
        finally:
            backends.set_backend(before)
    return run
