"""The sampler and SVNRScheduler, driven by an oracle denoiser that knows the clean image."""
import math

import pytest
import torch
from conftest import requires_cuda

from svnr_fast import PoissonGaussian, Schedule, reference
from svnr_fast.sampling import SamplerGraphs, SVNRScheduler, default_steps, plan_steps, sample, sample_baseline

TABLE = Schedule().table


def oracle(x0: torch.Tensor):
    """eps_hat = (x - x0) / sqrt(gamma(tau)): the perfect denoiser for the clean image x0."""
    def denoiser(condition, x, tau):
        g = reference.gamma(tau, TABLE)
        return torch.where(g > 0, (x - x0) / g.clamp_min(1e-30).sqrt(), 0).to(x.dtype)
    return denoiser


def noisy(seed=0, shape=(2, 3, 12, 10), sigma=(0.05, 0.1)):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(*shape, generator=gen, dtype=torch.float64)
    noise = PoissonGaussian(*sigma)
    y = noise.sample(x0, generator=gen)
    y_prime, tau_star = reference.top_up(y, noise.variance(x0), TABLE, seed=seed)
    return x0, y_prime, tau_star


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [None, 1, 4])
def test_oracle_denoiser_recovers_the_clean_image(eta, steps):
    x0, y_prime, tau_star = noisy()
    seen = []
    out = sample(oracle(x0), y_prime, y_prime, tau_star, TABLE, steps=steps, eta=eta,
                      callback=lambda i, x, tau, x0_hat: seen.append((i, tau.clone())))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)
    expected_steps = default_steps(tau_star) if steps is None else steps
    assert [i for i, _ in seen] == list(range(expected_steps))
    assert torch.all(seen[-1][1] == 0)


def test_default_steps_is_the_papers_delta_of_one():
    _, _, tau_star = noisy(sigma=(0.1, 0.2))
    plan = plan_steps(tau_star, None)
    assert plan.steps == math.ceil(tau_star.max().item())
    torch.testing.assert_close(plan.delta, tau_star.amax(dim=(1, 2, 3)) / plan.steps)
    assert plan.delta.max() <= 1 and plan.delta.max() > 1 - 1 / plan.steps


def test_every_image_of_a_batch_ends_together():
    x0, y_prime, tau_star = noisy(shape=(2, 3, 8, 8))
    tau_star = tau_star * torch.tensor([1.0, 0.25], dtype=tau_star.dtype).view(2, 1, 1, 1)
    taus = []
    sample(oracle(x0), y_prime, y_prime, tau_star, TABLE, steps=5, eta=0.0, callback=lambda i, x, t, x0h: taus.append(t))
    for i, tau in enumerate(taus[:-1]):
        assert torch.all(tau.amax(dim=(1, 2, 3)) > 0), f"an image finished early, at step {i}"
    assert torch.all(taus[-1] == 0)


def test_baseline_sampler_starts_from_noise_at_time_T():
    x0, _, _ = noisy(shape=(1, 3, 8, 8))
    starts = []

    def denoiser(condition, x, tau):
        if not starts:
            starts.append((x.clone(), tau.clone()))
        return oracle(x0)(condition, x, tau)

    out = sample_baseline(denoiser, x0, TABLE, steps=10, eta=1.0)
    x_T, tau_T = starts[0]
    assert torch.all(tau_T == 1000)
    assert abs(x_T.mean().item() - 0.5) < 5 * TABLE[-1].sqrt().item() / math.sqrt(x_T.numel())
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


def test_scheduler_matches_the_functional_sampler():
    x0, y_prime, tau_star = noisy(seed=3)
    denoiser = oracle(x0 + 0.01)          # an imperfect denoiser, so the noise path matters
    expected = sample(denoiser, y_prime, y_prime, tau_star, TABLE, steps=6, eta=1.0, seed=4)
    scheduler = SVNRScheduler(eta=1.0, seed=4)
    scheduler.set_timesteps(6, tau_star)
    x, tau = y_prime, tau_star
    for _ in scheduler.timesteps:
        out = scheduler.step(denoiser(y_prime, x, tau), tau, x)
        x, tau = out.prev_sample, out.tau
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="all 6 planned steps"):
        scheduler.step(denoiser(y_prime, x, tau), tau, x)


