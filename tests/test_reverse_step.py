"""The reference reverse step (DESIGN.md §1.5): closed forms and the posterior q(x_s | x_t, x0), in float64."""
import pytest
import torch

from svnr_fast import Schedule, ops, reference

F64 = torch.float64
TABLE = Schedule().table


def noisy_batch(n: int, seed: int, shape=(3, 4, 6), tau_range=(5.0, 300.0)):
    """x0, a per-pixel time map, the true noise and x_t = x0 + sqrt(gamma(tau)) eps for n copies of one image."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(1, *shape, generator=gen, dtype=F64).expand(n, *shape)
    low, high = tau_range
    tau = (low + (high - low) * torch.rand(1, 1, *shape[1:], generator=gen, dtype=F64)).expand(n, 1, *shape[1:])
    eps = torch.randn(n, *shape, generator=gen, dtype=F64)
    x_t = x0 + reference.gamma(tau, TABLE).sqrt() * eps
    return x0, tau.contiguous(), eps, x_t


def test_true_noise_recovers_the_clean_image():
    x0, tau, eps, x_t = noisy_batch(2, seed=1)
    _, tau_new, x0_hat = reference.reverse_step(x_t, eps, tau, 3.0, TABLE, eta=0.0, return_x0_hat=True)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-14)
    torch.testing.assert_close(tau_new, tau - 3.0, rtol=0, atol=1e-12)


def test_eta_one_samples_the_posterior():
    """q(x_s | x_t, x0): mean x0 + gs/gt (x_t - x0), variance gs (1 - gs/gt), for the VE process."""
    n = 4000
    x0, tau, eps, x_t = noisy_batch(1, seed=2)
    x_t, eps, x0, tau = x_t.expand(n, -1, -1, -1), eps.expand(n, -1, -1, -1), x0.expand(n, -1, -1, -1), tau.expand(n, -1, -1, -1)
    delta = 4.0
    x_new, tau_new = reference.reverse_step(x_t, eps, tau, delta, TABLE, eta=1.0, seed=3)
    gt, gs = reference.gamma(tau, TABLE), reference.gamma(tau_new, TABLE)
    mean = x0 + gs / gt * (x_t - x0)
    variance = gs * (1 - gs / gt)
    z_mean = (x_new.mean(0) - mean[0]) / (variance[0] / n).sqrt()
    z_var = (x_new.var(0) / variance[0] - 1) / (2 / n) ** 0.5
    assert z_mean.abs().max() < 5 and z_var.abs().max() < 5


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_partial_eta_matches_the_closed_form(eta):
    x0, tau, eps, x_t = noisy_batch(2, seed=4)
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    x_new, tau_new = reference.reverse_step(x_t, eps, tau, 2.5, TABLE, eta=eta, z=z)
    gt, gs = reference.gamma(tau, TABLE), reference.gamma(tau_new, TABLE)
    sig2 = eta**2 * gs * (1 - gs / gt)
    torch.testing.assert_close(x_new, x0 + (gs - sig2).sqrt() * eps + sig2.sqrt() * z, rtol=0, atol=1e-14)


def test_eta_zero_is_deterministic():
    _, tau, eps, x_t = noisy_batch(2, seed=6)
    a = reference.reverse_step(x_t, eps, tau, 7.0, TABLE, eta=0.0, seed=1)
    b = reference.reverse_step(x_t, eps, tau, 7.0, TABLE, eta=0.0, seed=2)
    c = reference.reverse_step(x_t, eps, tau, 7.0, TABLE, eta=1.0, seed=1)
    d = reference.reverse_step(x_t, eps, tau, 7.0, TABLE, eta=1.0, seed=2)
    assert torch.equal(a[0], b[0]) and not torch.equal(c[0], d[0])


def test_finished_pixels_never_change():
    _, tau, eps, x_t = noisy_batch(2, seed=7)
    tau = tau.clone()
    tau[:, :, :2] = 0
    for eta in (0.0, 1.0):
        x_new, tau_new, x0_hat = reference.reverse_step(x_t, 10 * eps, tau, 3.0, TABLE, eta=eta, return_x0_hat=True)
        assert torch.equal(x_new[:, :, :2], x_t[:, :, :2]) and torch.equal(x0_hat[:, :, :2], x_t[:, :, :2])
        assert torch.all(tau_new[:, :, :2] == 0)


def test_a_step_that_reaches_zero_returns_x0_hat():
    _, tau, eps, x_t = noisy_batch(2, seed=8, tau_range=(1.0, 20.0))
    x_new, tau_new, x0_hat = reference.reverse_step(x_t, 0.7 * eps, tau, 50.0, TABLE, eta=1.0, return_x0_hat=True)
    assert torch.all(tau_new == 0)
    assert torch.equal(x_new, x0_hat)


def test_per_image_delta():
    _, tau, eps, x_t = noisy_batch(3, seed=9)
    delta = torch.tensor([0.0, 1.5, 1000.0], dtype=F64)
    x_new, tau_new, x0_hat = reference.reverse_step(x_t, 3 * eps, tau, delta, TABLE, eta=0.0, return_x0_hat=True)
    torch.testing.assert_close(tau_new, (tau - delta.view(3, 1, 1, 1)).clamp_min(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(x_new[0], x_t[0], rtol=0, atol=1e-14)     # delta = 0: s = tau, nothing moves
    assert not torch.allclose(x_new[1], x_t[1])
    assert torch.equal(x_new[2], x0_hat[2])                               # delta > tau: s = 0


def test_clamp_bounds_x0_hat():
    _, tau, eps, x_t = noisy_batch(2, seed=11)
    x_new, tau_new, x0_hat = reference.reverse_step(x_t, 3 * eps, tau, 2.0, TABLE, eta=0.0, clamp=(0.0, 1.0),
                                                    return_x0_hat=True)
    unclamped = x_t - reference.gamma(tau, TABLE).sqrt() * 3 * eps
    assert (unclamped < 0).any() and (unclamped > 1).any()
    torch.testing.assert_close(x0_hat, unclamped.clamp(0, 1), rtol=0, atol=1e-15)
    torch.testing.assert_close(x_new, x0_hat + reference.gamma(tau_new, TABLE).sqrt() * 3 * eps, rtol=0, atol=1e-14)


def test_ops_match_reference_on_cpu(fused_cpu):
    _, tau, eps, x_t = noisy_batch(2, seed=10)
    z = torch.randn_like(x_t)
    for dtype in (torch.float32, F64):
        args = (x_t.to(dtype), eps.to(dtype), tau.to(dtype), torch.tensor([1.0, 3.0]), TABLE)
        expected = reference.reverse_step(*args, eta=0.7, z=z.to(dtype), clamp=(-0.5, 1.5), return_x0_hat=True)
        got = ops.reverse_step(*args, eta=0.7, z=z.to(dtype), clamp=(-0.5, 1.5), return_x0_hat=True)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert len(ops.reverse_step(x_t, eps, tau, 1.0, TABLE)) == 2


@pytest.mark.parametrize("impl", [reference, ops], indirect=True)
def test_per_channel_time_maps_step_each_channel_at_its_own_time(impl):
    """A (B, C, H, W) time map: channel c gives what a shared map equal to channel c's times gives."""
    gen = torch.Generator().manual_seed(3)
    x, eps_hat, z = torch.randn(3, 2, 3, 4, 6, generator=gen, dtype=F64)
    tau = torch.rand(2, 3, 4, 6, generator=gen, dtype=F64) * 40
    tau[0, 1, :2] = 0.0      # finished pixels in one channel only
    x_new, tau_new, x0_hat = impl.reverse_step(x, eps_hat, tau, torch.tensor([2.0, 7.0]), TABLE, eta=0.7, z=z,
                                               return_x0_hat=True)
    assert tau_new.shape == tau.shape
    for c in range(3):
        want = reference.reverse_step(x[:, c:c + 1], eps_hat[:, c:c + 1], tau[:, c:c + 1], torch.tensor([2.0, 7.0]),
                                      TABLE, eta=0.7, z=z[:, c:c + 1], return_x0_hat=True)
        for got, expected in zip((x_new[:, c:c + 1], tau_new[:, c:c + 1], x0_hat[:, c:c + 1]), want):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)
