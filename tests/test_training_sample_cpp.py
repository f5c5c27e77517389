"""The C++ training_sample kernel (csrc/training_sample_cpu.cpp) against the eager reference, through
svnr_fast.ops with the cpp backend, on every CPU instruction set compiled in (tests/cpp_isas.py).

Explicit noise: float32 max-norm relative error < 1e-5, float64 < 1e-12, float16/bfloat16 within 2x the
eager error; the time maps, and so the pixels at tau = 0, are the reference's exactly; every convention of
other codebases (per-channel time maps, one t0 per batch, a floor on the noise std). In-kernel noise:
statistics of the eps_T and eps' it draws, independent of the thread count and the layout.
"""
import pytest
import torch
from cpp_isas import isa, requires_extension  # noqa: F401 (fixture)
from test_training_sample_kernel import TABLE, sample_inputs
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

CONVENTIONS = {"svnr": {}, "per_channel": {"per_channel": True}, "batch_t0": {"t0_per": "batch"},
               "min_std": {"min_std": 0.15}, "all": {"per_channel": True, "t0_per": "batch", "min_std": 0.05}}


def check(got, want, bound=1e-5):
    assert_matches(got, want, bound)
    assert torch.equal(got.tau, want.tau)                           # the time map exactly ...
    assert torch.all(got.target[want.target == 0] == 0)             # ... and zero targets where gamma(tau) = 0


@pytest.mark.parametrize("shape", [(1, 1, 7, 13), (3, 5, 33, 65)])
@pytest.mark.parametrize("correlated", [True, False])
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_matches_reference_float32(backend, isa, shape, correlated, convention):
    backend("cpp")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs(shape, "cpu")
    kwargs = dict(correlated=correlated, eps_T=eps_T, eps_prime=eps_prime, **CONVENTIONS[convention])
    if convention in ("batch_t0", "all"):
        u = 0.6
    check(ops.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs),
          reference.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs))


@pytest.mark.parametrize("convention", ["svnr", "all"])
def test_float64(backend, isa, convention):
    backend("cpp")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs((2, 3, 9, 11), "cpu", torch.float64)
    kwargs = dict(eps_T=eps_T, eps_prime=eps_prime, **CONVENTIONS[convention])
    u = u if convention == "svnr" else 0.3
    got = ops.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs)
    assert [t.dtype for t in got] == [torch.float64] * 4
    check(got, reference.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs), bound=1e-12)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_within_twice_the_eager_error(backend, isa, dtype):
    backend("cpp")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs((3, 3, 17, 19), "cpu", dtype)
    got = ops.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, eps_prime=eps_prime)
    eager = reference.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, eps_prime=eps_prime)
    exact = reference.training_sample(x0.double(), sigma_r, sigma_s, u, table, eps_T=eps_T.double(),
                                      eps_prime=eps_prime.double())
    assert got.tau.dtype == torch.float32 and torch.equal(got.tau, eager.tau)
    assert_low_precision_ok([got.y, got.x_t, got.target], [eager.y, eager.x_t, eager.target],
                            [exact.y, exact.x_t, exact.target])


@pytest.mark.parametrize("layout", ["channels_last", "strided", "mixed"])
def test_any_memory_layout_and_mixed_dtypes(backend, layout):
    backend("cpp")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs((2, 3, 10, 14), "cpu")
    layouts = ("channels_last", "contiguous", "strided") if layout == "mixed" else (layout,) * 3
    args = [as_layout(t, lay) for t, lay in zip((x0, eps_T, eps_prime), layouts)]
    got = ops.training_sample(args[0], sigma_r, sigma_s, u, table, eps_T=args[1], eps_prime=args[2])
    assert all(t.is_contiguous() for t in got)
    check(got, reference.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, eps_prime=eps_prime))
    mixed = dict(eps_T=eps_T.double(), eps_prime=eps_prime.half())
    check(ops.training_sample(x0, sigma_r, sigma_s, u, table, **mixed),
          reference.training_sample(x0, sigma_r, sigma_s, u, table, **mixed))


@pytest.mark.parametrize("table", [torch.tensor([0.5, 1.0]), 0.02 + 3 * torch.linspace(0, 1, 37) ** 2],
                         ids=["T=1,g0=0.5", "T=36,g0=0.02"])