def test_scheduler_checks_values_at_the_first_step_and_shapes_at_every_step():
    _, y_prime, tau_star = noisy()
    scheduler = SVNRScheduler()
    scheduler.set_timesteps(3, tau_star)
    bad = y_prime.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        scheduler.step(y_prime, tau_star, bad)
    out = scheduler.step(y_prime, tau_star, y_prime)
    with pytest.raises(ValueError, match="model_output must have the shape of sample"):
        scheduler.step(y_prime[:, :2], out.tau, out.prev_sample)
    with pytest.raises(ValueError, match="planned for 2 images, but sample has 1"):
        scheduler.step(y_prime[:1], out.tau[:1], out.prev_sample[:1])


def test_scheduler_config_round_trip(tmp_path):
    scheduler = SVNRScheduler(num_train_timesteps=500, lam=2.0, eta=0.5, clip_sample=True, seed=9)
    scheduler.save_config(tmp_path)
    loaded = SVNRScheduler.from_pretrained(tmp_path)
    assert loaded.config == scheduler.config
    assert torch.equal(loaded.table, scheduler.table)
    assert SVNRScheduler.from_config(scheduler.config).config == scheduler.config
    (tmp_path / SVNRScheduler.config_name).write_text("{not json")
    with pytest.raises(ValueError, match="cannot read a scheduler config"):
        SVNRScheduler.from_pretrained(tmp_path)


def test_scheduler_add_noise_is_the_forward_process():
    scheduler = SVNRScheduler()
    x0 = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    tau = torch.full((1, 1, 4, 4), 37.5, dtype=torch.float64)
    torch.testing.assert_close(scheduler.add_noise(x0, noise, tau), x0 + reference.gamma(tau, TABLE).sqrt() * noise)


def test_bad_step_counts_are_refused():
    _, y_prime, tau_star = noisy()
    for steps in (0, 10**20):       # 10**20 raised OverflowError
        with pytest.raises(ValueError, match=r"steps must be an int in \[1, 10000\]"):
            sample(oracle(y_prime), y_prime, y_prime, tau_star, TABLE, steps=steps)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        SVNRScheduler().step(y_prime, tau_star, y_prime)


# ---------------------------------------------------------------------------------------------------
# The loop captured in a CUDA graph
# ---------------------------------------------------------------------------------------------------

def capturable(condition, x, tau):
    """A denoiser of plain tensor ops (no value checks, so no host sync): CUDA graphs can hold it."""
    return (x - 0.8 * condition - 0.1) / (tau + 1).sqrt()


def cuda_inputs(seed=0, shape=(2, 3, 12, 10)):
    _, y_prime, tau_star = noisy(seed=seed, shape=shape)
    return y_prime.float().cuda(), tau_star.float().cuda()


def test_cuda_graph_refuses_cpu_tensors_and_callbacks():
    _, y_prime, tau_star = noisy()
    with pytest.raises(ValueError, match="cuda_graph needs CUDA tensors, but x is on cpu"):
        sample(capturable, y_prime, y_prime, tau_star, TABLE, steps=2, cuda_graph=True)
    with pytest.raises(ValueError, match="a callback cannot run inside a CUDA graph"):
        sample(capturable, y_prime, y_prime, tau_star, TABLE, steps=2, cuda_graph=SamplerGraphs(),
                    callback=lambda *args: None)
    with pytest.raises(TypeError, match="cuda_graph must be a bool or a SamplerGraphs"):
        sample(capturable, y_prime, y_prime, tau_star, TABLE, steps=2, cuda_graph="yes")


