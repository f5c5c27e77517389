"""Other codebases' conventions (svnr_fast.conventions, Schedule's constructors and index time) against an
independent re-derivation in float64.

`Other` below is a codebase in the style the conventions describe, written here from the formulas with
numpy (not from svnr_fast.reference): a variance table `lam (1 - abar)` of T entries indexed k = 0..T-1
without the clean image's zero, data in [-1, 1] with the noise applied in [0, 1], one time map per channel,
one t0 per batch, a floor on the noise std, integer-index ancestral steps written in the posterior's
`coef * x_t + coef * x0_hat + coef * z` form. svnr_fast must agree with it to float64 precision.
"""
import numpy as np
import pytest
import torch

from svnr_fast import Schedule, conventions, ops

F64 = torch.float64
T, BETA_START, BETA_END, LAM = 1000, 1e-7, 0.02, 5.0


class Other:
    """The other codebase's formulas, in its own coordinates (index time k = 0..T-1, data in [-1, 1])."""

    def __init__(self):
        betas = np.linspace(BETA_START, BETA_END, T, dtype=np.float64)
        self.table = LAM * (1.0 - np.cumprod(1.0 - betas))      # T entries, table[0] = lam * beta_0 > 0
        self.index = np.arange(T, dtype=np.float64)

    def variance_at(self, k):
        return np.interp(k, self.index, self.table)               # flat outside [0, T-1]

    def time_of(self, v):
        return np.interp(v, self.table, self.index)               # 0 below table[0], T-1 above table[-1]

    def training_sample(self, x0, sigma_r, sigma_s, u, eps_T, eps_prime, min_std, per_channel, batch_t0):
        """In svnr's time (the index shifted by one, with the clean image at time 0): the paper's sample."""
        g = np.concatenate([[0.0], self.table])
        times = np.arange(T + 1, dtype=np.float64)
        x01 = (x0 + 1) / 2
        std = np.sqrt(sigma_r[:, None, None, None] ** 2 + sigma_s[:, None, None, None] ** 2 * np.maximum(x01, 0))
        variance = np.maximum(std, min_std) ** 2
        if not per_channel:
            variance = variance.max(axis=1, keepdims=True)
        tau_star = np.interp(variance, g, times)
        largest = tau_star.max() if batch_t0 else tau_star.max(axis=(1, 2, 3), keepdims=True)
        tau = np.maximum(tau_star - u * largest, 0)
        g_star, g_t = np.interp(tau_star, times, g), np.interp(tau, times, g)
        ratio = np.divide(g_t, g_star, out=np.zeros_like(g_t), where=g_star > 0)
        eps_tilde = np.sqrt(ratio) * eps_T + np.sqrt(1 - ratio) * eps_prime
        y01 = x01 + np.sqrt(g_star) * eps_T
        x_t01 = x01 + np.sqrt(g_t) * eps_tilde
        target = np.where(g_t > 0, eps_tilde, 0.0)
        return 2 * y01 - 1, 2 * x_t01 - 1, np.broadcast_to(tau, x0.shape if per_channel else tau.shape), target

    def ancestral_loop(self, denoiser, condition, x, k_start, clean, z, eta):
        """Integer-index ancestral steps in [-1, 1] data; index k goes to k - 1, and the step out of index 0
        returns x0_hat. `k_start` int indices, `clean` where a pixel needs no step; z[i] the noise of step i."""
        k, done = k_start.copy(), clean.copy()
        x01 = (x + 1) / 2
        for i in range(len(z)):
            model_time = np.where(done, 0.0, k + 1.0)              # what svnr's denoiser sees: svnr time
            eps_hat = denoiser(condition, 2 * x01 - 1, model_time)
            kk = np.clip(k, 0, T - 1)
            g_t = self.table[kk]
            g_prev = np.where(kk >= 1, self.table[np.maximum(kk - 1, 0)], 0.0)
            x0_hat = x01 - np.sqrt(g_t) * eps_hat
            sig2 = eta**2 * g_prev * (g_t - g_prev) / g_t
            if eta == 1:     # the posterior q(x_{k-1} | x_k, x0_hat) in its textbook form
                stepped = (g_prev / g_t) * x01 + ((g_t - g_prev) / g_t) * x0_hat + np.sqrt(sig2) * z[i]
            else:
                stepped = x0_hat + np.sqrt(g_prev - sig2) * eps_hat + np.sqrt(sig2) * z[i]
            x01 = np.where(done, x01, stepped)
            done = done | (k == 0)
            k = k - 1
        return 2 * x01 - 1


