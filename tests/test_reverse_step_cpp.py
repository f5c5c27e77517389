"""The C++ reverse_step kernel (csrc/reverse_step_cpu.cpp) against the eager reference, through svnr_fast.ops
with the cpp backend, on every CPU instruction set compiled in (tests/cpp_isas.py).

Explicit noise: float32 max-norm relative error < 1e-5, float64 < 1e-12, float16/bfloat16 within 2x the
eager error; the next time map and the exactly finished pixels are the reference's exactly. In-kernel noise:
statistics of the z it draws, independent of the thread count and the layout.
"""
import pytest
import torch
from cpp_isas import isa, requires_extension  # noqa: F401 (fixture)
from test_reverse_step_kernel import TABLE, step_inputs
from triton_devices import (
    LOW_PRECISION,
    as_layout,
    assert_low_precision_ok,
    assert_matches,
    normal_statistics_ok,
    uncorrelated,
)

from svnr_fast import ops, reference

pytestmark = requires_extension


def per_channel(tau, channels, seed=1):
    """A (B, C, H, W) time map: tau with each channel shifted differently (some pixels finished)."""
    shifts = torch.linspace(-5, 5, channels).view(1, -1, 1, 1)
    maps = (tau + shifts).clamp_min(0)
    maps.view(-1)[::9] = 0
    return maps