@requires_cuda
@pytest.mark.parametrize("eta, clamp", [(0.0, None), (1.0, (0.0, 1.0))])
def test_cuda_graph_gives_the_uncaptured_result(eta, clamp):
    table = TABLE.cuda()
    graphs = SamplerGraphs()
    for seed in (0, 1):      # the second call replays the first one's graph, with new inputs
        y_prime, tau_star = cuda_inputs(seed)
        expected = sample(capturable, y_prime, y_prime, tau_star, table, steps=5, eta=eta, clamp=clamp, seed=3)
        got = sample(capturable, y_prime, y_prime, tau_star, table, steps=5, eta=eta, clamp=clamp, seed=3,
                          cuda_graph=graphs)
        assert torch.equal(got, expected)
        assert torch.equal(sample(capturable, y_prime, y_prime, tau_star, table, steps=5, eta=eta, clamp=clamp, seed=3,
                                       cuda_graph=True), expected)
    assert len(graphs) == 1


@requires_cuda
def test_cuda_graphs_are_kept_per_kind_of_call():
    table = TABLE.cuda()
    y_prime, tau_star = cuda_inputs()
    graphs = SamplerGraphs()
    for eta, seed in ((0.0, 1), (0.0, 2), (1.0, 1), (1.0, 2)):   # eta = 0 draws no noise: its seed does not matter
        expected = sample(capturable, y_prime, y_prime, tau_star, table, steps=3, eta=eta, seed=seed)
        assert torch.equal(sample(capturable, y_prime, y_prime, tau_star, table, steps=3, eta=eta, seed=seed,
                                       cuda_graph=graphs), expected)
    assert len(graphs) == 3
    sample(capturable, y_prime[:1], y_prime[:1], tau_star[:1], table, steps=3, eta=0.0, cuda_graph=graphs)
    sample(capturable, y_prime, y_prime, tau_star, table, steps=4, eta=0.0, cuda_graph=graphs)
    assert len(graphs) == 5
    graphs.clear()
    assert len(graphs) == 0


@requires_cuda
def test_cuda_graph_follows_the_model_weights():
    from svnr_fast.app.models import SVNRUNet, preset

    torch.manual_seed(0)
    model = SVNRUNet(preset("tiny")).cuda().eval()
    with torch.no_grad():
        for parameter in model.parameters():   # the zero-initialised output layers would hide the network
            parameter.add_(0.05 * torch.randn_like(parameter))
    table = model.variance_table
    y_prime, tau_star = cuda_inputs(shape=(1, 3, 16, 16))
    graphs = SamplerGraphs()
    for _ in range(2):   # the second pass sees new weights: the graph is captured again
        with torch.inference_mode():
            expected = sample(model, y_prime, y_prime, tau_star, table, steps=4, eta=1.0, seed=5)
            got = sample(model, y_prime, y_prime, tau_star, table, steps=4, eta=1.0, seed=5, cuda_graph=graphs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert len(graphs) == 1
        # new storage for every weight, as .to() or load_state_dict(assign=True) give: a replay of the old graph
        # would read freed memory. (An in-place update alone a replay would see without a new capture: the
        # graph reads the parameters where they are and computes the time tables itself.)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.data = parameter.data + 0.05


def test_graph_state_follows_the_module_behind_a_bound_method():
    """SamplerGraphs keys and checks a bound method (model.network) by its module, whose weights it reads."""
    from svnr_fast.app import models
    from svnr_fast.sampling import _owner, _state
    model = models.SVNRUNet(models.preset("tiny")).eval()
    assert _owner(model.network) is model and _owner(model) is model
    before = _state(model.network)
    assert before and before == _state(model.network)      # a fresh bound method, the same state
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert _state(model.network) != before
    with torch.inference_mode():
        frozen = models.SVNRUNet(models.preset("tiny")).eval()
        assert _state(frozen) == _state(frozen)             # inference tensors: no version counter needed
