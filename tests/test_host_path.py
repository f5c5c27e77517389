"""The host path: benchmarks/bench_host_path.py runs, and kernels/_launch.py launches what Triton would.

Both need kernels compiled for a GPU target, which the interpreter the other tests use (TRITON_INTERPRET=1,
set before the kernels are imported) rules out, so each runs in a fresh process without it: on a machine
without a GPU the kernels compile for sm_90 and launch into the benchmark's stub driver, which records the
arguments of Triton's C launch function.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("triton")


def _run_fresh(*args: str, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_bench_host_path_runs():
    rows = json.loads(_run_fresh("benchmarks/bench_host_path.py", "--json", "--ops", "reverse_step,groupnorm_film",
                                 "--calls", "3", "--repeats", "2"))
    timed = {(row["op"], row["pass"]) for row in rows}
    assert timed == {("torch.add", "forward"), ("torch.add", "forward+backward"), ("empty Library op", "forward"),
                     ("reverse_step", "forward"),
                     ("groupnorm_film", "forward"), ("groupnorm_film", "backward"),
                     ("groupnorm_film", "forward+backward")}
    assert all(row["us"] > 0 for row in rows)


def test_fast_launches_pass_what_triton_passes():
    """Every kernel variant the ops launch, and calls whose specialisation differs (an unaligned pointer, an
    RNG seed beyond 32 bits, sizes of 1): kernels/_launch.py's cached launch hands Triton's C launch function
    the arguments JITFunction.run would, for the kernel JITFunction.run would pick."""
    report = json.loads(_run_fresh(__file__, "compare-launches"))
    assert report["compared"] >= 12, report
    assert report["mismatches"] == [], report
    assert report["fast"] >= 10, report           # the cached path did run (not Triton's every time)
    assert report["triton_for_unaligned"], report  # an unaligned pointer goes through Triton's own path


def test_cuda_glue_hands_the_extension_its_tensors(monkeypatch):
    """groupnorm_film's CUDA glue, run on CPU tensors against a stand-in of the extension's CUDA entry point
    (as bench_host_path.py stubs it): the shape, every tensor's address, the workspace, device and stream."""
    import torch

    from svnr_fast.ops import backends
    glue = sys.modules["svnr_fast.ops.groupnorm_film"]
    ext, _ = backends.extension()
    if ext is None or not hasattr(ext, "groupnorm_film_cuda_workspace_bytes"):
        pytest.skip("svnr_fast._C was built without its CUDA kernels")
    calls = []
    stub = type(sys)("stub")
    stub.groupnorm_film_cuda = lambda *args: calls.append(args)
    stub.groupnorm_film_cuda_workspace_bytes = ext.groupnorm_film_cuda_workspace_bytes
    monkeypatch.setattr(backends, "extension", lambda: (stub, None))
    monkeypatch.setattr(backends, "cuda_stream", lambda device: 1234)
    B, C, H, W, groups, K = 2, 8, 4, 5, 4, 9
    h, u = torch.randn(B, C, H, W), torch.rand(B, 1, H, W) * (K - 1)
    table, weight, bias = torch.randn(K, 2 * C), torch.randn(C), torch.randn(C)

    out, mean, rstd = glue.fused_forward_cuda(h, u, table, weight, bias, groups, 1e-5, "silu")
    backward, shape, addresses, eps, silu, workspace, device, stream = calls[-1]
    assert (backward, shape, eps, silu, device, stream) == (False, (0, B, C, H * W, groups, K, False), 1e-5, True,
                                                            -1, 1234)
    assert addresses == tuple(t.data_ptr() for t in (h, u, table, weight, bias, out, mean, rstd)) + (0,) * 5
    assert workspace != 0

    grad_out = torch.randn_like(h)
    grad_h, grad_table, grad_weight, grad_bias = glue.fused_backward_cuda(grad_out, h, u, table, weight, bias, mean,
                                                                         rstd, groups, "identity")
    backward, shape, addresses, _, silu, _, _, _ = calls[-1]
    assert backward and not silu and shape == (0, B, C, H * W, groups, K, False)
    assert addresses == (h.data_ptr(), u.data_ptr(), table.data_ptr(), weight.data_ptr(), bias.data_ptr(), 0,
                         mean.data_ptr(), rstd.data_ptr(), grad_out.data_ptr(), grad_h.data_ptr(),
                         grad_table.data_ptr(), grad_weight.data_ptr(), grad_bias.data_ptr())

    # channels_last h is read in place; bfloat16 parameters are converted to the compute dtype first
    h_last = h.to(memory_format=torch.channels_last)
    glue.fused_forward_cuda(h_last, u, table.bfloat16(), weight, bias, groups, 1e-5, "silu")
    _, shape, addresses, *_ = calls[-1]
    assert shape[-1] is True and addresses[0] == h_last.data_ptr() and addresses[2] != 0


