"""The in-kernel helpers of kernels/_triton_common.py that the op tests see only through statistics or
through one schedule: Philox, Box-Muller, and the prepared schedule's O(1) inverse on awkward tables."""
import math

import pytest
import torch
import triton
import triton.language as tl
from triton_devices import DEVICES

from svnr_fast import Schedule, reference
from svnr_fast.kernels import _triton_common as common
from svnr_fast.kernels import lookup


@triton.jit
def _philox_kernel(c_ptr, out_ptr, ours_ptr, seed, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c0, c1, c2, c3 = (tl.load(c_ptr + 4 * i + j, mask=i < n, other=0).to(tl.uint32) for j in range(4))
    for j, r in enumerate(tl.philox(seed, c0, c1, c2, c3, n_rounds=common.PHILOX_ROUNDS)):
        tl.store(out_ptr + 4 * i + j, r.to(tl.int32, bitcast=True), mask=i < n)
    s = seed.to(tl.uint64)
    for j, r in enumerate(common.philox(c0, c1, c2, c3, (s & 0xFFFFFFFF).to(tl.uint32), (s >> 32).to(tl.uint32))):
        tl.store(ours_ptr + 4 * i + j, r.to(tl.int32, bitcast=True), mask=i < n)


@triton.jit
def _box_muller_kernel(a_ptr, b_ptr, n0_ptr, n1_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n0, n1 = common.box_muller(tl.load(a_ptr + i, mask=i < n, other=0).to(tl.uint32),
                               tl.load(b_ptr + i, mask=i < n, other=0).to(tl.uint32))
    tl.store(n0_ptr + i, n0, mask=i < n)
    tl.store(n1_ptr + i, n1, mask=i < n)


@pytest.mark.parametrize("device", DEVICES)
def test_philox_is_tl_philox(device):
    """The wide-multiply Philox computes tl.philox's function, bit for bit (a 64-bit seed, any counters)."""
    gen = torch.Generator().manual_seed(0)
    counters = torch.randint(-2**31, 2**31, (1000, 4), generator=gen, dtype=torch.int64).to(torch.int32).to(device)
    want, got = (torch.empty_like(counters) for _ in range(2))
    _philox_kernel[(1,)](counters, want, got, 1234 + 2**40, 1000, BLOCK=1024)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_box_muller_follows_the_formula(device):
    gen = torch.Generator().manual_seed(1)
    bits_a, bits_b = (torch.randint(-2**31, 2**31, (3000,), generator=gen, dtype=torch.int64).to(torch.int32)
                      for _ in range(2))
    bits_a[:2] = torch.tensor([0, -1], dtype=torch.int32)          # the extreme uniforms: u = 2**-33 and u ~ 1
    bits_b[:2] = torch.tensor([-2**31, 2**31 - 1], dtype=torch.int32)
    n0, n1 = torch.empty(3000, device=device), torch.empty(3000, device=device)
    _box_muller_kernel[(3,)](bits_a.to(device), bits_b.to(device), n0, n1, 3000, BLOCK=1024)

    # u = (a + 1/2) / 2**32 with a read as uint32 and rounded to float32, as the kernel's conversion does
    u = ((bits_a.double() % 2**32).float().double() / 2**32 + 2**-33).float().double()
    radius = (-2 * u.log()).sqrt()
    angle = 2 * math.pi * bits_b.double() / 2**32                # b read as int32
    assert (n0.cpu().double() - radius * angle.cos()).abs().max() < 1e-5
    assert (n1.cpu().double() - radius * angle.sin()).abs().max() < 1e-5
    assert n0.isfinite().all() and n0.abs().max() < 6.8


def strictly_increasing(values: torch.Tensor) -> torch.Tensor:
    """values with each entry raised to at least the next float above its predecessor."""
    values = values.clone()
    for i in range(1, values.numel()):
        if values[i] <= values[i - 1]:
            values[i] = torch.nextafter(values[i - 1], torch.tensor(float("inf"), dtype=values.dtype))
    return values


def awkward_tables():
    gen = torch.Generator().manual_seed(3)
    steps = 10 ** (torch.rand(400, generator=gen, dtype=torch.float64) * 7 - 7)
    return {
        "default": Schedule().table,
        # segments from 1e-7 to 1 wide in random order: many knots share a coarse bin
        "wild": strictly_increasing(torch.cat([torch.zeros(1, dtype=torch.float64), steps.cumsum(0)]).float()),
        # subnormal segments, a one-ulp segment, a segment wider than the rest of the table together
        "extreme": torch.tensor([0.0, 1e-40, 2e-40, 1e-30, 1e-20, 1e-10, 0.1, 0.1 + 2**-27, 0.5, 1, 2, 1e10]),
        "g0>0": 0.02 + 3 * torch.linspace(0, 1, 37) ** 2,
        "T=1": torch.tensor([0.5, 1.0]),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", awkward_tables().keys())
def test_inverse_is_the_reference_bit_for_bit_on_any_table(device, dtype, name):
    """The O(1) inverse (coarse bin, sub-bin, one comparison, quotient without division) equals
    searchsorted + division exactly: on the knots, one float either side, far outside, and everywhere
    between, down to subnormal variances."""
    table = awkward_tables()[name].to(device, dtype)
    gen = torch.Generator().manual_seed(4)
    inf = torch.full_like(table, float("inf"))
    v = torch.cat([table, torch.nextafter(table, -inf), torch.nextafter(table, inf),
                   (torch.rand(20000, generator=gen, dtype=dtype) * (float(table[-1]) * 1.2 + 0.2) - 0.1).to(device),
                   (10 ** (torch.rand(20000, generator=gen, dtype=dtype) * 50 - 45)).to(device)])
    assert torch.equal(lookup.time_from_variance(v, table), reference._time_from_variance(v, table))


def test_a_table_is_prepared_once_and_a_changed_table_again():
    table = Schedule().table.clone()
    prepared = common.prepared_schedule(table)
    assert common.prepared_schedule(table) is prepared
    table.mul_(2)                                      # in place: a new version of the same memory
    assert common.prepared_schedule(table) is not prepared
    others = [Schedule(T=t).table for t in range(10, 10 + common._PREPARED_MAX)]
    for other in others:
        common.prepared_schedule(other)
    assert len(common._PREPARED) <= common._PREPARED_MAX
