"""svnr_fast.integrations.diffusers.SVNRScheduler: the standard diffusers loop, config round trips, and
agreement with the ops, the functional sampler and the other codebase's re-derivation (test_conventions)."""
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from svnr_fast import Schedule, ops  # noqa: E402
from svnr_fast import sampling  # noqa: E402
from svnr_fast.integrations.diffusers import SVNRScheduler, SVNRSchedulerOutput  # noqa: E402
from test_conventions import OTHER, T, denoiser_np, denoiser_torch, index_problem  # noqa: E402

F64 = torch.float64


def problem(seed=0, shape=(2, 3, 6, 7), per_channel=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    y_prime = torch.rand(shape, generator=gen, dtype=dtype)
    tau_star = torch.rand((shape[0], shape[1] if per_channel else 1, *shape[2:]), generator=gen, dtype=dtype) * 40
    tau_star[1] *= 0.3
    return y_prime, tau_star


def run_standard_loop(scheduler, y_prime, tau_star, steps, generator=None):
    """The loop as a diffusers user writes it."""
    scheduler.set_timesteps(steps, time_map=tau_star)
    x = y_prime
    for t in scheduler.timesteps:
        eps_hat = denoiser_torch(y_prime, x, scheduler.time_map_at(t))
        x = scheduler.step(eps_hat, t, x, generator=generator).prev_sample
    return x


def test_importing_svnr_fast_does_not_import_diffusers():
    code = "import sys, svnr_fast, svnr_fast.conventions; assert 'diffusers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("steps", [None, 7])
def test_deterministic_loop_equals_the_functional_sampler(per_channel, steps):
    y_prime, tau_star = problem(per_channel=per_channel)
    scheduler = SVNRScheduler(eta=0.0)
    got = run_standard_loop(scheduler, y_prime, tau_star, steps)
    want = sampling.sample(denoiser_torch, y_prime, y_prime, tau_star, Schedule().table, steps=steps, eta=0.0)
    assert torch.equal(got, want)
    assert scheduler.num_inference_steps == (steps or int(np.ceil(float(tau_star.max()))))


def test_ancestral_loop_with_a_generator_equals_ops_with_that_noise():
    y_prime, tau_star = problem(dtype=F64)
    scheduler = SVNRScheduler()
    got = run_standard_loop(scheduler, y_prime, tau_star, 5, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    plan = sampling.plan_steps(tau_star, 5)
    x, tau, table = y_prime, tau_star, Schedule().table64
    for i in range(5):
        z = torch.randn(x.shape, generator=gen, dtype=F64)
        delta = plan.last_delta if i == 4 else plan.delta
        x, tau = ops.reverse_step(x, denoiser_torch(y_prime, x, tau), tau, delta, table, z=z)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-15)


def test_index_plan_in_minus_one_one_reproduces_the_other_codebase():
    """step_plan 'index', data in [-1, 1], one time map per channel: the other codebase's ancestral loop."""
    condition, tau_star = index_problem()
    scheduler = SVNRScheduler(trained_betas=betas_of(OTHER.table, lam=5.0).tolist(), lam=5.0, num_train_timesteps=T,
                              data_range=(-1, 1), step_plan="index")
    np.testing.assert_allclose(scheduler.schedule.table64[1:].numpy(), OTHER.table, rtol=1e-12, atol=0)
    got = run_standard_loop(scheduler, condition, tau_star, None, generator=torch.Generator().manual_seed(3))
    assert scheduler.timesteps.tolist() == list(range(scheduler.num_inference_steps, 0, -1))
    gen = torch.Generator().manual_seed(3)
    z = np.stack([torch.randn(condition.shape, generator=gen, dtype=F64).numpy()
                  for _ in range(scheduler.num_inference_steps)])
    k_start = scheduler.schedule.index_from_time(tau_star).numpy()
    want = OTHER.ancestral_loop(denoiser_np, condition.numpy(), condition.numpy(), k_start, (tau_star == 0).numpy(),
                                z, 1.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)


def betas_of(table: np.ndarray, lam: float) -> np.ndarray:
    """The betas whose `lam * (1 - alphas_cumprod)` is `table`."""
    alphas_cumprod = 1 - table / lam
    return 1 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])