# ---------------------------------------------------------------------------------------------------
# What the fresh process runs
# ---------------------------------------------------------------------------------------------------

def _cases():
    """(name, wrapper call) for every kernel variant and the specialisation edge cases."""
    import torch

    from svnr_fast import Schedule
    from svnr_fast.kernels import lookup, reverse_step, training_sample

    gen = torch.Generator().manual_seed(0)
    table = Schedule().table

    def image(*shape):
        return torch.rand(shape, generator=gen)

    def unaligned(*shape):
        """A tensor whose data pointer is 4 bytes past a 16-byte boundary."""
        n = 1
        for size in shape:
            n *= size
        return torch.rand(n + 1, generator=gen)[1:].view(shape)

    x, eps, z = image(2, 3, 32, 32), image(2, 3, 32, 32), image(2, 3, 32, 32)
    tau = image(2, 1, 32, 32) * 100
    per_image = torch.full((2,), 0.1)
    strided, eps_strided = image(2, 3, 32, 64)[..., ::2], image(2, 3, 32, 64)[..., ::2]
    tau_strided = tau.transpose(2, 3)
    one = image(1, 1, 1, 1)
    large = image(2, 1, 512, 512)
    return [
        ("gamma", lambda: lookup.gamma(tau, table)),
        ("time_from_variance", lambda: lookup.time_from_variance(x, table)),
        ("time_map", lambda: lookup.time_map(x, table)),
        ("time_map strided", lambda: lookup.time_map(strided, table)),
        ("reverse_step", lambda: reverse_step.reverse_step(x, eps, tau, per_image, table, 1.0, None, None, None,
                                                           7, 3, False)),
        ("reverse_step z clamp x0_hat", lambda: reverse_step.reverse_step(
            x, eps, tau, per_image, table, 0.5, z, -1.0, 2.0, 7, 3, True)),
        ("reverse_step eta 0 strided", lambda: reverse_step.reverse_step(
            strided, eps_strided, tau_strided, per_image, table, 0.0, None, None, None, 0, 0, False)),
        ("reverse_step seed > 2**32", lambda: reverse_step.reverse_step(
            x, eps, tau, per_image, table, 1.0, None, None, None, 2**40 + 5, 2**35, False)),
        ("reverse_step sizes of 1", lambda: reverse_step.reverse_step(
            one, one, one, per_image[:1], table, 1.0, None, None, None, 1, 1, False)),
        ("reverse_step unaligned", lambda: reverse_step.reverse_step(
            unaligned(2, 3, 32, 32), eps, tau, per_image, table, 1.0, None, None, None, 7, 3, False)),
        ("training_sample", lambda: training_sample.training_sample(
            x, per_image, per_image, per_image, table, True, None, None, 7, 3, False, False, 0.0)),
        ("training_sample noise given, uncorrelated", lambda: training_sample.training_sample(
            x, per_image, per_image, per_image, table, False, eps, z, 7, 3, False, False, 0.0)),
        ("training_sample per-channel, one t0 per batch, std floor", lambda: training_sample.training_sample(
            x, per_image, per_image, per_image, table, True, None, None, 7, 3, True, True, 0.05)),
        ("training_sample two-pass (more programs than SMs)", lambda: training_sample.training_sample(
            large, per_image, per_image, per_image, table, True, None, None, 7, 3, False, False, 0.0)),
        ("reverse_step per-channel", lambda: reverse_step.reverse_step(
            x, eps, image(2, 3, 32, 32) * 100, per_image, table, 1.0, None, None, None, 7, 3, False)),
    ]