def test_any_table(backend, table):
    backend("cpp")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs((3, 2, 9, 8), "cpu", table=table)
    sigma_r = sigma_r * 3   # variances that reach past both ends of the table
    check(ops.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, eps_prime=eps_prime),
          reference.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, eps_prime=eps_prime))


def test_one_noise_given_the_other_drawn(backend):
    backend("cpp")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs((2, 3, 8, 8), "cpu")
    want = reference.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, eps_prime=eps_prime)
    only_eps_T = ops.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, seed=4)
    assert_matches([only_eps_T.y, only_eps_T.tau], [want.y, want.tau])
    only_eps_prime = ops.training_sample(x0, sigma_r, sigma_s, u, table, eps_prime=eps_prime, seed=4, correlated=False)
    uncorrelated_want = reference.training_sample(x0, sigma_r, sigma_s, u, table, eps_T=eps_T, eps_prime=eps_prime,
                                                  correlated=False)
    assert_matches([only_eps_prime.x_t, only_eps_prime.tau, only_eps_prime.target],
                   [uncorrelated_want.x_t, uncorrelated_want.tau, uncorrelated_want.target])


def drawn_noise(seed, offset, shape=(2, 4, 64, 128), layout="contiguous", threads=None):
    """(eps_T, eps') the kernel draws, recovered in float64 from y' and x_t of a constant image whose pixels
    all sit at tau* > tau > 0; shape is large enough for two threads."""
    x0 = as_layout(torch.full(shape, 0.5), layout)
    sigma, half = torch.full((shape[0],), 0.1), torch.full((shape[0],), 0.5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        y, x_t, tau, _ = ops.training_sample(x0, sigma, sigma, half, TABLE, seed=seed, offset=offset)
    finally:
        torch.set_num_threads(before)
    table = TABLE.double()
    tau_star = reference._time_from_variance(torch.full_like(tau, 0.01 + 0.01 * 0.5).double(), table)
    g_star, g = reference._gamma(tau_star, table), reference._gamma(tau.double(), table)
    r = g / g_star
    eps_T = (y.double() - 0.5) / g_star.sqrt()
    return eps_T, (x_t.double() - 0.5 - r * (y.double() - 0.5)) / (g * (1 - r)).sqrt()


def test_in_kernel_noise_is_standard_normal_and_streams_are_independent(backend, isa):
    backend("cpp")
    eps_T, eps_prime = drawn_noise(seed=99, offset=3)
    normal_statistics_ok(eps_T)
    normal_statistics_ok(eps_prime)
    assert uncorrelated(eps_T, eps_prime)
    for again in (drawn_noise(seed=99, offset=3, layout="channels_last"), drawn_noise(seed=99, offset=3, threads=1),
                  drawn_noise(seed=99, offset=3, threads=2)):
        assert torch.equal(eps_T, again[0]) and torch.equal(eps_prime, again[1])
    for other in (drawn_noise(seed=99, offset=4), drawn_noise(seed=100, offset=3)):
        assert not torch.equal(eps_T, other[0]) and uncorrelated(eps_T, other[0])
        assert uncorrelated(eps_prime, other[1])


def test_automatic_choice_on_cpu_is_the_cpp_kernel(backend):
    backend("auto")
    assert ops.backends.choose("training_sample", "cpu").backend == "cpp"


def test_empty(backend):
    backend("cpp")
    got = ops.training_sample(torch.empty(0, 3, 4, 4), 0.1, 0.1, 0.5, TABLE)
    assert got.y.shape == (0, 3, 4, 4) and got.tau.shape == (0, 1, 4, 4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(backend, layout):
    backend("cpp")
    x0, eps_T, eps_prime, sigma_r, sigma_s, u, table = sample_inputs((2, 3, 5, 7), "cpu")
    x0, eps_T, eps_prime = (as_layout(t, layout) for t in (x0, eps_T, eps_prime))
    for noise in ((eps_T, eps_prime), (None, None)):
        for correlated, per_channel in ((True, False), (False, True)):
            torch.library.opcheck(torch.ops.svnr.training_sample,
                                  (x0, sigma_r, sigma_s, u, table, correlated, *noise, 3, 1, per_channel, False, 0.1))
