"""Host cost of one svnr op call: microseconds of Python and dispatch per call, the device work left out.

    python benchmarks/bench_host_path.py [--json] [--ops reverse_step,groupnorm_film] [--calls N] [--repeats N]

Times `torch.ops.svnr.<op>` (the raw op the public functions and the sampler call): the forward of every op,
and for groupnorm_film its backward op and a forward with gradients followed by torch.autograd.grad. Each
figure is the best of `--repeats` loops of `--calls` calls, after a warm-up that compiles and fills caches.

On a machine with a CUDA GPU it times the real calls on CUDA tensors (wall time; launches are queued, the
loop ends with one synchronize). Without one it times the CUDA path with the launches stubbed at the driver
boundary (`install_stubs`), on CPU tensors standing in for CUDA tensors (thread CPU time, which the other
processes of a shared machine inflate less than wall time):

- Dispatch: `svnr::<op>` is called on CPU tensors; the op's CPU kernel is pointed at the implementation the
  CUDA kernel runs (backends.serve), so the dispatcher does the same work under the CPU key.
- Triton: the active driver is a GPUTarget("cuda", 90, 32) driver whose kernels really compile (Triton's
  bundled ptxas), so every Python step of a launch runs: kernels/_launch.py's key and cache lookup, or on a
  first launch Triton's JITFunction.run (binding, specialisation, cache) and CudaLauncher.__call__. Only
  Triton's compiled C launch function is a no-op, which still calls the launch enter/exit hooks it is given
  (Python, as the C function does); its device and stream queries return -1 (what tensor.get_device() says
  of a CPU tensor, so the launcher's same-device test passes as for CUDA tensors) and 0.
- The extension: its CUDA entry points (svnr_fast._C.*_cuda) are Python no-ops taking the same arguments,
  backends.cuda_stream returns 0; the glue in svnr_fast/ops/groupnorm_film.py runs fully.

What a real CUDA call does that is not timed here: the C side of the launches (Triton's C function converts
the arguments, calling data_ptr() and cuPointerGetAttribute per tensor, then cuLaunchKernelEx; pybind11
converts the extension's arguments); torch.cuda.current_device() and the raw stream query (about a
microsecond together); the CUDA caching allocator in place of the CPU one behind torch.empty_like (the same
Python). Rows `torch.add` (forward, and forward + autograd.grad) on tensors of the same size and an empty
op registered with torch.library.Library give the fixed costs of a call.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from typing import Callable, NamedTuple

import torch

PASSES = ("forward", "backward", "forward+backward")


# ---------------------------------------------------------------------------------------------------
# The stubs
# ---------------------------------------------------------------------------------------------------

STUB_DEVICE = -1    # what tensor.get_device() gives for the CPU tensors standing in for CUDA ones
STUB_STREAM = 0


class LaunchRecord:
    """The arguments of the latest stubbed launch (Triton or extension), for tests."""
    last: tuple | None = None


def _record_launch(*args):
    LaunchRecord.last = args


def _triton_launch(gridX, gridY, gridZ, stream, function, launch_cooperative_grid, launch_pdl, kernel_metadata,
                   launch_metadata, launch_enter_hook, launch_exit_hook, *rest):
    """Triton's C launch function without the launch: it calls the enter and exit hooks (Python) around it."""
    if launch_enter_hook is not None:
        launch_enter_hook(launch_metadata)
    LaunchRecord.last = (gridX, gridY, gridZ, stream, function, launch_cooperative_grid, launch_pdl, kernel_metadata,
                         launch_metadata, launch_enter_hook, launch_exit_hook, *rest)
    if launch_exit_hook is not None:
        launch_exit_hook(launch_metadata)