def _compare_launches() -> dict:
    """Runs each case, then replays each of its launches through the launcher (now cached) and through
    kernel[grid](...) (JITFunction.run), and compares what the stub launch function received."""
    import bench_host_path
    from triton import knobs

    from svnr_fast.kernels import _triton_common

    bench_host_path.install_stubs()
    record = bench_host_path.LaunchRecord
    launches = []

    def recording_launch(kernel, grid, data, args, constants):
        launches.append((kernel, grid, data, args, constants))
        real_run(kernel, grid, data, *args, **constants)

    def recording_run(kernel, grid, data, *args, **constants):
        recording_launch(kernel, grid, data, args, constants)

    recording = {"run": recording_run, "launch": recording_launch}    # what the modules launch through
    real_run = _triton_common.run
    modules = [sys.modules[f"svnr_fast.kernels.{name}"] for name in ("lookup", "reverse_step", "training_sample")]
    triton_runs = []
    report = {"compared": 0, "fast": 0, "mismatches": [], "triton_for_unaligned": False}
    for name, call in _cases():
        launches.clear()
        for module in modules:
            for function, recorder in recording.items():
                if hasattr(module, function):
                    setattr(module, function, recorder)
        try:
            call()
        finally:
            for module in modules:
                for function in recording:
                    if hasattr(module, function):
                        setattr(module, function, getattr(_triton_common, function))
        for kernel, grid, data, args, constants in launches:
            through_triton = kernel.run
            kernel.run = lambda *a, _run=through_triton, **k: (triton_runs.append(1), _run(*a, **k))[1]
            try:
                for hooked in (False, True):
                    hook = (lambda metadata: None) if hooked else None
                    if hook:
                        knobs.runtime.launch_enter_hook.add(hook)
                    try:
                        triton_runs.clear()
                        real_run(kernel, grid, data, *args, **constants)
                        fast, used_triton = record.last, bool(triton_runs)
                        kernel[grid](*args, **constants, **_triton_common.LAUNCH)
                        slow = record.last
                    finally:
                        if hook:
                            knobs.runtime.launch_enter_hook.remove(hook)
                    report["compared"] += 1
                    report["fast"] += not used_triton
                    if "unaligned" in name and used_triton:
                        report["triton_for_unaligned"] = True
                    difference = _difference(fast, slow, hooked or used_triton)
                    if difference:
                        report["mismatches"].append(f"{name} (hook: {hooked}): {difference}")
            finally:
                kernel.run = through_triton
    return report


METADATA, ENTER_HOOK, EXIT_HOOK = 8, 9, 10   # positions in the C launch function's arguments


def _difference(fast: tuple, slow: tuple, exact_hooks: bool) -> str | None:
    """What differs between two recorded launches, or None. With no hook registered the fast path passes
    None for the metadata and the (empty) hook chains, which the C launcher then does not call."""
    if len(fast) != len(slow):
        return f"{len(fast)} arguments vs {len(slow)}"
    for i, (a, b) in enumerate(zip(fast, slow)):
        if i == METADATA:
            if exact_hooks and (a is None) != (b is None) or a is not None and b is not None and a.get() != b.get():
                return f"launch metadata {a and a.get()} vs {b and b.get()}"
            if not exact_hooks and a is not None:
                return f"launch metadata {a.get()} where no hook is registered"
        elif i in (ENTER_HOOK, EXIT_HOOK):
            if exact_hooks and a is not b:
                return f"hook {a!r} vs {b!r}"
            if not exact_hooks and a is not None and (a is not b or a.calls):
                return f"hook {a!r} where no hook is registered"
        elif isinstance(a, tuple):
            if len(a) != len(b) or any(p is not q and p != q for p, q in zip(a, b)):
                return f"argument {i}: {a} vs {b}"
        elif a is not b and a != b:
            return f"argument {i}: {a!r} vs {b!r}"
    return None


if __name__ == "__main__" and sys.argv[1:] == ["compare-launches"]:
    print(json.dumps(_compare_launches()))
