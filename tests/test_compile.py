"""Compilation: torch.compile(fullgraph=True) around the svnr:: ops, and the Triton kernels built for a GPU.

1. A sampling step (the raw op, as svnr_fast.sampling calls it, and the checked public function) and a
   training-sample step compile with fullgraph=True (no graph break), give the eager results, and do not
   recompile for every new RNG offset: on CPU with the reference and (interpreted) Triton backends, and
   on a GPU with the Triton kernels.
2. Without a GPU the interpreter runs the kernels, but the compiled (PTX) path differs from it (e.g. a
   variable must have one type across a runtime `if`). Run as a script, this file intercepts every kernel
   launch and compiles it ahead of time for sm_90 instead, so such errors surface on a CPU machine too.
"""
import os
import subprocess
import sys

import pytest
import torch
from conftest import requires_cuda
from triton_devices import requires_interpreter

from svnr_fast import Schedule, ops

TABLE = Schedule().table
BACKENDS = [("reference", "cpu"), pytest.param("triton", "cpu", marks=requires_interpreter),
            pytest.param("triton", "cuda", marks=[requires_cuda, pytest.mark.cuda])]


def raw_sampling_step(x, eps_hat, tau, delta, table, offset):
    x, tau, _ = torch.ops.svnr.reverse_step(x, eps_hat, tau, delta, table, 1.0, None, None, None, 7, offset, False)
    return x, tau


def public_sampling_step(x, eps_hat, tau, delta, table, offset):
    return ops.reverse_step(x, eps_hat, tau, delta, table, eta=0.5, clamp=(0.0, 1.0), seed=1, offset=offset)


def training_step(x0, sigma_r, sigma_s, u, table, offset):
    sample = ops.training_sample(x0, sigma_r, sigma_s, u, table, seed=3, offset=offset)
    return sample.x_t, sample.target, ops.gamma(sample.tau, table)


@pytest.mark.parametrize("name, device", BACKENDS)
@pytest.mark.parametrize("step", [raw_sampling_step, public_sampling_step, training_step])
def test_fullgraph_compile_matches_eager(backend, name, device, step):
    from torch._dynamo.testing import CompileCounterWithBackend

    backend(name)
    torch._dynamo.reset()
    x = torch.rand(2, 3, 8, 8)
    if step is training_step:
        args = (x, torch.tensor([0.02, 0.1]), torch.tensor([0.1, 0.05]), torch.tensor([0.3, 0.8]), TABLE)
    else:
        args = (x, torch.randn_like(x), torch.rand(2, 1, 8, 8) * 50, torch.tensor([1.0, 2.0]), TABLE)
    args = tuple(a.to(device) for a in args)
    # on a GPU aot_eager (capture + fake kernels, no code generation) keeps the GPU suite's test time down
    counter = CompileCounterWithBackend("inductor" if device == "cpu" else "aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for offset in range(4):
        for got, want in zip(compiled(*args, offset), step(*args, offset)):
            assert torch.equal(got, want)
    assert counter.frame_count <= 2      # the first call, then once more with a dynamic offset


def aot_compile_every_kernel_for_sm90() -> list[str]:
    """Call every kernel wrapper on CPU tensors with launches redirected to triton.compile for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    target = GPUTarget("cuda", 90, 32)
    built = []

    def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
        # the steps of JITFunction.run up to the compile, with a fixed target instead of the active driver's
        backend = make_backend(target)
        binder = jit.create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, _ = binder(*args, **kwargs)
        types = [s[0] for s in specialization]
        constexprs = {path: jit.get_iterable_path(list(bound.values()), path)
                      for path in jit.find_paths_if(types, lambda _, t: t == "constexpr")}
        values = [s[1] for s in specialization]
        attrs = {path: backend.parse_attr(jit.get_iterable_path(values, path))
                 for path in jit.find_paths_if(values, lambda _, v: isinstance(v, str))}
        signature = {param.name: t for param, t in zip(self.params, types)}
        triton.compile(ASTSource(self, signature, constexprs, attrs), target=target,
                       options=backend.parse_options(kwargs).__dict__)
        flags = {self.params[path[0]].name: value for path, value in constexprs.items()}
        built.append(f"{self.__name__} {flags}")

    jit.JITFunction.run = compile_instead_of_launch
    from svnr_fast.kernels import lookup, reverse_step, training_sample

    table = TABLE
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = torch.rand(2, 3, 8, 8).to(dtype)
        strided = x.transpose(2, 3)
        compute_table = table.to(torch.float64 if dtype == torch.float64 else torch.float32)
        tau = torch.rand(2, 1, 8, 8, dtype=compute_table.dtype)
        per_image = torch.ones(2)
        if dtype in (torch.float32, torch.float64):
            values = x.to(compute_table.dtype)
            lookup.gamma(values, compute_table)
            lookup.time_from_variance(values, compute_table)
            lookup.time_map(values, compute_table)
            lookup.time_map(values.transpose(2, 3), compute_table)
        tau_per_channel = torch.rand(2, 3, 8, 8, dtype=compute_table.dtype)
        for eta, z, clamp, return_x0_hat, data, time in (
                (1.0, None, (0.0, 1.0), False, x, tau), (0.5, x, None, True, x, tau), (0.0, None, None, False, x, tau),
                (1.0, None, (0.0, 1.0), True, strided, tau), (0.7, x, None, False, x, tau_per_channel)):
            reverse_step.reverse_step(data, data, time, per_image, compute_table, eta, z, *(clamp or (None, None)),
                                      1, 2**33, return_x0_hat)
        for noise, correlated, conventions, data in (
                ((None, None), True, (False, False, 0.0), x), ((x, x), False, (False, False, 0.0), x),
                ((x, None), True, (True, False, 0.1), x), ((None, x), True, (False, True, 0.0), strided)):
            training_sample.training_sample(data, per_image, per_image, per_image, compute_table, correlated, *noise,
                                            1, 2**33, *conventions)
    return built


def test_every_kernel_compiles_for_sm90():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA tests compile and run the kernels for it")
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count("_kernel") >= 40, result.stdout


if __name__ == "__main__":
    print("\n".join(aot_compile_every_kernel_for_sm90()))