@pytest.mark.parametrize("shape", [(1, 1, 7, 13), (3, 5, 33, 65)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("time_map", ["shared", "per_channel"])
def test_matches_reference_float32(backend, isa, shape, eta, time_map):
    backend("cpp")
    x, eps_hat, z, tau, delta, table = step_inputs(shape, "cpu")
    if time_map == "per_channel":
        tau = per_channel(tau, shape[1])
    for clamp, return_x0_hat in ((None, False), ((-0.1, 1.05), True)):
        kwargs = dict(eta=eta, z=z, clamp=clamp, return_x0_hat=return_x0_hat)
        got = ops.reverse_step(x, eps_hat, tau, delta, table, **kwargs)
        want = reference.reverse_step(x, eps_hat, tau, delta, table, **kwargs)
        assert_matches(got, want)
        assert torch.equal(got[1], want[1])                        # the next time map exactly
        finished = (tau == 0).expand_as(x)
        assert torch.equal(got[0][finished], x[finished])          # finished pixels untouched


def test_float64(backend, isa):
    backend("cpp")
    x, eps_hat, z, tau, delta, table = step_inputs((2, 3, 9, 11), "cpu", torch.float64)
    kwargs = dict(eta=0.3, z=z, clamp=(-0.05, 1.0 / 3), return_x0_hat=True)
    got = ops.reverse_step(x, eps_hat, tau.double(), delta, table, **kwargs)
    assert [t.dtype for t in got] == [torch.float64] * 3
    assert_matches(got, reference.reverse_step(x, eps_hat, tau.double(), delta, table, **kwargs), bound=1e-12)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_within_twice_the_eager_error(backend, isa, dtype):
    backend("cpp")
    x, eps_hat, z, tau, delta, table = step_inputs((2, 3, 17, 19), "cpu", dtype)
    kwargs = dict(eta=0.7, z=z, clamp=(0.0, 1.0), return_x0_hat=True)
    got = ops.reverse_step(x, eps_hat, tau, delta, table, **kwargs)
    eager = reference.reverse_step(x, eps_hat, tau, delta, table, **kwargs)
    exact = reference.reverse_step(x.double(), eps_hat.double(), tau.double(), delta, table,
                                   **dict(kwargs, z=z.double()))
    assert_low_precision_ok(got, eager, exact)


@pytest.mark.parametrize("layout", ["channels_last", "strided", "mixed"])
def test_any_memory_layout_and_mixed_dtypes(backend, layout):
    backend("cpp")
    x, eps_hat, z, tau, delta, table = step_inputs((2, 3, 10, 14), "cpu")
    layouts = ("contiguous", "channels_last", "strided", "strided") if layout == "mixed" else (layout,) * 4
    args = [as_layout(t, lay) for t, lay in zip((x, eps_hat, z, tau), layouts)]
    got = ops.reverse_step(args[0], args[1], args[3], delta, table, eta=0.8, z=args[2], return_x0_hat=True)
    assert all(t.is_contiguous() for t in got)
    assert_matches(got, reference.reverse_step(x, eps_hat, tau, delta, table, eta=0.8, z=z, return_x0_hat=True))
    # eps_hat and z in other dtypes than x, tau in float64: converted as the reference converts them
    mixed = (eps_hat.double(), z.bfloat16(), tau.double())
    got = ops.reverse_step(x, mixed[0], mixed[2], delta, table, eta=0.8, z=mixed[1])
    assert got[1].dtype == torch.float64
    assert_matches(got, reference.reverse_step(x, mixed[0], mixed[2], delta, table, eta=0.8, z=mixed[1]))


@pytest.mark.parametrize("table", [torch.tensor([0.5, 1.0]), 0.02 + 3 * torch.linspace(0, 1, 37) ** 2],
                         ids=["T=1,g0=0.5", "T=36,g0=0.02"])
def test_any_table(backend, table):
    backend("cpp")
    x, eps_hat, z, tau, delta, table = step_inputs((2, 2, 9, 8), "cpu", table=table)
    got = ops.reverse_step(x, eps_hat, tau, delta, table, eta=1.0, z=z, return_x0_hat=True)
    assert_matches(got, reference.reverse_step(x, eps_hat, tau, delta, table, eta=1.0, z=z, return_x0_hat=True))


def drawn_noise(seed, offset, shape=(2, 4, 64, 128), layout="contiguous", threads=None):
    """The z the kernel draws (eta = 1, x = eps_hat = 0, so x_new = sqrt(sig2) z), in float64; shape is large
    enough for two threads."""
    B, C, H, W = shape
    x = as_layout(torch.zeros(shape), layout)
    tau = torch.full((B, 1, H, W), 500.0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        x_new, tau_new = ops.reverse_step(x, x, tau, 100.0, TABLE, eta=1.0, seed=seed, offset=offset)
    finally:
        torch.set_num_threads(before)
    gt, gs = reference.gamma(tau.double(), TABLE), reference.gamma(tau_new.double(), TABLE)
    return x_new.double() / (gs * (1 - gs / gt)).sqrt()


def test_in_kernel_noise_is_standard_normal_and_streams_are_independent(backend, isa):
    backend("cpp")
    z = drawn_noise(seed=1234, offset=7)
    normal_statistics_ok(z)
    for again in (drawn_noise(seed=1234, offset=7, layout="channels_last"), drawn_noise(seed=1234, offset=7, threads=1),
                  drawn_noise(seed=1234, offset=7, threads=2)):
        assert torch.equal(z, again)
    for other in (drawn_noise(seed=1234, offset=8), drawn_noise(seed=1235, offset=7),
                  drawn_noise(seed=1234, offset=7 + 2**32), drawn_noise(seed=1234 + 2**40, offset=7)):
        assert not torch.equal(z, other) and uncorrelated(z, other)


def test_per_channel_time_maps_draw_per_channel(backend):
    backend("cpp")
    x, eps_hat, _, tau, delta, table = step_inputs((2, 3, 16, 16), "cpu")
    tau = per_channel(tau, 3)
    got = ops.reverse_step(x, eps_hat, tau, delta, table, eta=1.0, seed=3)
    assert got[1].shape == tau.shape and torch.equal(got[1], reference.reverse_step(x, eps_hat, tau, delta, table)[1])


def test_eta_zero_neither_reads_nor_draws_noise(backend):
    backend("cpp")
    x, eps_hat, z, tau, delta, table = step_inputs((2, 3, 8, 8), "cpu")
    drawn = ops.reverse_step(x, eps_hat, tau, delta, table, eta=0.0, seed=5)
    given = ops.reverse_step(x, eps_hat, tau, delta, table, eta=0.0, z=z)
    assert torch.equal(drawn[0], given[0])
    assert_matches(drawn, reference.reverse_step(x, eps_hat, tau, delta, table, eta=0.0))


def test_automatic_choice_on_cpu_is_the_cpp_kernel(backend):
    backend("auto")
    assert ops.backends.choose("reverse_step", "cpu").backend == "cpp"


def test_empty(backend):
    backend("cpp")
    x = torch.empty(0, 3, 4, 4)
    x_new, tau_new = ops.reverse_step(x, x, torch.empty(0, 1, 4, 4), torch.empty(0), TABLE)
    assert x_new.shape == x.shape and tau_new.shape == (0, 1, 4, 4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(backend, layout):
    backend("cpp")
    x, eps_hat, z, tau, delta, table = step_inputs((2, 3, 5, 7), "cpu")
    x, eps_hat, z = (as_layout(t, layout) for t in (x, eps_hat, z))
    for z_arg, clamp_min, clamp_max, return_x0_hat in ((z, 0.0, 1.0, True), (None, None, None, False)):
        torch.library.opcheck(torch.ops.svnr.reverse_step, (x, eps_hat, tau, delta, table, 0.5, z_arg, clamp_min,
                                                            clamp_max, 3, 1, return_x0_hat))