OTHER = Other()


def denoiser_np(condition, x, tau):
    return 0.3 * x - 0.2 * condition + 1e-3 * tau


def denoiser_torch(condition, x, tau):
    return 0.3 * x - 0.2 * condition + 1e-3 * tau


def close(actual: torch.Tensor, expected, atol=1e-12):
    np.testing.assert_allclose(actual.detach().cpu().numpy(), np.asarray(expected), rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------------
# Schedules from what codebases store, and index time
# ---------------------------------------------------------------------------------------------------

def test_schedule_constructors_agree_with_the_other_table():
    betas = np.linspace(BETA_START, BETA_END, T)
    expected = np.concatenate([[0.0], OTHER.table])
    for schedule in (Schedule.from_table(OTHER.table), Schedule.from_betas(betas, lam=LAM),
                     Schedule.from_alphas_cumprod(np.cumprod(1 - betas), lam=LAM),
                     Schedule(T, BETA_START, BETA_END, LAM)):
        assert schedule.T == T and schedule.index_offset == 1
        close(schedule.table64, expected, atol=1e-14)
        assert torch.equal(schedule.table, schedule.table64.float())


def test_linear_betas_give_exactly_the_parametrised_table():
    for args in [(1000, 1e-4, 0.02, 5.0), (50, 1e-3, 0.05, 1.0)]:
        T_, start, end, lam = args
        built = Schedule.from_betas(torch.linspace(start, end, T_, dtype=F64), lam=lam)
        assert torch.equal(built.table64, Schedule(*args).table64) and torch.equal(built.table, Schedule(*args).table)


def test_a_table_with_its_zero_is_used_as_is_and_one_without_gets_it():
    with_zero = Schedule.from_table([0.0, 0.1, 0.3])
    without = Schedule.from_table([0.1, 0.3])
    assert with_zero.index_offset == 0 and without.index_offset == 1
    assert with_zero.table64.tolist() == without.table64.tolist() == [0.0, 0.1, 0.3]
    assert Schedule.from_table([0.1, 0.3], index_offset=0).index_offset == 0
    # alphas_cumprod with the clean image's 1 in front keeps its indexing
    assert Schedule.from_alphas_cumprod([1.0, 0.9, 0.5], lam=2.0).index_offset == 0
    assert Schedule.from_alphas_cumprod([0.9, 0.5], lam=2.0).table64.tolist() == pytest.approx([0.0, 0.2, 1.0])


def test_table_built_schedules_keep_a_serialisable_config():
    import json
    for schedule in (Schedule.from_table(OTHER.table), Schedule.from_betas([0.1, 0.2], lam=2.0),
                     Schedule.from_table([0.0, 1.0, 3.0])):
        config = json.loads(json.dumps(schedule.config()))
        again = Schedule.from_config(config)
        assert torch.equal(again.table64, schedule.table64) and again.index_offset == schedule.index_offset
        assert "from_table" in repr(schedule) and f"index_offset={schedule.index_offset}" in repr(schedule)
    assert repr(Schedule.from_config(Schedule(T=10).config())) == repr(Schedule(T=10))


@pytest.mark.parametrize("make, bad, match", [
    (Schedule.from_table, [0.1, 0.1, 0.2], "strictly increasing; table\\[1\\]"),
    (Schedule.from_table, [0.3, 0.2], "strictly increasing"),
    (Schedule.from_table, [-0.1, 0.2], "table must be >= 0"),
    (Schedule.from_table, [0.1, float("nan")], "table contains NaN"),
    (Schedule.from_table, [[0.1, 0.2]], "table must be 1-D"),
    (Schedule.from_table, [], "table must be 1-D"),
    (Schedule.from_table, [0.0], "besides its leading zero"),
    (Schedule.from_table, "abc", "table must be a 1-D sequence"),
    (Schedule.from_betas, [0.1, 0.0], "betas must lie in \\(0, 1\\)"),
    (Schedule.from_betas, [0.1, -0.2], "betas must lie in \\(0, 1\\)"),
    (Schedule.from_betas, [0.1, 1.0], "betas must lie in \\(0, 1\\)"),
    (Schedule.from_betas, [float("inf")], "betas contains NaN or inf"),
    (Schedule.from_betas, np.zeros((2, 2)) + 0.1, "betas must be 1-D"),
    (Schedule.from_alphas_cumprod, [0.9, 0.95], "alphas_cumprod must be strictly decreasing"),
    (Schedule.from_alphas_cumprod, [0.9, 0.0], "alphas_cumprod must lie in \\(0, 1\\]"),
    (Schedule.from_alphas_cumprod, [1.2, 0.5], "alphas_cumprod must lie in \\(0, 1\\]"),
])
def test_constructors_reject_bad_schedules_with_a_clear_error(make, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make(bad)


def test_constructors_reject_a_bad_lam_and_a_float32_saturated_table():
    with pytest.raises(ValueError, match="lam must be > 0"):
        Schedule.from_betas([0.1], lam=0.0)
    with pytest.raises(ValueError, match="saturates"):
        Schedule.from_table([1.0, 1.0 + 1e-12])


def test_index_time_conversions():
    schedule = Schedule.from_table(OTHER.table)
    tau = torch.tensor([0.0, 0.4, 1.0, 1.5, 2.5, 3.5, 999.7, 1000.0], dtype=F64)
    assert schedule.index_from_time(tau, None).tolist() == pytest.approx([0, 0, 0, 0.5, 1.5, 2.5, 998.7, 999])
    assert schedule.index_from_time(tau).tolist() == [0, 0, 0, 0, 1, 2, 998, 999]
    assert schedule.index_from_time(tau, "ceil").tolist() == [0, 0, 0, 1, 2, 3, 999, 999]
    assert schedule.index_from_time(tau, "round").tolist() == [0, 0, 0, 0, 2, 2, 999, 999]   # halves to even
    assert schedule.index_from_time(tau).dtype == torch.int64
    k = torch.tensor([0, 1, 998, 999])
    assert schedule.time_from_index(k).tolist() == [1.0, 2.0, 999.0, 1000.0]
    assert schedule.time_from_index(k).dtype == torch.float32
    assert torch.equal(schedule.index_from_time(schedule.time_from_index(k)), k)
    zero_first = Schedule.from_table([0.0, 0.1, 0.3, 0.6])
    assert zero_first.time_from_index(torch.tensor([0, 2])).tolist() == [0.0, 2.0]
    assert zero_first.index_from_time(torch.tensor([3.0, 9.0])).tolist() == [3, 3]
    with pytest.raises(ValueError, match="rounding must be"):
        schedule.index_from_time(tau, "nearest")


def test_lookups_in_index_time_match_the_other_codebase():
    schedule = Schedule.from_table(OTHER.table)
    gen = torch.Generator().manual_seed(0)
    k = torch.rand(2, 3, 8, 8, generator=gen, dtype=F64) * (T - 1)
    close(ops.gamma(schedule.time_from_index(k), schedule.table64), OTHER.variance_at(k.numpy()), atol=1e-15)
    v = torch.rand(2, 3, 8, 8, generator=gen, dtype=F64) * OTHER.table[-1] * 1.01
    v.view(-1)[:3] = torch.tensor([0.0, OTHER.table[0] / 2, OTHER.table[0]], dtype=F64)
    tau = ops.time_from_variance(v, schedule.table64)
    close(schedule.index_from_time(tau, rounding=None), OTHER.time_of(v.numpy()), atol=1e-9)
    # times are relative to table increments of ~1e-6 near index 0: compare the variances they give too
    close(ops.gamma(tau, schedule.table64), np.clip(v.numpy(), 0, OTHER.table[-1]), atol=1e-15)


# ---------------------------------------------------------------------------------------------------
# Data range, per-channel maps, one t0 per batch, the std floor
# ---------------------------------------------------------------------------------------------------

def batch(seed=1, shape=(3, 3, 9, 11)):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=gen, dtype=F64) * 2.2 - 1.1       # [-1, 1] data, slightly outside too
    return (x0, torch.tensor([0.02, 0.001, 0.1], dtype=F64), torch.tensor([0.05, 0.0, 0.2], dtype=F64),
            torch.randn(shape, generator=gen, dtype=F64), torch.randn(shape, generator=gen, dtype=F64))


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("t0_per", ["batch", "image"])
@pytest.mark.parametrize("min_std", [1e-3, 0.05, 0.0])
def test_training_sample_matches_the_other_codebase(per_channel, t0_per, min_std):
    x0, sigma_r, sigma_s, eps_T, eps_prime = batch()
    schedule = Schedule.from_table(OTHER.table)
    u = 0.37
    got = conventions.training_sample(x0, sigma_r, sigma_s, u, schedule.table64, data_range=(-1, 1),
                                      per_channel=per_channel, t0_per=t0_per, min_std=min_std, eps_T=eps_T,
                                      eps_prime=eps_prime)
    want = OTHER.training_sample(x0.numpy(), sigma_r.numpy(), sigma_s.numpy(), u, eps_T.numpy(), eps_prime.numpy(),
                                 min_std, per_channel, t0_per == "batch")
    assert got.tau.shape == (x0.shape if per_channel else (3, 1, 9, 11))
    for name, actual, expected in zip(("y", "x_t", "tau", "target"), got, want):
        close(actual, expected, atol=1e-9 if name == "tau" else 1e-12)


def test_the_conventions_change_the_sample():
    """Each option must matter on this batch, or the test above could not tell them apart."""
    x0, sigma_r, sigma_s, eps_T, eps_prime = batch()
    table = Schedule.from_table(OTHER.table).table64

    def sample(**options):
        return conventions.training_sample(x0, sigma_r, sigma_s, 0.37, table, data_range=(-1, 1), eps_T=eps_T,
                                           eps_prime=eps_prime, **options)
    base = sample(per_channel=True, t0_per="batch", min_std=0.05)
    assert not torch.allclose(base.tau, sample(per_channel=True, t0_per="image", min_std=0.05).tau)
    assert not torch.allclose(base.y, sample(per_channel=True, t0_per="batch", min_std=0.0).y)
    shared = sample(per_channel=False, t0_per="batch", min_std=0.05).tau
    assert shared.shape == (3, 1, 9, 11) and not torch.allclose(base.tau, shared.expand_as(base.tau))


def test_data_range_maps_are_inverse_and_scale_the_table():
    x = torch.linspace(-1, 1, 9, dtype=F64)
    assert torch.equal(conventions.to_unit(x, (-1, 1)), (x + 1) / 2)
    assert torch.equal(conventions.from_unit(conventions.to_unit(x, (-1, 1)), (-1, 1)), x)
    table = Schedule().table
    assert torch.equal(conventions.table_in_data_units(table, (-1, 1)), 4 * table)
    for bad in [(1, -1), (0, 0), 3, ("a", "b")]:
        with pytest.raises((TypeError, ValueError), match="data_range"):
            conventions.to_unit(x, bad)


@pytest.mark.parametrize("eta", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("per_channel", [True, False])
def test_reverse_step_in_data_units_matches_the_step_in_unit_range(eta, per_channel):
    gen = torch.Generator().manual_seed(2)
    shape = (2, 3, 6, 7)
    x = torch.rand(shape, generator=gen, dtype=F64) * 2 - 1
    eps_hat, z = torch.randn(shape, generator=gen, dtype=F64), torch.randn(shape, generator=gen, dtype=F64)
    tau = torch.rand((2, 3 if per_channel else 1, 6, 7), generator=gen, dtype=F64) * 40
    tau.view(-1)[0] = 0.0
    table = Schedule.from_table(OTHER.table).table64
    delta = torch.tensor([1.5, 7.0], dtype=F64)
    x_new, tau_new, x0_hat = conventions.reverse_step(x, eps_hat, tau, delta, table, data_range=(-1, 1), eta=eta,
                                                      z=z, return_x0_hat=True)
    # the other codebase: to [0, 1], the step written out, back to [-1, 1]
    x01, t, d = (x.numpy() + 1) / 2, tau.numpy(), delta.numpy()[:, None, None, None]
    s = np.maximum(t - d, 0)
    g = np.concatenate([[0.0], OTHER.table])
    g_t, g_s = np.interp(t, np.arange(T + 1), g), np.interp(s, np.arange(T + 1), g)
    want_x0 = x01 - np.sqrt(g_t) * eps_hat.numpy()
    ratio = np.divide(g_s, g_t, out=np.zeros_like(g_t), where=g_t > 0)
    sig2 = eta**2 * g_s * (1 - ratio)
    want = want_x0 + np.sqrt(g_s - sig2) * eps_hat.numpy() + np.sqrt(sig2) * z.numpy()
    want = np.where(g_t > 0, want, x01)
    close(x_new, 2 * np.broadcast_to(want, shape) - 1)
    close(x0_hat, 2 * np.where(g_t > 0, want_x0, x01) - 1)
    close(tau_new, s)
    clamped = conventions.reverse_step(x, eps_hat, tau, delta, table, data_range=(-1, 1), eta=eta, z=z,
                                       clamp=(-0.5, 0.5), return_x0_hat=True)[2]
    close(clamped, 2 * np.where(g_t > 0, np.clip(want_x0, 0.25, 0.75), x01) - 1)


# ---------------------------------------------------------------------------------------------------
# Integer-index ancestral steps
# ---------------------------------------------------------------------------------------------------

def test_index_time_plan_snaps_down_and_keeps_clean_pixels():
    tau = torch.tensor([0.0, 0.3, 1.0, 1.7, 2.0, 56.9]).view(1, 1, 2, 3)
    plan = conventions.index_time_plan(tau)
    assert plan.tau.flatten().tolist() == [0.0, 1.0, 1.0, 1.0, 2.0, 56.0] and plan.steps == 56
    assert conventions.index_time_plan(tau, "ceil").tau.flatten().tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 57.0]
    assert conventions.index_time_plan(torch.zeros(1, 1, 2, 2)).steps == 1
    with pytest.raises(ValueError, match="rounding"):
        conventions.index_time_plan(tau, "down")


def index_problem(seed=3, shape=(2, 3, 5, 6), top=30.0):
    gen = torch.Generator().manual_seed(seed)
    condition = torch.rand(shape, generator=gen, dtype=F64) * 2 - 1
    tau_star = torch.rand(shape, generator=gen, dtype=F64) * top
    tau_star[1] *= 0.5                                   # the images of the batch end at different steps
    tau_star.view(-1)[:3] = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    return condition, tau_star


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_ancestral_index_loop_matches_the_other_codebase(eta):
    condition, tau_star = index_problem()
    schedule = Schedule.from_table(OTHER.table)
    plan = conventions.index_time_plan(tau_star)
    gen = torch.Generator().manual_seed(4)
    z = torch.randn((plan.steps,) + condition.shape, generator=gen, dtype=F64)
    x, tau = condition, plan.tau
    table = conventions.table_in_data_units(schedule.table64, (-1, 1))
    for i in range(plan.steps):
        x, tau = ops.reverse_step(x, denoiser_torch(condition, x, tau), tau, 1.0, table, eta=eta, z=z[i])
    assert bool((tau == 0).all())
    k_start = schedule.index_from_time(tau_star).numpy()
    want = OTHER.ancestral_loop(denoiser_np, condition.numpy(), condition.numpy(), k_start, (tau_star == 0).numpy(),
                                z.numpy(), eta)
    close(x, want)


def test_sample_index_time_runs_the_same_loop():
    condition, tau_star = index_problem(shape=(2, 1, 5, 6))
    schedule = Schedule.from_table(OTHER.table)
    table = conventions.table_in_data_units(schedule.table64, (-1, 1))
    got = conventions.sample_index_time(denoiser_torch, condition, condition, tau_star, table, eta=0.0)
    plan = conventions.index_time_plan(tau_star)
    k_start = schedule.index_from_time(tau_star).numpy()
    zeros = np.zeros((plan.steps,) + condition.shape)
    want = OTHER.ancestral_loop(denoiser_np, condition.numpy(), condition.numpy(), k_start, (tau_star == 0).numpy(),
                                zeros, 0.0)
    close(got, want)
    seen = []
    conventions.sample_index_time(denoiser_torch, condition, condition, tau_star, table,
                                  callback=lambda i, x, tau, x0_hat: seen.append(float(tau.max())))
    assert seen == [float(plan.steps - i - 1) for i in range(plan.steps)]
