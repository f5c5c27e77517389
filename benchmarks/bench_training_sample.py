"""training_sample (DESIGN.md §1.4): the fused Triton op vs the eager reference vs torch.compile(reference).

`training_sample`: the training step's call, correlated, eps_T and eps' drawn in the kernel (the baselines
draw them with torch.randn, see triton_cases.py). `training_sample_given_noise`: all three read the same
eps_T and eps' tensors.
bytes_moved: x0 read, y', x_t, target written (data dtype), tau written (float32 per pixel), plus eps_T and
eps' read when given; see kernels/training_sample.py for the roofline.
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
    B = shape[0]
    x0 = torch.rand(shape, generator=gen, device=device).to(dtype)
    eps_T = torch.randn(shape, generator=gen, device=device).to(dtype)
    eps_prime = torch.randn(shape, generator=gen, device=device).to(dtype)
    sigma_r = torch.rand(B, generator=gen, device=device) * 0.05
    sigma_s = torch.rand(B, generator=gen, device=device) * 0.2
    u = torch.rand(B, generator=gen, device=device)
    table = Schedule().table.to(device)
    return x0, sigma_r, sigma_s, u, table, eps_T, eps_prime


def reference_drawing_noise(x0, sigma_r, sigma_s, u, table):
    eps_T = torch.randn(x0.shape, device=x0.device, dtype=compute_dtype(x0.dtype))
    eps_prime = torch.randn(x0.shape, device=x0.device, dtype=compute_dtype(x0.dtype))
    return reference._training_sample(x0, sigma_r, sigma_s, u, table, True, eps_T, eps_prime, 0, 0, False, False, 0.0)


def case(shape, dtype, device, *, given_noise: bool = False) -> Case:
    x0, sigma_r, sigma_s, u, table, eps_T, eps_prime = inputs(shape, dtype, device)
    n, pixels = elements(shape)
    bytes_moved = (4 + 2 * given_noise) * n * x0.element_size() + pixels * 4
    noise = (eps_T, eps_prime) if given_noise else (None, None)
    args = (x0, sigma_r, sigma_s, u, table, True, *noise, 0, 0, False, False, 0.0)
    reference_fn, reference_args = ((reference._training_sample, args) if given_noise else
                                    (reference_drawing_noise, (x0, sigma_r, sigma_s, u, table)))
    compiled = compile_reference(reference_fn)
    return Case(op="training_sample_given_noise" if given_noise else "training_sample", shape=shape_name(shape),
                dtype=dtype_name(dtype), bytes_moved=bytes_moved, fused=lambda: torch.ops.svnr.training_sample(*args),
                eager=lambda: reference_fn(*reference_args), compiled=lambda: compiled(*reference_args))


def gpu_cases(device: str):
    require_triton("training_sample", device)
    for shape in sizes(device):
        for dtype in GPU_DTYPES:
            yield case(shape, dtype, device)
    for dtype in GPU_DTYPES:
        yield case(sizes(device)[0], dtype, device, given_noise=True)


@pytest.mark.parametrize("impl", ["eager", "compiled", "fused"])
def test_training_sample(benchmark, impl):
    device = benchmark_device()
    if impl == "fused" and device == "cpu":
        pytest.skip("on CPU the fused op runs in the Triton interpreter, which is not a performance path")
    the_case = case(BENCHMARK_SHAPE[device], torch.float32, device)
    run(benchmark, getattr(the_case, impl), device, the_case)
