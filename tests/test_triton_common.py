"""The in-kernel helpers of kernels/_triton_common.py that the op tests see only through statistics."""
import math

import pytest
import torch
import triton
import triton.language as tl
from svnr_fast.kernels._triton_common import box_muller, sincos_2pi
from triton_devices import DEVICES


@triton.jit
def _sincos_kernel(u_ptr, sin_ptr, cos_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    sin, cos = sincos_2pi(tl.load(u_ptr + i, mask=i < n, other=0.0))
    tl.store(sin_ptr + i, sin, mask=i < n)
    tl.store(cos_ptr + i, cos, mask=i < n)


@triton.jit
def _box_muller_kernel(a_ptr, b_ptr, n0_ptr, n1_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n0, n1 = box_muller(tl.load(a_ptr + i, mask=i < n, other=0), tl.load(b_ptr + i, mask=i < n, other=0))
    tl.store(n0_ptr + i, n0, mask=i < n)
    tl.store(n1_ptr + i, n1, mask=i < n)


@pytest.mark.parametrize("device", DEVICES)
def test_sincos_2pi_is_accurate_over_the_whole_turn(device):
    u = torch.cat([torch.linspace(0, 1, 4097), torch.rand(4096, generator=torch.Generator().manual_seed(0)),
                   torch.tensor([0.125, 0.375, 0.625, 0.875, 1 - 2**-24])]).to(device)
    sin, cos = torch.empty_like(u), torch.empty_like(u)
    _sincos_kernel[(triton.cdiv(u.numel(), 1024),)](u, sin, cos, u.numel(), BLOCK=1024)
    angle = 2 * math.pi * u.double()
    assert (sin.double() - angle.sin()).abs().max() < 4e-7
    assert (cos.double() - angle.cos()).abs().max() < 4e-7


@pytest.mark.parametrize("device", DEVICES)
def test_box_muller_follows_the_formula(device):
    gen = torch.Generator().manual_seed(1)
    bits_a, bits_b = (torch.randint(-2**31, 2**31, (3000,), generator=gen, dtype=torch.int64).to(torch.int32)
                      for _ in range(2))
    bits_a[:2] = torch.tensor([0, -1], dtype=torch.int32)          # the smallest uniforms: u is kept >= 1e-7
    n0, n1 = torch.empty(3000, device=device), torch.empty(3000, device=device)
    _box_muller_kernel[(3,)](bits_a.to(device), bits_b.to(device), n0, n1, 3000, BLOCK=1024)

    def uniform(bits):   # tl.uint_to_uniform_float
        bits = bits.double()
        return torch.where(bits < 0, -bits - 1, bits) * 4.6566127342e-10

    radius = (-2 * uniform(bits_a).clamp_min(1e-7).log()).sqrt()
    angle = 2 * math.pi * uniform(bits_b)
    assert (n0.cpu().double() - radius * angle.cos()).abs().max() < 1e-5
    assert (n1.cpu().double() - radius * angle.sin()).abs().max() < 1e-5
