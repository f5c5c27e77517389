"""The reference training sample (DESIGN.md §1.4): closed forms and statistics, in float64."""
import pytest
import torch

from svnr_fast import Schedule, ops, reference

F64 = torch.float64
TABLE = Schedule().table


def repeated_image(n: int, shape=(3, 6, 5), seed=0) -> torch.Tensor:
    """n copies of one random clean image: statistics over the batch are per pixel and channel."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, *shape, generator=gen, dtype=F64).expand(n, *shape).contiguous()


def test_explicit_noise_follows_the_formulas_exactly():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 3, 5, 7, generator=gen, dtype=F64)
    eps_T, eps_prime = torch.randn(2, *x0.shape, generator=gen, dtype=F64)
    sigma_r, sigma_s, u = torch.tensor([0.02, 0.1], dtype=F64), torch.tensor([0.3, 0.05], dtype=F64), 0.3
    out = reference.training_sample(x0, sigma_r, sigma_s, u, TABLE, eps_T=eps_T, eps_prime=eps_prime)

    variance = sigma_r.view(2, 1, 1, 1) ** 2 + sigma_s.view(2, 1, 1, 1) ** 2 * x0
    tau_star = reference.time_from_variance(variance.amax(1, keepdim=True), TABLE)
    g_star = reference.gamma(tau_star, TABLE)
    torch.testing.assert_close(g_star, variance.amax(1, keepdim=True), rtol=1e-13, atol=0)
    torch.testing.assert_close(out.y, x0 + g_star.sqrt() * eps_T, rtol=0, atol=1e-15)
    tau = (tau_star - u * tau_star.amax(dim=(1, 2, 3), keepdim=True)).clamp_min(0)
    torch.testing.assert_close(out.tau, tau, rtol=0, atol=1e-12)
    g = reference.gamma(tau, TABLE)
    r = g / g_star
    x_t = x0 + r * (out.y - x0) + (g * (1 - r)).sqrt() * eps_prime
    torch.testing.assert_close(out.x_t, x_t, rtol=0, atol=1e-15)
    torch.testing.assert_close(out.target, (x_t - x0) / g.sqrt(), rtol=1e-12, atol=1e-12)
    # per-image parameters: the two images have different time maps
    assert out.tau[0].max() != out.tau[1].max()


def test_uncorrelated_sample_is_independent_noise():
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(1, 3, 4, 4, generator=gen, dtype=F64)
    eps_T, eps_prime = torch.randn(2, *x0.shape, generator=gen, dtype=F64)
    out = reference.training_sample(x0, 0.05, 0.1, 0.5, TABLE, correlated=False, eps_T=eps_T, eps_prime=eps_prime)
    g = reference.gamma(out.tau, TABLE)
    torch.testing.assert_close(out.x_t, x0 + g.sqrt() * eps_prime, rtol=0, atol=1e-15)
    torch.testing.assert_close(out.target, eps_prime, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("correlated", [True, False])
@pytest.mark.parametrize("u", [0.0, 0.35, 0.9])
def test_noise_statistics(correlated, u):
    """Var(y'-x0) = gamma(tau*), Var(x_t-x0) = gamma(tau), Cov = gamma(tau) (correlated) or 0, per pixel."""
    n = 3000
    x0 = repeated_image(n, seed=3)
    out = reference.training_sample(x0, 0.04, 0.25, u, TABLE, correlated=correlated, seed=7)
    g_star = reference.gamma(reference.time_map(0.04**2 + 0.25**2 * x0, TABLE), TABLE)
    g = reference.gamma(out.tau, TABLE)
    a, b = out.y - x0, out.x_t - x0

    def check(statistic, expected, standard_error):
        statistic, expected, standard_error = torch.broadcast_tensors(statistic, expected, standard_error)
        noiseless = standard_error == 0          # pixels that reached time 0 carry no noise at all
        assert torch.all(statistic[noiseless] == expected[noiseless])
        z = (statistic - expected)[~noiseless] / standard_error[~noiseless]
        assert z.abs().max() < 5, f"max |z| = {z.abs().max():.2f}"

    cov = g if correlated else torch.zeros_like(g)
    check(a.var(0), g_star[0], g_star[0] * (2 / n) ** 0.5)
    check(b.var(0), g[0], g[0] * (2 / n) ** 0.5)
    mean_ab = (a * b).mean(0)
    check(mean_ab, cov[0], ((g_star * g + cov**2)[0] / n).sqrt())
    # the target is the standardised noise of x_t
    torch.testing.assert_close(out.target, torch.where(g > 0, b / g.sqrt(), 0), rtol=1e-10, atol=1e-10)
    moving = (g[0] > 0).to(F64)
    check(out.target.var(0), moving, (2 / n) ** 0.5 * moving)


def test_pixels_at_time_zero_have_no_noise_and_zero_target():
    x0 = repeated_image(4, shape=(3, 5, 5), seed=4)
    out = reference.training_sample(x0, 0.05, 0.1, 1.0, TABLE, seed=1)
    # u = 1 steps every pixel back by the image's largest tau*, so every pixel reaches time 0
    assert torch.all(out.tau == 0)
    assert torch.equal(out.x_t, x0) and torch.all(out.target == 0)
    # a noiseless image has tau* = 0 everywhere
    clean = reference.training_sample(x0, 0.0, 0.0, 0.5, TABLE, seed=1)
    assert torch.all(clean.tau == 0) and torch.equal(clean.y, x0) and torch.all(clean.target == 0)


def test_generator_streams():
    x0 = repeated_image(2, seed=5)
    first = reference.training_sample(x0, 0.05, 0.1, 0.5, TABLE, seed=3, offset=0)
    again = reference.training_sample(x0, 0.05, 0.1, 0.5, TABLE, seed=3, offset=0)
    other = reference.training_sample(x0, 0.05, 0.1, 0.5, TABLE, seed=3, offset=1)
    assert torch.equal(first.y, again.y) and torch.equal(first.x_t, again.x_t)
    assert not torch.equal(first.y, other.y)


def test_generator_streams_are_independent_across_seeds_and_offsets():
    """The CPU generator keeps only the low 32 bits of its seed: (seed, offset) pairs that differ by multiples of
    2**32, such as the top-up's offset 2**40 and the sampler's step 0, must still give independent streams."""
    pairs = [(0, 0), (0, 2**40), (0, 2**32), (1, 0), (1, 2**40), (2**32, 0), (7, 3)]
    draws = torch.stack([torch.randn(20_000, generator=reference.generator(torch.device("cpu"), s, o))
                         for s, o in pairs] + [torch.randn(20_000, generator=torch.Generator().manual_seed(0))])
    correlation = torch.corrcoef(draws) - torch.eye(len(draws))
    assert float(correlation.abs().max()) < 0.03       # 4 standard errors of independent streams


def test_float32_matches_float64():
    x0 = repeated_image(2, seed=6)
    gen = torch.Generator().manual_seed(0)
    eps_T, eps_prime = torch.randn(2, *x0.shape, generator=gen, dtype=F64)
    ref = reference.training_sample(x0, 0.05, 0.1, 0.4, TABLE, eps_T=eps_T, eps_prime=eps_prime)
    f32 = reference.training_sample(x0.float(), 0.05, 0.1, 0.4, TABLE, eps_T=eps_T.float(), eps_prime=eps_prime.float())
    assert f32.y.dtype == f32.x_t.dtype == f32.tau.dtype == torch.float32
    for a, b in zip(f32, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_ops_match_reference_on_cpu(fused_cpu):
    x0 = repeated_image(3, seed=8).float()
    eps_T, eps_prime = torch.randn((2, *x0.shape), generator=torch.Generator().manual_seed(11))
    kwargs = dict(eps_T=eps_T, eps_prime=eps_prime)
    expected = reference.training_sample(x0, torch.tensor([0.01, 0.05, 0.2]), 0.1, torch.tensor([0.0, 0.5, 1.0]),
                                         TABLE, **kwargs)
    got = ops.training_sample(x0, torch.tensor([0.01, 0.05, 0.2]), 0.1, torch.tensor([0.0, 0.5, 1.0]), TABLE,
                              **kwargs)
    for a, b in zip(got, expected):      # on CPU the op is served by the C++ kernel, the reference's arithmetic
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", [reference, ops], indirect=True)
def test_other_codebases_conventions_follow_the_formulas(impl):
    """per_channel: tau*_c = tau(V_c); t0_per='batch': t0 = u * the batch's largest tau*; min_std floors V."""
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(3, 3, 4, 6, generator=gen, dtype=F64)
    x0[1] *= 0.2
    eps_T, eps_prime = torch.randn(2, *x0.shape, generator=gen, dtype=F64)
    sigma_r, sigma_s, u, floor = torch.tensor([0.001, 0.02, 0.05], dtype=F64), 0.1, 0.4, 0.03
    out = impl.training_sample(x0, sigma_r, sigma_s, u, TABLE, eps_T=eps_T, eps_prime=eps_prime, per_channel=True,
                               t0_per="batch", min_std=floor)

    table = TABLE.double()
    variance = torch.maximum(sigma_r.view(3, 1, 1, 1) ** 2 + sigma_s**2 * x0, torch.tensor(floor**2, dtype=F64))
    tau_star = reference._time_from_variance(variance, table)
    assert out.tau.shape == x0.shape
    torch.testing.assert_close(out.y, x0 + variance.sqrt() * eps_T, rtol=0, atol=1e-12)
    tau = (tau_star - u * tau_star.max()).clamp_min(0)
    torch.testing.assert_close(out.tau, tau, rtol=0, atol=1e-9)
    g = reference._gamma(tau, table)
    r = g / variance
    torch.testing.assert_close(out.x_t, x0 + r * (out.y - x0) + (g * (1 - r)).sqrt() * eps_prime, rtol=0, atol=1e-12)


def test_one_t0_per_batch_takes_one_u():
    with pytest.raises(ValueError, match="t0_per='batch' takes one u"):
        reference.training_sample(torch.rand(2, 3, 4, 4), 0.0, 0.1, torch.tensor([0.1, 0.2]), TABLE, t0_per="batch")
    with pytest.raises(ValueError, match="t0_per must be 'image'"):
        reference.training_sample(torch.rand(2, 3, 4, 4), 0.0, 0.1, 0.5, TABLE, t0_per="pixel")
