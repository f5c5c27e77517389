"""Schedule, lookups, time map and top-up against closed forms (DESIGN.md §1.1-1.3), in float64."""
import numpy as np
import pytest
import torch

from svnr_fast import PoissonGaussian, Schedule, ops, reference

F64 = torch.float64


def closed_form_table(T=1000, beta_start=1e-4, beta_end=0.02, lam=5.0) -> np.ndarray:
    betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    return np.concatenate([[0.0], lam * (1.0 - abar)])


def random_table(n: int, g0: float, generator: torch.Generator) -> torch.Tensor:
    steps = torch.rand(n - 1, generator=generator, dtype=F64) + 1e-3
    return (g0 + torch.cat([torch.zeros(1, dtype=F64), steps.cumsum(0)])).to(torch.float32)


@pytest.mark.parametrize("kwargs", [{}, {"T": 50, "lam": 1.0}, {"T": 2000, "beta_start": 1e-5, "beta_end": 0.01}])
def test_table_matches_closed_form(kwargs):
    schedule = Schedule(**kwargs)
    expected = closed_form_table(**kwargs)
    assert schedule.table.dtype == torch.float32 and schedule.table.shape == (len(expected),)
    np.testing.assert_allclose(schedule.table64.numpy(), expected, rtol=1e-13, atol=0)
    assert torch.equal(schedule.table, torch.from_numpy(expected).to(torch.float32))
    assert schedule.table[0] == 0 and bool((schedule.table[1:] > schedule.table[:-1]).all())


def test_default_schedule_values():
    table = Schedule().table64
    assert table[1].item() == pytest.approx(5 * 1e-4, rel=1e-12)          # gamma(1) = lam * beta_1
    assert table[-1].item() == pytest.approx(5 * (1 - np.prod(1 - np.linspace(1e-4, 0.02, 1000))), rel=1e-12)


@pytest.mark.parametrize("bad", [{"T": 0}, {"T": 1.5}, {"beta_start": -1e-4}, {"beta_end": 1.0}, {"lam": 0.0},
                                 {"beta_start": 0.03, "beta_end": 0.02}])
def test_schedule_rejects_bad_parameters(bad):
    with pytest.raises((ValueError, TypeError), match="|".join(bad)):
        Schedule(**bad)


def test_schedule_refuses_a_table_that_saturates_in_float32():
    with pytest.raises(ValueError, match="saturates"):
        Schedule(T=2000, beta_end=0.03)


def tables(generator):
    return {
        "default": Schedule().table,
        "short": Schedule(T=10).table,
        "two_entries": torch.tensor([0.0, 2.0]),
        "g0_positive": random_table(37, 0.3, generator),
    }


@pytest.mark.parametrize("name", ["default", "short", "two_entries", "g0_positive"])
def test_gamma_is_the_piecewise_linear_interpolation(name):
    gen = torch.Generator().manual_seed(1)
    table = tables(gen)[name]
    T = table.numel() - 1
    t64 = table.to(F64)
    knots = torch.arange(T + 1, dtype=F64)
    assert torch.equal(reference.gamma(knots, table), t64)
    mid = knots[:-1] + 0.25
    torch.testing.assert_close(reference.gamma(mid, table), 0.75 * t64[:-1] + 0.25 * t64[1:], rtol=1e-15, atol=0)
    # outside [0, T] the interpolation is flat
    assert reference.gamma(torch.tensor([-3.0, T + 7.0], dtype=F64), table).tolist() == [t64[0].item(), t64[-1].item()]


@pytest.mark.parametrize("name", ["default", "short", "two_entries", "g0_positive"])
def test_time_from_variance_inverts_gamma(name):
    gen = torch.Generator().manual_seed(2)
    table = tables(gen)[name]
    T = table.numel() - 1
    t64 = table.to(F64)
    tau = torch.rand(10_000, generator=gen, dtype=F64) * T
    torch.testing.assert_close(reference.time_from_variance(reference.gamma(tau, table), table), tau,
                               rtol=0, atol=1e-9)
    v = t64[0] + torch.rand(10_000, generator=gen, dtype=F64) * (t64[-1] - t64[0])
    torch.testing.assert_close(reference.gamma(reference.time_from_variance(v, table), table), v, rtol=0, atol=1e-12)
    # the table entries themselves map to the integer times, the ends included
    torch.testing.assert_close(reference.time_from_variance(t64, table), torch.arange(T + 1, dtype=F64),
                               rtol=0, atol=1e-9)
    # below the first entry: time 0; above the last: time T
    below = reference.time_from_variance(torch.tensor([t64[0].item() - 1e-3, -5.0], dtype=F64), table)
    above = reference.time_from_variance(torch.tensor([t64[-1].item() + 1e-6, 1e9], dtype=F64), table)
    assert below.tolist() == [0.0, 0.0] and above.tolist() == [float(T), float(T)]


