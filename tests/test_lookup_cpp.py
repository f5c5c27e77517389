"""The C++ schedule lookups (csrc/lookup_cpu.cpp): gamma, time_from_variance, time_map against the reference,
through svnr_fast.ops with the cpp backend, on every CPU instruction set compiled in (tests/cpp_isas.py).

The kernels compute what the reference computes, operation for operation: results are equal, not close.
"""
import pytest
import torch
from cpp_isas import isa, requires_extension  # noqa: F401 (fixture)
from test_lookup_kernel import TABLES, times, variances
from triton_devices import as_layout

from svnr_fast import ops, reference

pytestmark = requires_extension


@pytest.mark.parametrize("table", TABLES.values(), ids=TABLES.keys())
@pytest.mark.parametrize("shape", [(), (37,), (1, 1, 7, 13), (3, 5, 33, 65)])
def test_gamma_and_its_inverse_equal_the_reference(backend, isa, table, shape):
    backend("cpp")
    gen = torch.Generator().manual_seed(len(shape))
    tau, v = times(shape, table, gen), variances(shape, table, gen)
    assert torch.equal(ops.gamma(tau, table), reference.gamma(tau, table))
    assert torch.equal(ops.time_from_variance(v, table), reference.time_from_variance(v, table))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(1, 1, 7, 13), (3, 5, 33, 65), (2, 3, 130, 140)])
def test_time_map_equals_the_reference(backend, isa, layout, shape):
    backend("cpp")
    table = TABLES["default"]
    v = variances(shape, table, torch.Generator().manual_seed(1))
    got = ops.time_map(as_layout(v, layout), table)
    assert got.shape == (shape[0], 1, *shape[2:]) and got.is_contiguous()
    assert torch.equal(got, reference.time_map(v, table))


def test_float64_other_dtypes_and_strides(backend):
    backend("cpp")
    gen = torch.Generator().manual_seed(2)
    table = TABLES["default"]
    tau = times((4, 6, 10), table, gen).double().transpose(0, 2)
    v = variances((2, 3, 9, 11), table, gen).double()
    for got, want in ((ops.gamma(tau, table), reference.gamma(tau, table)),
                      (ops.time_from_variance(v[..., ::2], table), reference.time_from_variance(v[..., ::2], table)),
                      (ops.time_map(v, table), reference.time_map(v, table))):
        assert got.dtype == torch.float64 and torch.equal(got, want)
    half = times((5, 7), table, gen).to(torch.bfloat16)
    assert torch.equal(ops.gamma(half, table), reference.gamma(half, table))
    assert ops.time_map(torch.empty(2, 3, 0, 4), table).shape == (2, 1, 0, 4)


def test_automatic_choice_on_cpu_is_the_cpp_kernel(backend):
    backend("auto")
    for op in ("gamma", "time_from_variance", "time_map"):
        assert ops.backends.choose(op, "cpu").backend == "cpp"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(backend, layout):
    backend("cpp")
    gen = torch.Generator().manual_seed(4)
    table = TABLES["default"]
    tau, v = (as_layout(t, layout) for t in (times((2, 3, 5, 7), table, gen), variances((2, 3, 5, 7), table, gen)))
    for op, args in ((torch.ops.svnr.gamma, (tau, table)), (torch.ops.svnr.time_from_variance, (v, table)),
                     (torch.ops.svnr.time_map, (v, table))):
        torch.library.opcheck(op, args)
