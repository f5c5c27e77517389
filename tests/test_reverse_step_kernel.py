"""The Triton reverse_step kernel (kernels/reverse_step.py) against the eager reference, through svnr_fast.ops.

Explicit noise: float32 max-norm relative error < 1e-5, float64 < 1e-12, float16/bfloat16 within 2x the
eager error (tests/triton_devices.py). In-kernel noise: statistics of the z it draws.
"""
import pytest
import torch
from conftest import requires_cuda
from triton_devices import (
    DEVICES,
    LOW_PRECISION,
    as_layout,
    assert_low_precision_ok,
    assert_matches,
    normal_statistics_ok,
    uncorrelated,
)

from svnr_fast import Schedule, ops, reference

TABLE = Schedule().table


def step_inputs(shape, device, dtype=torch.float32, seed=0, table=TABLE):
    """x, eps_hat, z (B, C, H, W), tau (B, 1, H, W) and a per-image delta: some pixels already finished,
    some finishing in this step, a few beyond the end of the table."""
    gen = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    T = table.numel() - 1
    x = torch.rand(shape, generator=gen) * 1.4 - 0.2
    eps_hat = torch.randn(shape, generator=gen)
    z = torch.randn(shape, generator=gen)
    tau = torch.rand((B, 1, H, W), generator=gen) * min(T, 60)
    tau.view(-1)[::7] = 0
    tau.view(-1)[3::11] = T
    tau.view(-1)[5::13] = T + 2.5
    delta = torch.linspace(0.5, min(T, 25), B)
    return (x.to(device, dtype), eps_hat.to(device, dtype), z.to(device, dtype), tau.to(device), delta.to(device),
            table.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 7, 13), (3, 5, 33, 65), (1, 3, 16, 32)])   # the last: whole tiles only
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_matches_reference_float32(backend, device, shape, eta):
    backend("triton")
    x, eps_hat, z, tau, delta, table = step_inputs(shape, device)
    for clamp, return_x0_hat in ((None, False), ((-0.1, 1.05), True)):
        kwargs = dict(eta=eta, z=z, clamp=clamp, return_x0_hat=return_x0_hat)
        got = ops.reverse_step(x, eps_hat, tau, delta, table, **kwargs)
        assert_matches(got, reference.reverse_step(x, eps_hat, tau, delta, table, **kwargs))
        finished = (tau == 0).expand_as(x)
        assert torch.equal(got[0][finished], x[finished])
        if return_x0_hat:
            assert got[2][~finished].min() >= -0.1 and got[2][~finished].max() <= 1.05