def test_lookups_keep_shape_and_promote_dtype(fused_cpu):
    table = Schedule().table
    tau = torch.rand(2, 3, 4, 5) * 1000
    for fn in (reference.gamma, reference.time_from_variance, ops.gamma, ops.time_from_variance):
        assert fn(tau, table).shape == tau.shape
        assert fn(tau, table).dtype == torch.float32
        assert fn(tau.to(F64), table).dtype == F64
        assert fn(tau.half(), table).dtype == torch.float32
    torch.testing.assert_close(ops.gamma(tau, table), reference.gamma(tau, table), rtol=0, atol=0)


def test_time_map_is_the_time_of_the_largest_channel_variance(fused_cpu):
    gen = torch.Generator().manual_seed(3)
    table = Schedule().table
    variance = torch.rand(3, 4, 5, 6, generator=gen, dtype=F64) * 0.3
    tau = reference.time_map(variance, table)
    assert tau.shape == (3, 1, 5, 6)
    per_channel = reference.time_from_variance(variance, table)
    torch.testing.assert_close(tau, per_channel.amax(dim=1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(reference.gamma(tau, table), variance.amax(dim=1, keepdim=True), rtol=0, atol=1e-15)
    torch.testing.assert_close(ops.time_map(variance, table), tau, rtol=0, atol=0)


def test_top_up_gives_every_channel_the_variance_of_the_time_map():
    gen = torch.Generator().manual_seed(4)
    table = Schedule().table
    x = torch.rand(1, 3, 5, 7, generator=gen, dtype=F64).expand(4000, 3, 5, 7)
    noise = PoissonGaussian(0.03, 0.2)
    variance = noise.variance(x)
    y = noise.sample(x, generator=gen)
    y_prime, tau_star = reference.top_up(y, variance, table, seed=5)
    g_star = reference.gamma(tau_star, table)
    # exact: the top-up adds gamma(tau*) - V_c to each channel's variance
    assert torch.all(g_star >= variance - 1e-15)
    # empirical variance over the batch of every channel of every pixel equals gamma(tau*) of that pixel
    empirical = (y_prime - x).var(dim=0)
    expected = g_star[0].expand_as(empirical)
    n = x.shape[0]
    standard_error = expected * (2 / (n - 1)) ** 0.5
    assert torch.all((empirical - expected).abs() < 5 * standard_error)
    pooled = ((y_prime - x) ** 2 / g_star).mean()
    assert abs(pooled.item() - 1) < 5 * (2 / (n * 105)) ** 0.5


def test_poisson_gaussian_variance_and_sampling():
    gen = torch.Generator().manual_seed(6)
    x = torch.tensor([-0.2, 0.0, 0.5, 1.0], dtype=F64).view(1, 1, 1, 4).expand(2, 1, 1, 4)
    noise = PoissonGaussian(torch.tensor([0.01, 0.1], dtype=F64), torch.tensor([0.2, 0.0], dtype=F64))
    expected = torch.stack([0.01**2 + 0.2**2 * x[0].clamp_min(0), 0.1**2 + 0 * x[1]])
    torch.testing.assert_close(noise.variance(x), expected, rtol=1e-15, atol=0)
    big = torch.full((20000, 1, 1, 1), 0.6, dtype=F64)
    samples = PoissonGaussian(0.05, 0.1).sample(big, generator=gen)
    variance = 0.05**2 + 0.1**2 * 0.6
    assert abs(samples.mean().item() - 0.6) < 5 * (variance / 20000) ** 0.5
    assert abs(samples.var().item() / variance - 1) < 5 * (2 / 20000) ** 0.5


def test_poisson_gaussian_rejects_negative_parameters():
    with pytest.raises(ValueError, match="sigma_s"):
        PoissonGaussian(0.1, -0.1)
    with pytest.raises(ValueError, match="sigma_r"):
        PoissonGaussian(torch.tensor([0.1, -0.1]), 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_top_up_matches_the_reference(fused_cpu, dtype):
    gen = torch.Generator().manual_seed(6)
    table = Schedule().table
    y = torch.rand(2, 3, 5, 7, generator=gen, dtype=dtype)
    variance = PoissonGaussian(0.03, 0.2).variance(y.clamp(0, 1))
    z = torch.randn(y.shape, generator=gen, dtype=dtype)
    fast = ops.top_up(y, variance, table, z=z)
    slow = reference.top_up(y, variance, table, z=z)
    for got, want in zip(fast, slow):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)
    drawn = ops.top_up(y, variance, table, seed=3, offset=1)
    assert torch.equal(drawn[1], fast[1]) and not torch.equal(drawn[0], fast[0])
    with pytest.raises(ValueError, match="variance must have the shape of y"):
        ops.top_up(y, variance[:, :1], table)
