"""The Triton schedule lookups (kernels/lookup.py): gamma, time_from_variance, time_map against the reference."""
import pytest
import torch
from triton_devices import DEVICES, as_layout, assert_matches

from svnr_fast import Schedule, ops, reference

TABLE = Schedule().table
TABLES = {"default": TABLE, "T=1,g0=0.5": torch.tensor([0.5, 1.0]),
          "T=36,g0=0.02": 0.02 + 3 * torch.linspace(0, 1, 37) ** 2}


def times(shape, table, gen):
    """Times inside [0, T], below 0, above T, and exactly on the knots."""
    T = table.numel() - 1
    tau = torch.rand(shape, generator=gen) * (T + 4) - 2
    knots = torch.arange(T + 1, dtype=torch.float32)
    tau.view(-1)[:min(tau.numel(), T + 1)] = knots[:tau.numel()]
    return tau


def variances(shape, table, gen):
    """Variances inside [g[0], g[T]], outside it, and exactly on the table values."""
    v = torch.rand(shape, generator=gen) * (float(table[-1]) * 1.2 + 0.1) - 0.1
    v.view(-1)[:min(v.numel(), table.numel())] = table[:v.numel()]
    return v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("table", TABLES.values(), ids=TABLES.keys())
@pytest.mark.parametrize("shape", [(), (37,), (3, 5, 33, 65), (4, 128)])   # the last: whole blocks only
def test_gamma_and_its_inverse_match_reference(backend, device, table, shape):
    backend("triton")
    gen = torch.Generator().manual_seed(len(shape))
    table = table.to(device)
    tau, v = times(shape, table.cpu(), gen).to(device), variances(shape, table.cpu(), gen).to(device)
    assert_matches([ops.gamma(tau, table)], [reference.gamma(tau, table)])
    assert_matches([ops.time_from_variance(v, table)], [reference.time_from_variance(v, table)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(1, 1, 7, 13), (3, 5, 33, 65), (2, 3, 16, 32)])
def test_time_map_matches_reference(backend, device, layout, shape):
    backend("triton")
    v = variances(shape, TABLE, torch.Generator().manual_seed(1)).to(device)
    got = ops.time_map(as_layout(v, layout), TABLE.to(device))
    assert got.shape == (shape[0], 1, *shape[2:])
    assert_matches([got], [reference.time_map(v, TABLE.to(device))])


@pytest.mark.parametrize("device", DEVICES)
def test_float64_and_non_contiguous(backend, device):
    backend("triton")
    gen = torch.Generator().manual_seed(2)
    table = TABLE.to(device)
    tau = times((4, 6, 10), TABLE, gen).double().to(device).transpose(0, 2)
    v = variances((2, 3, 9, 11), TABLE, gen).double().to(device)
    for got, want in ((ops.gamma(tau, table), reference.gamma(tau, table)),
                      (ops.time_from_variance(v[..., ::2], table), reference.time_from_variance(v[..., ::2], table)),
                      (ops.time_map(v, table), reference.time_map(v, table))):
        assert got.dtype == torch.float64
        assert_matches([got], [want], bound=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_input_gives_float32_times(backend, device):
    backend("triton")
    tau = times((5, 7), TABLE, torch.Generator().manual_seed(3)).to(device, torch.bfloat16)
    got = ops.gamma(tau, TABLE.to(device))
    assert got.dtype == torch.float32
    assert_matches([got], [reference.gamma(tau, TABLE.to(device))])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["triton", "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(backend, device, name, layout):
    backend(name)
    gen = torch.Generator().manual_seed(4)
    tau, v = times((2, 3, 5, 7), TABLE, gen).to(device), variances((2, 3, 5, 7), TABLE, gen).to(device)
    tau, v = as_layout(tau, layout), as_layout(v, layout)
    for op, args in ((torch.ops.svnr.gamma, (tau, TABLE.to(device))),
                     (torch.ops.svnr.time_from_variance, (v, TABLE.to(device))),
                     (torch.ops.svnr.time_map, (v, TABLE.to(device)))):
        torch.library.opcheck(op, args)