def _stub_triton_driver():
    """A Triton driver for GPUTarget("cuda", 90, 32) that compiles for real and launches nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import GPUDriver
    from triton.backends.nvidia.driver import CudaLauncher, ty_to_cpp

    class StubLauncher(CudaLauncher):
        """Triton's CudaLauncher with its C launch function replaced by a no-op: __call__ (scratch
        allocation, hooks) is Triton's own. What __init__ prepares only for the C function is left out."""

        def __init__(self, src, metadata):
            self.gsan_enabled = False
            self.num_ctas = getattr(metadata, "num_ctas", 1)
            self.launch = _triton_launch
            self.arg_annotations = self.kernel_signature = None
            self.global_scratch_size = metadata.global_scratch_size
            self.global_scratch_align = metadata.global_scratch_align
            self.profile_scratch_size = metadata.profile_scratch_size
            self.profile_scratch_align = metadata.profile_scratch_align
            self.launch_cooperative_grid = metadata.launch_cooperative_grid
            self.launch_pdl = metadata.launch_pdl

    class StubUtils:
        handles = itertools.count(1)

        def load_binary(self, name, kernel, shared, device):
            # module, function (one handle per loaded kernel, so tests can tell kernels apart), registers,
            # spills, max threads per block
            handle = next(self.handles)
            return handle, handle, 0, 0, 1024

        @staticmethod
        def unload_module(module):
            pass

        @staticmethod
        def get_device_properties(device):   # an H100's
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                    "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    class StubDriver(GPUDriver):
        def __init__(self):   # GPUDriver's would bind torch.cuda's queries
            self.utils = StubUtils()
            self.launcher_cls = StubLauncher
            self.target = GPUTarget("cuda", 90, 32)

        @staticmethod
        def is_active():
            return True

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return STUB_DEVICE

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device):
            return STUB_STREAM

        def get_device_capability(self, device):
            return 9, 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def map_python_to_cpp_type(self, ty):
            return ty_to_cpp(ty)

        def get_benchmarker(self):
            raise NotImplementedError

    return StubDriver()


def _stub_extension(ext):
    """svnr_fast._C with each CUDA launch entry point (a callable named *_cuda) replaced by a no-op that
    records its arguments; everything else (workspace sizes, build_info) is the real module's."""
    import types
    stub = types.ModuleType(ext.__name__, ext.__doc__)
    for name in dir(ext):
        if not name.startswith("__"):
            setattr(stub, name, _record_launch if name.endswith("_cuda") else getattr(ext, name))
    return stub