@pytest.mark.parametrize("device", DEVICES)
def test_float64(backend, device):
    backend("triton")
    x, eps_hat, z, tau, delta, table = step_inputs((2, 3, 9, 11), device, torch.float64)
    tau = tau.double()
    kwargs = dict(eta=0.3, z=z, clamp=(-0.05, 1.0 / 3), return_x0_hat=True)
    got = ops.reverse_step(x, eps_hat, tau, delta, table, **kwargs)
    assert [t.dtype for t in got] == [torch.float64] * 3
    assert_matches(got, reference.reverse_step(x, eps_hat, tau, delta, table, **kwargs), bound=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_within_twice_the_eager_error(backend, device, dtype):
    backend("triton")
    x, eps_hat, z, tau, delta, table = step_inputs((2, 3, 17, 19), device, dtype)
    kwargs = dict(eta=0.7, z=z, clamp=(0.0, 1.0), return_x0_hat=True)
    got = ops.reverse_step(x, eps_hat, tau, delta, table, **kwargs)
    eager = reference.reverse_step(x, eps_hat, tau, delta, table, **kwargs)
    exact = reference.reverse_step(x.double(), eps_hat.double(), tau.double(), delta, table,
                                   **dict(kwargs, z=z.double()))
    assert_low_precision_ok(got, eager, exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided", "mixed"])
def test_any_memory_layout(backend, device, layout):
    backend("triton")
    x, eps_hat, z, tau, delta, table = step_inputs((2, 3, 10, 14), device)
    layouts = ("contiguous", "channels_last", "strided", "strided") if layout == "mixed" else (layout,) * 4
    args = [as_layout(t, lay) for t, lay in zip((x, eps_hat, z, tau), layouts)]
    assert any(not t.is_contiguous() for t in args)
    got = ops.reverse_step(args[0], args[1], args[3], delta, table, eta=0.8, z=args[2], return_x0_hat=True)
    assert_matches(got, reference.reverse_step(x, eps_hat, tau, delta, table, eta=0.8, z=z, return_x0_hat=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("table", [torch.tensor([0.5, 1.0]), 0.02 + 3 * torch.linspace(0, 1, 37) ** 2],
                         ids=["T=1,g0=0.5", "T=36,g0=0.02"])
def test_any_table(backend, device, table):
    backend("triton")
    x, eps_hat, z, tau, delta, table = step_inputs((2, 2, 9, 8), device, table=table)
    got = ops.reverse_step(x, eps_hat, tau, delta, table, eta=1.0, z=z, return_x0_hat=True)
    assert_matches(got, reference.reverse_step(x, eps_hat, tau, delta, table, eta=1.0, z=z, return_x0_hat=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (1, 3, 16, 32)])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_per_channel_time_maps_match_reference(backend, device, shape, eta):
    """A (B, C, H, W) time map: every element steps from its own time, finished ones in some channels only."""
    backend("triton")
    x, eps_hat, z, _, delta, table = step_inputs(shape, device)
    tau = torch.rand(shape, generator=torch.Generator().manual_seed(9)) * 60
    tau[:, 1, ::3] = 0
    tau.view(-1)[5::13] = table.numel() + 1.5
    tau = tau.to(device)
    kwargs = dict(eta=eta, z=z, clamp=(-0.1, 1.05), return_x0_hat=True)
    got = ops.reverse_step(x, eps_hat, tau, delta, table, **kwargs)
    assert got[1].shape == tau.shape
    assert_matches(got, reference.reverse_step(x, eps_hat, tau, delta, table, **kwargs))
    assert torch.equal(got[0][tau == 0], x[tau == 0])


def drawn_noise(device, seed, offset, shape=(2, 4, 48, 64), layout="contiguous"):
    """The z the kernel draws (eta = 1, x = eps_hat = 0, so x_new = sqrt(sig2) z), in float64."""
    B, C, H, W = shape
    x = as_layout(torch.zeros(shape, device=device), layout)
    tau = torch.full((B, 1, H, W), 500.0, device=device)
    x_new, tau_new = ops.reverse_step(x, x, tau, 100.0, TABLE.to(device), eta=1.0, seed=seed, offset=offset)
    gt, gs = reference.gamma(tau.double(), TABLE.to(device)), reference.gamma(tau_new.double(), TABLE.to(device))
    return (x_new.double() / (gs * (1 - gs / gt)).sqrt()).cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_noise_is_standard_normal_and_streams_are_independent(backend, device):
    backend("triton")
    z = drawn_noise(device, seed=1234, offset=7)
    normal_statistics_ok(z)
    assert torch.equal(z, drawn_noise(device, seed=1234, offset=7))                   # same seed and offset
    assert torch.equal(z, drawn_noise(device, seed=1234, offset=7, layout="channels_last"))
    for other in (drawn_noise(device, seed=1234, offset=8), drawn_noise(device, seed=1235, offset=7),
                  drawn_noise(device, seed=1234, offset=7 + 2**32), drawn_noise(device, seed=1234 + 2**40, offset=7)):
        assert not torch.equal(z, other) and uncorrelated(z, other)


@pytest.mark.parametrize("device", DEVICES)
def test_eta_zero_neither_reads_nor_draws_noise(backend, device):
    backend("triton")
    x, eps_hat, z, tau, delta, table = step_inputs((2, 3, 8, 8), device)
    drawn = ops.reverse_step(x, eps_hat, tau, delta, table, eta=0.0, seed=5)
    given = ops.reverse_step(x, eps_hat, tau, delta, table, eta=0.0, z=z)
    assert torch.equal(drawn[0], given[0])
    assert_matches(drawn, reference.reverse_step(x, eps_hat, tau, delta, table, eta=0.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["triton", "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(backend, device, name, layout):
    backend(name)
    x, eps_hat, z, tau, delta, table = step_inputs((2, 3, 5, 7), device)
    x, eps_hat, z = (as_layout(t, layout) for t in (x, eps_hat, z))
    for z_arg, clamp_min, clamp_max, return_x0_hat in ((z, 0.0, 1.0, True), (None, None, None, False)):
        torch.library.opcheck(torch.ops.svnr.reverse_step, (x, eps_hat, tau, delta, table, 0.5, z_arg, clamp_min,
                                                            clamp_max, 3, 1, return_x0_hat))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_batch_on_cuda(backend, dtype):
    backend("triton")
    x, eps_hat, z, tau, delta, table = step_inputs((16, 3, 256, 256), "cuda", dtype)
    got = ops.reverse_step(x, eps_hat, tau, delta, table, eta=1.0, z=z, return_x0_hat=True)
    eager = reference.reverse_step(x, eps_hat, tau, delta, table, eta=1.0, z=z, return_x0_hat=True)
    if dtype == torch.float32:
        assert_matches(got, eager)
    else:
        exact = reference.reverse_step(x.double(), eps_hat.double(), tau.double(), delta, table, eta=1.0,
                                       z=z.double(), return_x0_hat=True)
        assert_low_precision_ok(got, eager, exact)