def test_timesteps_label_the_steps_and_time_map_at_looks_ahead():
    y_prime, tau_star = problem()
    scheduler = SVNRScheduler(eta=0.0)
    scheduler.set_timesteps(6, time_map=tau_star)
    labels = scheduler.timesteps
    assert labels.dtype == torch.float32 and len(labels) == 6 and bool((labels[1:] < labels[:-1]).all())
    assert labels[0].item() == pytest.approx(float(tau_star.max()))
    assert torch.equal(scheduler.time_map_at(labels[0]), tau_star)
    ahead = scheduler.time_map_at(labels[3])
    x = y_prime
    for t in labels[:3]:
        x = scheduler.step(denoiser_torch(y_prime, x, scheduler.time_map_at(t)), t, x).prev_sample
    assert torch.equal(scheduler.time_map_at(labels[3]), ahead)
    assert scheduler.time_map_at(float(labels[3])) is scheduler.time_map_at(labels[3])
    assert float(scheduler.time_map_at(labels[3]).max()) == pytest.approx(labels[3].item(), rel=1e-6)
    # going back re-derives the earlier maps
    assert torch.equal(scheduler.time_map_at(labels[0]), tau_star)


def test_step_outputs_and_tuples():
    y_prime, tau_star = problem()
    scheduler = SVNRScheduler()
    scheduler.set_timesteps(3, time_map=tau_star)
    t = scheduler.timesteps[0]
    eps_hat = denoiser_torch(y_prime, y_prime, tau_star)
    out = scheduler.step(eps_hat, t, y_prime, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, SVNRSchedulerOutput)
    as_tuple = scheduler.step(eps_hat, t, y_prime, generator=torch.Generator().manual_seed(1), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    for a, b in zip(as_tuple, (out.prev_sample, out.pred_original_sample, out.time_map)):
        assert torch.equal(a, b)
    assert torch.equal(out.pred_original_sample, y_prime - Schedule().gamma(tau_star).sqrt() * eps_hat)
    assert torch.equal(out.time_map, scheduler.time_map_at(scheduler.timesteps[1]))


def test_without_a_generator_the_noise_follows_torch_manual_seed():
    y_prime, tau_star = problem()
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(run_standard_loop(SVNRScheduler(), y_prime, tau_star, 4))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_clip_sample_clamps_x0_hat_to_the_data_range():
    y_prime, tau_star = problem()
    scheduler = SVNRScheduler(clip_sample=True, data_range=(-1, 1))
    scheduler.set_timesteps(2, time_map=tau_star)
    out = scheduler.step(torch.randn_like(y_prime) * 50, scheduler.timesteps[0], y_prime)
    x0 = out.pred_original_sample
    assert x0.min().item() == -1.0 and x0.max().item() == 1.0


def test_diffusers_attributes():
    scheduler = SVNRScheduler(data_range=(-1, 1))
    assert scheduler.order == 1 and len(scheduler) == 1000
    assert scheduler.init_noise_sigma == pytest.approx(2 * Schedule().table64[-1].sqrt().item(), rel=1e-7)
    x = torch.randn(2, 3, 4, 4)
    assert scheduler.scale_model_input(x, 3.0) is x
    assert isinstance(scheduler, diffusers.SchedulerMixin) and isinstance(scheduler, diffusers.ConfigMixin)
    assert scheduler.config.lam == 5.0 and scheduler.config.num_train_timesteps == 1000
    assert scheduler.compatibles == []   # no diffusers scheduler samples this process


def test_add_noise_at_per_image_times_and_time_maps():
    scheduler = SVNRScheduler(data_range=(-1, 1))
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.rand(3, 3, 4, 5, generator=gen) * 2 - 1, torch.randn(3, 3, 4, 5, generator=gen)
    times = torch.tensor([0.0, 10.5, 1000.0])
    want = x0 + 2 * Schedule().gamma(times).sqrt().view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(scheduler.add_noise(x0, noise, times), want, rtol=1e-6, atol=1e-6)
    time_map = torch.rand(3, 1, 4, 5, generator=gen) * 100
    want = x0 + 2 * Schedule().gamma(time_map).sqrt() * noise
    torch.testing.assert_close(scheduler.add_noise(x0, noise, time_map), want, rtol=1e-6, atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    scheduler = SVNRScheduler(lam=3.0, eta=0.5, data_range=(-1, 1), beta_end=0.015, step_plan="index")
    scheduler.save_pretrained(tmp_path)
    text = (tmp_path / "scheduler_config.json").read_text()
    assert '"_class_name": "SVNRScheduler"' in text and '"lam": 3.0' in text
    loaded = SVNRScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    assert torch.equal(loaded.variance_table, scheduler.variance_table)
    y_prime, tau_star = problem()
    torch.manual_seed(0)
    a = run_standard_loop(scheduler, y_prime, tau_star, None)
    torch.manual_seed(0)
    assert torch.equal(run_standard_loop(loaded, y_prime, tau_star, None), a)


def test_a_ddpm_config_is_refused_until_lam_and_the_data_range_are_given(tmp_path):
    ddpm = diffusers.DDPMScheduler()
    with pytest.raises(ValueError, match="not an SVNR config: it has no lam and no data_range"):
        SVNRScheduler.from_config(ddpm.config)
    ddpm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="a DDPMScheduler config is not an SVNR config"):
        SVNRScheduler.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no data_range"):
        SVNRScheduler.from_config(ddpm.config, lam=5.0)
    svnr = SVNRScheduler.from_config(ddpm.config, lam=5.0, data_range=(-1, 1))
    assert torch.equal(svnr.schedule.table, Schedule().table)
    # diffusers computes its alphas_cumprod in float32: the bridge holds to float32 precision
    torch.testing.assert_close(svnr.schedule.table[1:], 5 * (1 - ddpm.alphas_cumprod), rtol=0, atol=2e-6)
    assert SVNRScheduler.from_pretrained(tmp_path, lam=5.0, data_range=(-1, 1)).config.lam == 5.0


def test_ddim_scaled_linear_config_keeps_its_betas():
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    svnr = SVNRScheduler.from_config(ddim.config, lam=2.0, data_range=(-1, 1))
    torch.testing.assert_close(svnr.schedule.table[1:], 2 * (1 - ddim.alphas_cumprod), rtol=0, atol=2e-6)


def test_diffusers_schedulers_warn_that_they_drop_svnr_keys():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
            records.clear()
            cls.from_config(SVNRScheduler(data_range=(-1, 1)).config)   # lam and eta at their defaults
            message = " ".join(r.getMessage() for r in records)
            assert "'lam': 5.0" in message and "'eta'" in message and "will be ignored" in message
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("kwargs, match", [
    ({"prediction_type": "v_prediction"}, "prediction_type must be 'epsilon'"),
    ({"step_plan": "karras"}, "step_plan must be one of"),
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule must be one of"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas must hold num_train_timesteps = 1000"),
    ({"eta": 1.5}, "eta must lie in"),
    ({"data_range": (1, -1)}, "data_range must satisfy low < high"),
    ({"lam": 0.0}, "lam must be > 0"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SVNRScheduler(**kwargs)


def test_misuse_gets_a_clear_error():
    y_prime, tau_star = problem()
    scheduler = SVNRScheduler()
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        scheduler.step(y_prime, 3.0, y_prime)
    with pytest.raises(ValueError, match="time_map=tau_star"):
        scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="finite times >= 0"):
        scheduler.set_timesteps(10, time_map=-tau_star)
    scheduler.set_timesteps(4, time_map=tau_star)
    with pytest.raises(ValueError, match="not one of this plan's timesteps"):
        scheduler.time_map_at(999.0)
    with pytest.raises(ValueError, match="pass num_inference_steps=None"):
        SVNRScheduler(step_plan="index").set_timesteps(10, time_map=tau_star)
    with pytest.raises(ValueError, match="time map of shape"):
        scheduler.step(y_prime[:, :, :3], scheduler.timesteps[0], y_prime[:, :, :3])