def install_stubs() -> None:
    """Stub the launches (module docstring) and point each op's CPU kernel at its CUDA implementation."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the stubbed host path compiles kernels for sm_90: unset TRITON_INTERPRET")
    import triton

    from svnr_fast.ops import backends
    triton.runtime.driver.set_active(_stub_triton_driver())
    ext, _ = backends.extension()
    if ext is not None:
        stub = _stub_extension(ext)
        backends.extension = lambda: (stub, None)
    backends.cuda_stream = lambda device_index: STUB_STREAM
    for op in backends.ops():
        backends.serve(op, "cpu", backends.implementation(op, "cuda"))


# ---------------------------------------------------------------------------------------------------
# The calls
# ---------------------------------------------------------------------------------------------------

class Row(NamedTuple):
    op: str
    pass_: str
    call: Callable[[], object]


def _empty_op():
    """svnr_bench::empty(Tensor x, Tensor y) -> Tensor, a kernel that returns x: what any op call pays."""
    library = torch.library.Library("svnr_bench", "DEF")
    library.define("empty(Tensor x, Tensor y) -> Tensor")
    for key in ("CPU", "CUDA"):
        library.impl("empty", lambda x, y: x, key)
    return library, torch.ops.svnr_bench.empty


def rows(device: torch.device) -> list[Row]:
    """The timed calls: every svnr op on small tensors (their size does not matter to the host)."""
    from svnr_fast import Schedule
    svnr = torch.ops.svnr
    gen = torch.Generator(device=device).manual_seed(0)
    B, C, H, W = 2, 3, 32, 32
    table = Schedule().table.to(device)
    x = torch.rand((B, C, H, W), generator=gen, device=device)
    eps_hat = torch.randn((B, C, H, W), generator=gen, device=device)
    tau = torch.rand((B, 1, H, W), generator=gen, device=device) * 100
    per_image = torch.full((B,), 0.1, device=device)
    delta = torch.full((B,), 2.0, device=device)

    groups, K = 8, 257
    h = torch.randn((B, 32, 16, 16), generator=gen, device=device)
    u = torch.rand((B, 1, 16, 16), generator=gen, device=device) * (K - 1)
    film_table = torch.randn((K, 2 * h.shape[1]), generator=gen, device=device) * 0.1
    weight = torch.ones(h.shape[1], device=device)
    bias = torch.zeros(h.shape[1], device=device)
    film = (h, u, film_table, weight, bias, groups, 1e-5, "silu")
    _, mean, rstd = svnr.groupnorm_film(*film)
    grad_out = torch.randn_like(h)
    leaves = [t.detach().requires_grad_() for t in (h, film_table, weight, bias)]

    def forward_backward():
        out = svnr.groupnorm_film(leaves[0], u, leaves[1], leaves[2], leaves[3], groups, 1e-5, "silu")[0]
        return torch.autograd.grad(out, leaves, grad_out)

    # the fixed cost of a forward with gradients and a torch.autograd.grad call, on an op of the same tensors
    summands = [t.detach().requires_grad_() for t in (h, grad_out)]

    library, empty = _empty_op()
    return [
        Row("torch.add", "forward", lambda: torch.add(x, eps_hat)),
        Row("torch.add", "forward+backward",
            lambda: torch.autograd.grad(torch.add(*summands), summands, grad_out)),
        Row("empty Library op", "forward", lambda: empty(x, eps_hat)),
        Row("gamma", "forward", lambda: svnr.gamma(tau, table)),
        Row("time_from_variance", "forward", lambda: svnr.time_from_variance(x, table)),
        Row("time_map", "forward", lambda: svnr.time_map(x, table)),
        Row("training_sample", "forward", lambda: svnr.training_sample(
            x, per_image, per_image, per_image, table, True, None, None, 0, 0, False, False, 0.0)),
        Row("reverse_step", "forward", lambda: svnr.reverse_step(
            x, eps_hat, tau, delta, table, 1.0, None, None, None, 0, 0, False)),
        Row("groupnorm_film", "forward", lambda: svnr.groupnorm_film(*film)),
        Row("groupnorm_film", "backward", lambda: svnr.groupnorm_film_backward(
            grad_out, h, u, film_table, weight, bias, mean, rstd, groups, "silu")),
        Row("groupnorm_film", "forward+backward", forward_backward),
    ], library


def time_call(call: Callable[[], object], calls: int, repeats: int, synchronize: Callable[[], None],
              clock: Callable[[], float]) -> float:
    """Microseconds per call: the best of `repeats` loops of `calls` calls (the least disturbed by the
    other processes on a shared machine), after a warm-up that compiles and fills the caches."""
    for _ in range(20):
        call()
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        for _ in range(calls):
            call()
        synchronize()
        best = min(best, clock() - start)
    return best / calls * 1e6


def measure(ops: list[str] | None = None, calls: int = 500, repeats: int = 20) -> list[dict]:
    """[{"op", "pass", "us"}] for the rows whose op is in `ops` (all when None; the baselines always)."""
    cuda = torch.cuda.is_available()
    if not cuda:
        install_stubs()
    device = torch.device("cuda" if cuda else "cpu")
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    # without a GPU: the CPU time of this thread, which the other processes sharing the machine inflate less
    # than wall time (with a GPU: wall time, which includes the device's work the loop waits for at its end)
    clock = time.perf_counter if cuda else time.thread_time
    timed, _library = rows(device)
    results = []
    for row in timed:
        if ops is not None and row.op not in ops and row.op not in ("torch.add", "empty Library op"):
            continue
        results.append({"op": row.op, "pass": row.pass_,
                        "us": round(time_call(row.call, calls, repeats, synchronize, clock), 2)})
    return results


def table_text(results: list[dict]) -> str:
    lines = [f"{'op':<20} {'pass':<17} {'us/call':>8}"]
    lines += [f"{r['op']:<20} {r['pass']:<17} {r['us']:>8.2f}" for r in results]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help='print [{"op", "pass", "us"}] instead of a table')
    parser.add_argument("--ops", help="comma-separated ops to time (default: all)")
    parser.add_argument("--calls", type=int, default=500, help="calls per timed loop")
    parser.add_argument("--repeats", type=int, default=20, help="timed loops; the fastest counts")
    args = parser.parse_args(argv)
    results = measure(args.ops.split(",") if args.ops else None, args.calls, args.repeats)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        where = torch.cuda.get_device_name() if torch.cuda.is_available() else "this CPU, launches stubbed"
        print(f"host us per call ({where}; torch {torch.__version__})")
        print(table_text(results))


if __name__ == "__main__":
    main()
