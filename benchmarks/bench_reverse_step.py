"""reverse_step (DESIGN.md §1.5): the fused Triton op vs the eager reference vs torch.compile(reference).

`reverse_step`: the sampler's call, eta = 1, z drawn in the kernel (the baselines draw it with torch.randn,
see triton_cases.py). `reverse_step_given_z`: all three read the same z tensor.
bytes_moved: x and eps_hat read, x_new written (data dtype), tau read and tau_new written (float32 per
pixel), plus z read when it is given; see kernels/reverse_step.py for the roofline.
"""
import pytest
import torch
from common import Case, dtype_name
from triton_cases import (
    BENCHMARK_SHAPE,
    GPU_DTYPES,
    benchmark_device,
    compile_reference,
    elements,
    require_triton,
    run,
    shape_name,
    sizes,
)

from svnr_fast import Schedule, reference
from svnr_fast.ops._checks import compute_dtype


def inputs(shape, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    B, C, H, W = shape
    x = torch.rand(shape, generator=gen, device=device).to(dtype)
    eps_hat = torch.randn(shape, generator=gen, device=device).to(dtype)
    z = torch.randn(shape, generator=gen, device=device).to(dtype)
    tau = torch.rand((B, 1, H, W), generator=gen, device=device) * 100
    delta = torch.full((B,), 2.0, device=device)
    table = Schedule().table.to(device)
    return x, eps_hat, tau, delta, table, z


def reference_drawing_z(x, eps_hat, tau, delta, table):
    z = torch.randn(x.shape, device=x.device, dtype=compute_dtype(x.dtype))
    return reference._reverse_step(x, eps_hat, tau, delta, table, 1.0, z, None, None, 0, 0, False)


def case(shape, dtype, device, *, given_z: bool = False) -> Case:
    x, eps_hat, tau, delta, table, z = inputs(shape, dtype, device)
    n, pixels = elements(shape)
    bytes_moved = (3 + given_z) * n * x.element_size() + 2 * pixels * tau.element_size()
    args = (x, eps_hat, tau, delta, table, 1.0, z if given_z else None, None, None, 0, 0, False)
    reference_fn, reference_args = ((reference._reverse_step, args) if given_z else
                                    (reference_drawing_z, (x, eps_hat, tau, delta, table)))
    compiled = compile_reference(reference_fn)
    return Case(op="reverse_step_given_z" if given_z else "reverse_step", shape=shape_name(shape),
                dtype=dtype_name(dtype), bytes_moved=bytes_moved, fused=lambda: torch.ops.svnr.reverse_step(*args),
                eager=lambda: reference_fn(*reference_args), compiled=lambda: compiled(*reference_args))


def gpu_cases(device: str):
    require_triton("reverse_step", device)
    for shape in sizes(device):
        for dtype in GPU_DTYPES:
            yield case(shape, dtype, device)
    for dtype in GPU_DTYPES:
        yield case(sizes(device)[0], dtype, device, given_z=True)


@pytest.mark.parametrize("impl", ["eager", "compiled", "fused"])
def test_reverse_step(benchmark, impl):
    device = benchmark_device()
    if impl == "fused" and device == "cpu":
        pytest.skip("on CPU the fused op runs in the Triton interpreter, which is not a performance path")
    the_case = case(BENCHMARK_SHAPE[device], torch.float32, device)
    run(benchmark, getattr(the_case, impl), device, the_case)
