"""What the Triton kernel tests share: the devices they run on and how they compare results.

`cpu` runs the kernels in the Triton interpreter (conftest.py switches it on where there is no GPU);
`cuda` compiles them for the GPU, skips cleanly without one, and carries the `cuda` mark that
benchmarks/gpu_suite.py selects. Error criteria (DESIGN.md §5):
- float32 (and float64): max|kernel - reference| / max|reference| below a bound (max-norm relative);
- float16/bfloat16: the kernel's max error against a float64 reference run on the same inputs is at most
  twice the eager reference's error in the same dtype.
"""
import os

import pytest
import torch
from conftest import requires_cuda

requires_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                          reason="the Triton interpreter is off (a GPU is present)")
DEVICES = [pytest.param("cpu", marks=requires_interpreter),
           pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    """max|result - expected| / max|expected| (0 for empty or all-zero expected tensors that match)."""
    diff = (result.double() - expected.double()).abs().max() if expected.numel() else torch.tensor(0.0)
    scale = expected.double().abs().max() if expected.numel() else torch.tensor(0.0)
    return float(diff / scale) if scale > 0 else float(diff)


def assert_matches(results, expected, bound: float = 1e-5) -> None:
    for i, (result, want) in enumerate(zip(results, expected)):
        assert result.dtype == want.dtype and result.shape == want.shape, (i, result.dtype, result.shape)
        assert relative_error(result, want) < bound, (i, relative_error(result, want))


def max_error(result: torch.Tensor, exact: torch.Tensor) -> float:
    return float((result.double() - exact.double()).abs().max()) if exact.numel() else 0.0


def assert_low_precision_ok(results, eager, exact) -> None:
    """Each kernel output is at most 2x as far from the float64 result as the eager output in its dtype."""
    for i, (result, same_dtype, want) in enumerate(zip(results, eager, exact)):
        assert result.dtype == same_dtype.dtype, (i, result.dtype, same_dtype.dtype)
        assert max_error(result, want) <= 2 * max_error(same_dtype, want), \
            (i, max_error(result, want), max_error(same_dtype, want))


def as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as t in another memory layout: contiguous, channels_last, or a strided view."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # every other column of a wider tensor, stored transposed: no dense (H, W) plane
        wide = torch.zeros(*t.shape[:2], t.shape[3] * 2, t.shape[2], dtype=t.dtype, device=t.device)
        view = wide.transpose(2, 3)[..., ::2]
        view.copy_(t)
        return view
    raise ValueError(layout)


def normal_statistics_ok(z: torch.Tensor, sigmas: float = 5.0) -> None:
    """z (B, C, H, W) looks like i.i.d. N(0, 1): mean, variance, tail mass and neighbour correlations within
    `sigmas` standard errors. The tests seed their draws, so each outcome is fixed, not flaky."""
    z = z.double()
    n = z.numel()
    se = n ** -0.5
    assert abs(float(z.mean())) < sigmas * se, float(z.mean())
    assert abs(float(z.var()) - 1) < sigmas * (2 / n) ** 0.5, float(z.var())
    p_tail = 0.0455   # P(|z| > 2)
    tail = float((z.abs() > 2).double().mean())
    assert abs(tail - p_tail) < sigmas * (p_tail * (1 - p_tail) / n) ** 0.5, tail
    for dim in (d for d in (1, 2, 3) if z.shape[d] > 1):    # channel, row and column neighbours
        a, b = z.narrow(dim, 0, z.shape[dim] - 1), z.narrow(dim, 1, z.shape[dim] - 1)
        corr = float((a * b).mean())
        assert abs(corr) < sigmas * a.numel() ** -0.5, (dim, corr)


def uncorrelated(a: torch.Tensor, b: torch.Tensor, sigmas: float = 5.0) -> bool:
    return abs(float((a.double() * b.double()).mean())) < sigmas * a.numel() ** -0.5
